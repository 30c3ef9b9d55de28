"""Reliability worker: tiny GPT-2 over 2 pipeline stages (RanncModule), checkpoints + automatic resume.

    torchrun --standalone --nproc_per_node 2 --max-restarts 1 tests/scripts/rel_train.py OUT [--bucket 16]
    python tests/scripts/rel_train.py OUT --reference     # single process, plain model, same batches

Batch ``i`` is a pure function of ``i`` (deterministic data order); with ``--bucket`` every batch has a
random length in [5, 44] padded up to a multiple of the bucket (labels -100, mask 0 on the padding).
Checkpoints go to ``OUT/ckpt`` every ``--save_every`` steps (keep 2); at start the newest verified one
is loaded. ``RANNC_HF_TEST_KILL_AT_STEP`` makes rank 1 SIGKILL itself once (rannc_hf.reliability.testing).
Rank 0 writes ``OUT/final.safetensors`` (full gathered state) and ``OUT/run.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import torch  # noqa: E402

torch.set_num_threads(1)

from rannc_hf.reliability import guard_module, load_checkpoint, pad_to_bucket, save_checkpoint  # noqa: E402
from rannc_hf.reliability.testing import maybe_kill  # noqa: E402
from rannc_hf.zoo import make_with_batches  # noqa: E402

B, M, LR = 4, 2, 1e-3


def batch(step: int, bucket: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    L = int(torch.randint(5, 45, (1,), generator=g)) if bucket else 16
    ids = torch.randint(1, 128, (B, L), generator=g)
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return pad_to_bucket(b, bucket) if bucket else b


def reference(args) -> None:
    model, _ = make_with_batches("gpt2", 0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for step in range(args.steps):
        b = batch(step, args.bucket)
        tot = 0.0
        for i in range(M):   # gradient accumulation over the microbatches = what the pipeline computes
            mb = {k: v[i * B // M:(i + 1) * B // M] for k, v in b.items()}
            loss = model(**mb).loss / M
            loss.backward()
            tot += float(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(tot)
    from safetensors.torch import save_file

    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(args.out, "final.safetensors"))
    with open(os.path.join(args.out, "run.json"), "w") as f:
        json.dump({"losses": losses}, f)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--save_every", type=int, default=2)
    p.add_argument("--bucket", type=int, default=0)
    p.add_argument("--reference", action="store_true")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.reference:
        return reference(args)

    import rannc_hf

    t0 = time.time()
    model, _ = make_with_batches("gpt2", 0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    cfg = rannc_hf.RanncConfig(num_stages=2, num_microbatches=M, schedule="1f1b", precision="fp32",
                               partitioner="even", plan_file=os.path.join(args.out, "plan.json"),
                               collective_timeout_s=30)
    rm = guard_module(rannc_hf.RanncModule(model, opt, config=cfg, example_batch=batch(0, args.bucket)))
    ckpt_root = os.path.join(args.out, "ckpt")
    man = load_checkpoint(rm, ckpt_root)
    start = man["step"] if man else 0
    rank = torch.distributed.get_rank()
    losses = {}
    for step in range(start, args.steps):
        maybe_kill(step, args.out)
        loss = rm(**batch(step, args.bucket)).loss
        loss.backward()
        rm.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        losses[step] = float(loss)
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(rm, ckpt_root, step + 1, keep=2, extra={"loss": float(loss)})
    sd = rm.state_dict()
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.detach().clone().contiguous() for k, v in sd.items()},
                  os.path.join(args.out, "final.safetensors"))
        with open(os.path.join(args.out, "run.json"), "w") as f:
            json.dump({"resumed_from": start, "losses": losses, "shapes": len(rm._variants),
                       "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
                       "seconds": round(time.time() - t0, 1)}, f)
    import torch.distributed as dist

    if dist.is_initialized():   # exit with no live process group (gloo's threads can abort an unclean exit)
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
