"""End to end: an ordinary Accelerate CLM script (tests/scripts/accel_clm.py) with only the
Accelerator swapped, started with real `rannc-hf launch` subprocesses on CPU/gloo.

* 2 processes (pp=2) and 4 processes (pp=2 x dp=2) match the single-process plain-Accelerator run
  (fp32): every step's loss and the final weights within 1e-5 relative.
* save_state -> a new launch -> load_state resumes to the same result.
* save_model output loads with GPT2LMHeadModel.from_pretrained in this (plain) process.
* a bad config reaching the ranks (bypassing rannc-hf launch's own check) fails every rank fast.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

# the real console script (fallback: the same entry point as a module)
LAUNCH = ([shutil.which("rannc-hf"), "launch"] if shutil.which("rannc-hf")
          else [sys.executable, "-m", "rannc_hf.integrations.launch"])
SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "accel_clm.py")
REL = 1e-5
TIMEOUT = 240


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANNC_HF_", "ACCELERATE_"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    env.update(extra)
    return env


def _run(cmd, cwd, env, timeout=TIMEOUT):
    t = time.time()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r, time.time() - t


def _launch(tmp, out, nproc, *script_args):
    cmd = [*LAUNCH, "--rannc_config", str(tmp / "rannc.yaml"),
           "--num_processes", str(nproc), "--main_process_port", "0", SCRIPT, "--output_dir", str(out),
           *script_args]
    return _run(cmd, tmp, _env())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accel")
    (tmp / "rannc.yaml").write_text("num_stages: 2\nnum_microbatches: 2\nschedule: 1f1b\n")
    times = {}
    _, times["ref"] = _run([sys.executable, SCRIPT, "--output_dir", str(tmp / "ref")], tmp, _env(ACCEL_CLM_PLAIN="1"))
    _, times["pp2"] = _launch(tmp, tmp / "pp2", 2, "--checkpointing_steps", "3")
    _, times["pp2dp2"] = _launch(tmp, tmp / "pp2dp2", 4, "--per_device_train_batch_size", "4",
                                 "--per_device_eval_batch_size", "4")
    print("run times (s):", {k: round(v, 1) for k, v in times.items()})
    return tmp


def _metrics(d):
    with open(d / "metrics.json") as f:
        return json.load(f)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_same_training(a, b, rel=REL):
    ma, mb = _metrics(a), _metrics(b)
    assert len(ma["history"]) == len(mb["history"]) == 8
    for x, y in zip(ma["history"], mb["history"]):
        assert x["step"] == y["step"]
        assert abs(x["loss"] - y["loss"]) <= rel * abs(x["loss"]), (x, y)
        assert abs(x["lr"] - y["lr"]) <= 1e-12 + rel * abs(x["lr"]), (x, y)
        assert abs(x["grad_norm"] - y["grad_norm"]) <= rel * abs(x["grad_norm"]), (x, y)
    assert abs(ma["eval_loss"] - mb["eval_loss"]) <= rel * abs(ma["eval_loss"])
    wa, wb = _weights(a / "final.safetensors"), _weights(b / "final.safetensors")
    assert set(wa) == set(wb)
    diff = sum(float(((wa[k].double() - wb[k].double()) ** 2).sum()) for k in wa) ** 0.5
    norm = sum(float((wa[k].double() ** 2).sum()) for k in wa) ** 0.5
    assert diff <= rel * norm, f"final weights: relative error {diff / norm:.2e}"
    for k in wa:
        # per tensor relative to its norm; small tensors (biases start at 0, and Adam turns fp noise in
        # the theoretically-zero key-bias gradient into lr-sized steps) relative to 1
        d = float((wa[k].double() - wb[k].double()).norm())
        assert d <= rel * max(1.0, float(wa[k].double().norm())), f"{k}: error {d:.2e}"


def test_pp2_matches_single_process(runs):
    m = _metrics(runs / "pp2")
    assert m["stages"] == 2 and m["num_processes"] == 1 and m["mixed_precision"] == "no"
    _assert_same_training(runs / "ref", runs / "pp2")


def test_pp2_dp2_matches_single_process(runs):
    m = _metrics(runs / "pp2dp2")
    assert m["stages"] == 2 and m["num_processes"] == 2       # num_processes = data-parallel replicas
    _assert_same_training(runs / "ref", runs / "pp2dp2")


def test_save_state_layout(runs):
    ck = runs / "pp2" / "step_3"
    files = set(os.listdir(ck))
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
            "random_states_1.pkl", "history.json"} <= files
    assert not [f for f in os.listdir(runs / "pp2") if "tmp" in f]          # atomic: no temp dirs left
    opt = torch.load(ck / "optimizer.bin", weights_only=True)
    # the FULL optimizer state (every parameter of both stages), keyed by parameter name
    assert "transformer.h.0.attn.c_attn.weight" in opt["state"] and "transformer.h.3.mlp.c_fc.weight" in opt["state"]


def test_resume_from_checkpoint(runs):
    out = runs / "pp2_resumed"
    # a new launch that also prepares the model on its own first (optimizer/dataloaders after)
    _launch(runs, out, 2, "--resume_from_checkpoint", str(runs / "pp2" / "step_3"), "--prepare_separately")
    _assert_same_training(runs / "pp2", out, rel=1e-6)


def test_save_model_loads_with_from_pretrained(runs):
    from transformers import GPT2LMHeadModel

    d = runs / "pp2" / "model"
    assert {"config.json", "model.safetensors"} <= set(os.listdir(d))
    model = GPT2LMHeadModel.from_pretrained(str(d)).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    ref = GPT2LMHeadModel.from_pretrained(str(d)).eval()
    ref.load_state_dict(_weights(runs / "ref" / "final.safetensors"), strict=False)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    trained = _weights(runs / "pp2" / "final.safetensors")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, trained[k], rtol=0, atol=0)


def test_bad_config_on_ranks_fails_fast(tmp_path):
    """Bypass rannc-hf launch's own check: every rank raises ConfigError in RanncAccelerator()."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_stages: 2\nmicrobatches: 4\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
           SCRIPT, "--output_dir", str(tmp_path / "out")]
    t = time.time()
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(RANNC_HF_CONFIG=str(bad), ACCELERATE_USE_CPU="1"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and time.time() - t < 90
    err = r.stdout + r.stderr
    assert "ConfigError" in err and "'microbatches'" in err and "did you mean 'num_microbatches'" in err
    assert "valid keys: num_stages" in err
