"""torchrun worker for the RanncTrainer tests: runs several scenarios in one launch.

    torchrun --nproc_per_node 2 tests/scripts/trainer_worker.py OUT_DIR SCENARIO [SCENARIO ...]

A scenario is ``family:pp:dp[:flags]`` with flags among ``ga2`` (gradient_accumulation_steps=2),
``clip`` (max_grad_norm=1.0), ``save`` (save_model + round trip), ``resume`` (interrupted + resumed run),
``eval`` (eval_strategy + compute_metrics), ``tb`` (TensorBoard). Results go to OUT_DIR/<name>/result.json
(loss curve, stats keys, ...) and OUT_DIR/<name>/final.safetensors (final full weights, rank 0).
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)

from trainer_common import ListDataset, tiny_model  # noqa: E402

N_SAMPLES = 64
MB = 2          # microbatch size
M = 2           # microbatches per pipeline call
STEPS = 4


def run_args(out, *, ga=1, clip=0.0, steps=STEPS, tb=False, save_steps=None, eval_=False, **kw):
    from rannc_hf import RanncTrainingArguments

    return RanncTrainingArguments(
        output_dir=out, per_device_train_batch_size=MB * M, gradient_accumulation_steps=ga, max_grad_norm=clip,
        max_steps=steps, logging_steps=1, learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=1,
        weight_decay=0.01, seed=0, report_to=["tensorboard"] if tb else [], disable_tqdm=True, use_cpu=True,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, save_total_limit=2,
        eval_strategy="steps" if eval_ else "no", eval_steps=2, per_device_eval_batch_size=4,
        dataloader_drop_last=True, **kw)


def scenario(out_root: str, spec: str) -> None:
    from safetensors.torch import save_file

    from rannc_hf import RanncConfig, RanncTrainer

    family, pp, dp, *flags = spec.split(":")
    flags = set(flags[0].split(",")) if flags else set()
    name = spec.replace(":", "_").replace(",", "-")
    out = os.path.join(out_root, name)
    cfg = RanncConfig(num_stages=int(pp), num_microbatches=M, dp_size=int(dp), schedule="gpipe",
                      recompute="none", offload="all" if "offload" in flags else "none", compile="false",
                      partitioner="even")
    ga = 2 if "ga2" in flags else 1
    clip = 1.0 if "clip" in flags else 0.0
    ds = ListDataset(family, N_SAMPLES)
    eval_ds = ListDataset(family, 8, seed=7) if "eval" in flags else None
    compute_metrics = None
    if "eval" in flags:
        def compute_metrics(p):
            import numpy as np

            logits, labels = p.predictions, p.label_ids
            pred = np.argmax(logits, -1)
            mask = labels != -100
            return {"acc": float((pred[mask] == labels[mask]).mean()), "n_eval": float(labels.shape[0])}

    args = run_args(out, ga=ga, clip=clip, tb="tb" in flags, eval_="eval" in flags,
                    save_steps=2 if "resume" in flags else None, rannc_config=cfg)
    trainer = RanncTrainer(model=tiny_model(family), args=args, train_dataset=ds, eval_dataset=eval_ds,
                           compute_metrics=compute_metrics)
    trainer.train()
    m = trainer.rannc_module
    sd = m.state_dict()
    result = {"log_history": trainer.state.log_history, "dp_size": m.dp_size, "num_stages": m.num_stages}
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        os.makedirs(out, exist_ok=True)
        save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, os.path.join(out, "final.safetensors"))
    if "eval" in flags:
        pred = trainer.predict(eval_ds)
        result["predict_metrics"] = pred.metrics
        result["predict_shape"] = list(pred.predictions.shape)
        if rank0:
            save_file({"logits": torch.from_numpy(pred.predictions).contiguous()},
                      os.path.join(out, "predictions.safetensors"))
    if "save" in flags:
        trainer.save_model(os.path.join(out, "saved"))
        # logits of the trained (partitioned) model on a fixed batch, via the eval path
        model = tiny_model(family)
        model.load_state_dict(sd, strict=False)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        model.eval()
        batch = ListDataset(family, 4, seed=99).rows
        b = {k: torch.stack([r[k] for r in batch]) for k in batch[0] if k != "labels"}
        with torch.no_grad():
            logits = model(**b).logits
        if rank0:
            save_file({"logits": logits.contiguous()}, os.path.join(out, "saved_logits.safetensors"))
    if "resume" in flags:
        # interrupted run: train to step 2 with the same schedule, then a fresh trainer resumes from checkpoint-2
        out2 = os.path.join(out_root, name + "_interrupted")
        args2 = run_args(out2, ga=ga, clip=clip, save_steps=2, rannc_config=cfg)
        t2 = RanncTrainer(model=tiny_model(family), args=args2, train_dataset=ds)
        t2.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
        sd2 = t2.rannc_module.state_dict()
        result["resume_log_history"] = t2.state.log_history
        if rank0:
            save_file({k: v.detach().contiguous().clone() for k, v in sd2.items()},
                      os.path.join(out, "resumed.safetensors"))
    if rank0:
        with open(os.path.join(out, "result.json"), "w") as fh:
            json.dump(result, fh, default=float)


def main() -> None:
    out_root = sys.argv[1]
    for spec in sys.argv[2:]:
        scenario(out_root, spec)
    import torch.distributed as dist

    if dist.is_initialized():   # exit with no live process group (gloo's threads can abort an unclean exit)
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
