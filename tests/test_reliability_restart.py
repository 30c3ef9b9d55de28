"""Restart/resume and changing shapes, end to end under torchrun (2 processes, gloo, CPU).

tests/scripts/rel_train.py trains tiny GPT-2 over 2 pipeline stages (RanncModule, 1F1B, fp32) for 8
steps; every batch has a random length in [5, 44] padded to a multiple of 32 by
``rannc_hf.reliability.pad_to_bucket`` (so 2 shapes occur; the model is re-captured per shape with the
same cuts).

* ``uninterrupted``: one run, no checkpoints. Its parameters match single-process gradient
  accumulation over the same padded microbatches (rtol 1e-5, atol 1e-6), and so do its losses:
  changing shapes train correctly over the pipeline, never hang.
* ``killed``: ``rannc-hf launch --max_restarts 1`` (accelerate's launcher, torchrun's elastic agent) with ``RANNC_HF_TEST_KILL_AT_STEP=5`` (rank 1 SIGKILLs
  itself once at step 5, checkpoints every 2 steps). Rank 0 reports a CollectiveTimeoutError naming
  the collective and rank 1, torchrun restarts both, the job resumes from checkpoint 4 (the newest
  verified one) and ends with parameters **bitwise equal** to the uninterrupted run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "rel_train.py")
ARGS = ["--bucket", "32", "--steps", "8"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANNC_HF_", "ACCELERATE_"))}
    # torch >= 2.5 shares torchrun's rendezvous store with the workers; after a restart gloo could read the
    # previous attempt's addresses ("Connection refused", pytorch issue 135712). One store per attempt:
    env.update(OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore",
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    env.update(extra)
    return env


def _torchrun(out, *extra_args, restarts=0, env=None, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(restarts), SCRIPT, str(out), *ARGS, *extra_args]
    t = time.time()
    r = subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-6000:]}")
    return r, time.time() - t


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rannc_launch(tmp, out, *extra_args, restarts=0, env=None, timeout=300):
    """The same job started the way users start it: `rannc-hf launch --max_restarts N` (accelerate's flags)."""
    cfg = tmp / "rannc.yaml"
    cfg.write_text("num_stages: 2\nschedule: 1f1b\nprecision: fp32\n")
    cmd = [sys.executable, "-m", "rannc_hf.cli", "launch", "--rannc_config", str(cfg), "--multi_gpu",
           "--num_processes", "2", "--max_restarts", str(restarts), "--main_process_port", str(_free_port()),
           "--monitor_interval", "1", SCRIPT, str(out), *ARGS, *extra_args]
    t = time.time()
    r = subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-6000:]}")
    return r, time.time() - t


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rel")
    times = {}
    _, times["uninterrupted"] = _torchrun(tmp / "full", "--save_every", "0")
    killed, times["killed"] = _rannc_launch(tmp, tmp / "kill", "--save_every", "2", restarts=1,
                                            env=_env(RANNC_HF_TEST_KILL_AT_STEP="5"))
    t = time.time()
    spec = importlib.util.spec_from_file_location("rel_train", SCRIPT)
    rel = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rel)
    os.makedirs(tmp / "ref")
    rel.reference(type("A", (), {"out": str(tmp / "ref"), "steps": 8, "bucket": 32})())
    times["reference"] = time.time() - t
    print("run times (s):", {k: round(v, 1) for k, v in times.items()})
    return tmp, killed


def _run(d):
    with open(d / "run.json") as f:
        return json.load(f)


def test_killed_rank_restarts_and_resumes_exactly(runs):
    tmp, killed = runs
    info = _run(tmp / "kill")
    assert (tmp / "kill" / ".rannc_test_killed").exists()          # the kill did happen, once
    assert info["restart"] == 1 and info["resumed_from"] == 4
    assert sorted(int(k) for k in info["losses"]) == [4, 5, 6, 7]
    log = killed.stdout + killed.stderr
    assert "CollectiveTimeoutError: rank 0: collective 'RanncModule.forward (pipeline step)" in log
    assert "rank 1" in log
    a, b = load_file(str(tmp / "kill" / "final.safetensors")), load_file(str(tmp / "full" / "final.safetensors"))
    assert set(a) == set(b)
    assert [k for k in b if not torch.equal(a[k], b[k])] == []       # bitwise equal to the uninterrupted run
    from rannc_hf.reliability import list_checkpoints, verify_checkpoint

    ck = list_checkpoints(tmp / "kill" / "ckpt")
    assert [s for s, _ in ck] == [8, 6]                               # keep=2
    for _, p in ck:
        verify_checkpoint(p)
    assert not [n for n in os.listdir(tmp / "kill" / "ckpt") if n.startswith(".")]   # no temporaries left


def test_random_lengths_pp2_match_single_process(runs):
    tmp, _ = runs
    full, ref = _run(tmp / "full"), _run(tmp / "ref")
    assert full["shapes"] >= 2                                        # several shapes really occurred
    for i, lr in enumerate(ref["losses"]):
        assert abs(full["losses"][str(i)] - lr) <= 1e-5 * abs(lr), i
    a, b = load_file(str(tmp / "full" / "final.safetensors")), load_file(str(tmp / "ref" / "final.safetensors"))
    bad = [k for k in b if not torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6)]
    assert bad == []
