"""RanncTrainer under torchrun (gloo, CPU): pp=2 and pp=2 x dp=2 match a plain one-process Trainer.

One launch per world size runs several scenarios (see tests/scripts/trainer_worker.py). The reference is
the stock ``Trainer`` in this process doing gradient accumulation over the same microbatches
(``per_device = microbatch``, ``GA = GA * microbatches * dp``), which is what the pipeline computes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "scripts"))

import trainer_worker as W  # noqa: E402
from trainer_common import ListDataset, tb_scalars, tiny_model  # noqa: E402

pytest.importorskip("rannc_hf.runtime.module")

LAUNCHES = {
    2: ["gpt2:2:1:ga2,clip,tb,save,resume,eval", "bert:2:1:clip", "gpt2:2:1:clip,offload"],
    4: ["gpt2:2:2:ga2,clip", "bert:2:2:ga2"],
}


def _launch(nproc: int, out: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(HERE, "scripts", "trainer_worker.py"), out, *LAUNCHES[nproc]]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    if p.returncode != 0:
        raise AssertionError(f"torchrun failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("trainer_dist"))
    for n in LAUNCHES:
        _launch(n, out)
    return out


def _reference(family: str, dp: int, ga: int, clip: float, tmp):
    """The stock Trainer, one process, accumulating over the pipeline's microbatches."""
    from transformers import Trainer, TrainingArguments

    torch.set_num_threads(1)
    args = TrainingArguments(output_dir=str(tmp), per_device_train_batch_size=W.MB,
                             gradient_accumulation_steps=ga * W.M * dp, max_grad_norm=clip, max_steps=W.STEPS,
                             logging_steps=1, learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=1,
                             weight_decay=0.01, seed=0, report_to=[], disable_tqdm=True, use_cpu=True,
                             save_strategy="no", dataloader_drop_last=True)
    t = Trainer(model=tiny_model(family), args=args, train_dataset=ListDataset(family, W.N_SAMPLES))
    t.model_accepts_loss_kwargs = False  # per-chunk mean losses, as the pipeline computes
    t.train()
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    return losses, {k: v.detach().clone() for k, v in t.model.state_dict().items()}


def _load(path):
    from safetensors.torch import load_file

    return load_file(path)


def _result(runs, spec):
    d = os.path.join(runs, spec.replace(":", "_").replace(",", "-"))
    with open(os.path.join(d, "result.json")) as fh:
        return d, json.load(fh)


def _compare_weights(got: dict, ref: dict, tol=2e-5):
    for k, v in got.items():
        assert k in ref, k
        assert torch.allclose(v.float(), ref[k].float(), atol=tol, rtol=1e-4), (k, float((v - ref[k]).abs().max()))


@pytest.mark.parametrize("spec", [s for n in LAUNCHES for s in LAUNCHES[n]])
def test_matches_plain_trainer(runs, spec, tmp_path):
    family, pp, dp, *flags = spec.split(":")
    flags = set(flags[0].split(",")) if flags else set()
    d, res = _result(runs, spec)
    assert res["num_stages"] == int(pp) and res["dp_size"] == int(dp)
    ref_losses, ref_sd = _reference(family, int(dp), 2 if "ga2" in flags else 1, 1.0 if "clip" in flags else 0.0,
                                    tmp_path)
    losses = [h["loss"] for h in res["log_history"] if "loss" in h]
    assert len(losses) == W.STEPS
    assert losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-5)
    _compare_weights(_load(os.path.join(d, "final.safetensors")), ref_sd)
    # the callback's keys, sane on every log step
    for h in (h for h in res["log_history"] if "loss" in h):
        for s in range(int(pp)):
            assert h[f"rannc/stage{s}/peak_mem_gib"] > 0 and h[f"rannc/stage{s}/mem_gib"] > 0
            assert h[f"rannc/stage{s}/tokens_per_s"] > 0
        assert h["rannc/tokens_per_s"] > 0 and h["rannc/samples_per_s"] > 0 and h["rannc/step_time_s"] > 0
        assert 0.0 <= h["rannc/bubble_fraction"] < 1.0
        if int(dp) > 1:
            assert h["rannc/stage1/dp1/peak_mem_gib"] > 0
    assert os.path.isfile(os.path.join(d, "rannc_stats.json"))
    summary = json.load(open(os.path.join(d, "rannc_stats.json")))
    assert [s["stage"] for s in summary["stages"]] == list(range(int(pp)))


def test_tensorboard_keys(runs):
    d, _ = _result(runs, LAUNCHES[2][0])
    tb = tb_scalars(d)
    for key in ("train/rannc/stage0/peak_mem_gib", "train/rannc/stage1/tokens_per_s", "train/rannc/bubble_fraction",
                "train/rannc/step_time_s", "train/loss"):
        assert key in tb and len(tb[key]) == W.STEPS, (key, sorted(tb))
    assert all(0 <= v < 1 for v in tb["train/rannc/bubble_fraction"])


def test_save_from_pretrained_round_trip(runs):
    from transformers import AutoModelForCausalLM

    d, _ = _result(runs, LAUNCHES[2][0])
    saved = os.path.join(d, "saved")
    assert os.path.isfile(os.path.join(saved, "config.json"))
    assert os.path.isfile(os.path.join(saved, "model.safetensors"))
    keys = _load(os.path.join(saved, "model.safetensors")).keys()
    assert not ({"lm_head.weight", "transformer.wte.weight"} <= set(keys)), "tied weight stored twice"
    model = AutoModelForCausalLM.from_pretrained(saved).eval()
    batch = ListDataset("gpt2", 4, seed=99).rows
    b = {k: torch.stack([r[k] for r in batch]) for k in batch[0] if k != "labels"}
    with torch.no_grad():
        logits = model(**b).logits
    ref = _load(os.path.join(d, "saved_logits.safetensors"))["logits"]
    assert torch.equal(logits, ref)


def test_resume_equals_uninterrupted(runs):
    d, res = _result(runs, LAUNCHES[2][0])
    full = _load(os.path.join(d, "final.safetensors"))
    resumed = _load(os.path.join(d, "resumed.safetensors"))
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    a = [h["loss"] for h in res["log_history"] if "loss" in h][2:]
    b = [h["loss"] for h in res["resume_log_history"] if "loss" in h][-2:]
    assert a == b


def test_eval_and_predict(runs):
    d, res = _result(runs, LAUNCHES[2][0])
    evals = [h for h in res["log_history"] if "eval_loss" in h]
    assert len(evals) == 2 and all(h["eval_loss"] > 0 for h in evals)
    assert evals[0]["eval_n_eval"] == 8.0  # every eval sample exactly once
    assert res["predict_shape"][0] == 8
    # the logits of predict() equal the trained model run in one process
    from transformers import GPT2LMHeadModel  # noqa: F401

    model = tiny_model("gpt2")
    model.load_state_dict(_load(os.path.join(d, "final.safetensors")), strict=False)
    model.tie_weights()
    model.eval()
    rows = ListDataset("gpt2", 8, seed=7).rows
    b = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    with torch.no_grad():
        out = model(**b)
    got = _load(os.path.join(d, "predictions.safetensors"))["logits"]
    assert torch.allclose(got, out.logits, atol=1e-5)
    assert res["predict_metrics"]["test_loss"] == pytest.approx(float(out.loss), rel=1e-5)
