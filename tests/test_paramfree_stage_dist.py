"""A pipeline stage without trainable parameters (a loss alone, parameter-free ops in the middle or in front)
trains like the others: it has nothing to step, but runs the same schedule and collectives as every rank.

Before the fix such a rank took the forward-only path (``backward = grad enabled and this rank has params``)
while the others ran the training schedule: the pipeline hung until the collective timeout.
The workers (tests/paramfree_stage_worker.py) run under torchrun (gloo, CPU) with hand-built plans; this file
compares against single-process training: AdamW(lr=1e-3), 3 steps of a batch of 8 split into 4 contiguous
chunks, loss = mean of chunk losses, clip_grad_norm_(1.0).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from safetensors.torch import load_file


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from dist_helpers import accumulated_reference, read_case, torchrun  # noqa: E402
from paramfree_stage_worker import make_model  # noqa: E402

WORKER = os.path.join(HERE, "paramfree_stage_worker.py")
BATCH, STEPS, LR, CHUNKS = 8, 3, 1e-3, 4
RTOL, ATOL = 1e-5, 1e-6

WS2 = ["cnn_pp2_losslast_1f1b", "cnn_pp2_losslast_gpipe", "forkjoin_pp2_losslast_1f1b", "prenorm_pp2_freefirst_1f1b"]
WS4 = ["cnn_pp4_losslast_1f1b", "cnn_pp4_freemiddle_gpipe", "cnn_pp2_dp2_losslast_1f1b"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("paramfree"))
    torchrun(WORKER, d, "ws2", 2, timeout=300)
    torchrun(WORKER, d, "ws4", 4, timeout=300)
    return d


def reference(fam: str):
    model, bf = make_model(fam, 0)
    losses, norms = accumulated_reference(model, bf, STEPS, BATCH, CHUNKS, LR)
    return model, losses, norms


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", WS2 + WS4)
def test_parameter_free_stage_trains_like_single_process(out, name):
    info = read_case(out, name)
    fam = name.split("_")[0]
    model, ref_losses, ref_norms = reference(fam)
    stages = len(info["cuts"]) + 1
    for s in info["free_stages"]:                         # the stage really holds no parameters on its ranks
        assert all(n == 0 for r, n in enumerate(info["local_params"]) if r % stages == s), info["local_params"]
    torch.testing.assert_close(torch.tensor(info["losses"]), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.tensor(info["norms"]), torch.tensor(ref_norms), rtol=RTOL, atol=ATOL)
    named = dict(model.named_parameters())
    assert info["opt_state_keys"] == sorted(named)       # optimizer state gathered from every rank
    got = load_file(os.path.join(out, name + ".safetensors"))
    ref_sd = model.state_dict()
    assert set(got) == set(ref_sd)
    # dp>1: BatchNorm running statistics are per replica (as in test_runtime_dist): compare parameters only
    keys = named if "dp2" in name else ref_sd
    for k in keys:
        r = ref_sd[k]
        if r.is_floating_point():
            torch.testing.assert_close(got[k], r, rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{name} {k}: {m}")
