"""The bad-input catalogue: each case asserts the exception type, that the message says what is wrong
AND how to fix it, and that nothing already saved (a verified checkpoint, a plan file, a config file)
was touched (every file's sha256 is the same after the case).

In one process, no subprocess; the distributed cases use a one-rank process group.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest
import torch
import torch.nn as nn

import rannc_hf
from rannc_hf.errors import (CaptureError, CheckpointError, ConfigError, OffloadError, PlanDoesNotFitError,
                             PlanMismatchError, RanncError, ShapeMismatchError)

CASES: list[str] = []      # filled as the tests run; docs/reliability.md counts them


class MLP(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(4))

    def forward(self, x, y):
        for lin in self.layers:
            x = torch.tanh(lin(x))
        return ((x - y) ** 2).mean()


def _batch(b=4, w=16):
    return {"x": torch.randn(b, w), "y": torch.randn(b, w)}


def _digests(root) -> dict:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """What a user already has on disk: a verified checkpoint, a plan file (2 stages) and a config."""
    from rannc_hf.capture import capture
    from rannc_hf.planner.plan import Plan
    from rannc_hf.reliability import save_checkpoint

    root = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_checkpoint((model, opt), root / "ckpt", step=7)
    g = capture(MLP(), {"x": torch.randn(2, 16), "y": torch.randn(2, 16)})
    from rannc_hf.runtime.planning import fallback_cuts

    Plan.from_cuts(g, fallback_cuts(g, 2), num_microbatches=2).save(root / "plan_2proc.json")
    Plan.from_cuts(g, [], num_microbatches=2).save(root / "plan_1proc.json")
    (root / "rannc.yaml").write_text("num_stages: 2\nnum_microbatches: 2\n")
    return root


@pytest.fixture(autouse=True)
def untouched(saved, request):
    before = _digests(saved)
    yield
    assert _digests(saved) == before, "a bad input damaged files that were already saved"
    CASES.append(request.node.name)


@pytest.fixture
def one_rank():
    """A one-rank process group for RanncModule (torn down afterwards so other tests see none)."""
    import torch.distributed as dist

    was = dist.is_initialized()
    yield
    if dist.is_initialized() and not was:
        dist.destroy_process_group()


def _rm(config, batch=None, model=None):
    model = model or MLP()
    return rannc_hf.RanncModule(model, torch.optim.SGD(model.parameters(), lr=0.1), config=config,
                                example_batch=batch if batch is not None else _batch())


# ---- configuration -------------------------------------------------------------------------------
def test_01_mistyped_config_key(saved, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'num_stage' \(did you mean 'num_stages'\?\); valid keys: "):
        rannc_hf.RanncConfig.from_dict({"num_stage": 2})
    p = tmp_path / "typo.yaml"
    p.write_text("num_stages: 2\nmicrobatches: 4\n")
    with pytest.raises(ConfigError, match=r"config file .*typo.yaml.: unknown key 'microbatches' \(did you mean 'num_microbatches'\?\)"):
        rannc_hf.RanncConfig.from_yaml(p)


def test_02_wrong_value_type():
    with pytest.raises(ConfigError, match=r"config key 'num_stages': expected a positive integer or null, got 'two'"):
        rannc_hf.RanncConfig(num_stages="two")
    with pytest.raises(ConfigError, match=r"config key 'schedule': 'pipedream' is not one of auto, gpipe, 1f1b"):
        rannc_hf.RanncConfig(schedule="pipedream")
    with pytest.raises(ConfigError, match=r"config key 'collective_timeout_s': expected a number in \[1.0"):
        rannc_hf.RanncConfig(collective_timeout_s=0)


def test_03_bad_size_strings():
    assert rannc_hf.RanncConfig(gpu_memory="24 GB").gpu_memory_bytes == 24 * 10**9
    assert rannc_hf.RanncConfig(gpu_memory="24GiB").gpu_memory_bytes == 24 * 2**30
    with pytest.raises(ConfigError, match=r"gpu_memory': cannot read 'lots' as a size; write e.g. '24GiB', '80GB'"):
        rannc_hf.RanncConfig(gpu_memory="lots")
    with pytest.raises(ConfigError, match=r"host_memory: must be positive"):
        rannc_hf.Cluster(host_memory=-5)


def test_04_missing_and_invalid_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope.yaml' does not exist; pass the path of a YAML file"):
        rannc_hf.RanncConfig.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_stages: [2\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML"):
        rannc_hf.RanncConfig.from_yaml(bad)


def test_05_launch_with_bad_config_exits_2(tmp_path, capsys):
    from rannc_hf.integrations.launch import main

    p = tmp_path / "rannc.yaml"
    p.write_text("num_stage: 2\n")
    script = tmp_path / "train.py"
    script.write_text("raise SystemExit('must not start')\n")
    with pytest.raises(SystemExit) as e:
        main(["--rannc_config", str(p), "--num_processes", "1", str(script)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "rannc-hf launch: error:" in err and "num_stage" in err and "did you mean 'num_stages'" in err


# ---- plans -----------------------------------------------------------------------------------------
def test_06_plan_file_for_another_world_size(saved, one_rank):
    cfg = rannc_hf.RanncConfig(plan_file=str(saved / "plan_2proc.json"), precision="fp32")
    with pytest.raises(PlanMismatchError, match=r"this plan needs 2 processes .* but 1 were launched. Launch with "
                                                r"--nproc_per_node/--num_processes 2, or delete the plan file"):
        _rm(cfg)


def test_07_plan_file_for_another_model(saved, one_rank):
    cfg = rannc_hf.RanncConfig(plan_file=str(saved / "plan_1proc.json"), precision="fp32")
    with pytest.raises(PlanMismatchError, match=r"made for another model or batch shape \(MLP, \d+ ops.*the current one "
                                                r"is MLP.*Delete the plan file or point plan_file elsewhere"):
        _rm(cfg, batch=_batch(4, 8), model=MLP(8))


def test_08_corrupt_plan_file(tmp_path):
    from rannc_hf.planner.plan import Plan

    p = tmp_path / "plan.json"
    p.write_text('{"stages": [')
    with pytest.raises(PlanMismatchError, match=r"is not valid JSON .*delete it to re-plan"):
        Plan.load(p)


# ---- models and batches ------------------------------------------------------------------------------
class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:                       # branches on a tensor's value
            return self.lin(x).pow(2).mean()
        return self.lin(-x).pow(2).mean()


class ReturnsDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return {"hidden": [self.lin(x)], "note": "no loss"}


class ReturnsLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)


def _capture(model, batch):
    from rannc_hf.capture import capture

    return capture(model, batch)


def test_09_data_dependent_control_flow():
    with pytest.raises(CaptureError, match=r"control flow depends on tensor values.*Rewrite it with torch.where / torch.cond"):
        _capture(DataDependent(), {"x": torch.randn(4, 4)})


def test_10_outputs_not_tensors():
    with pytest.raises(CaptureError, match=r"ReturnsDict's output has no scalar loss.*return a scalar loss tensor / an "
                                           r"object with a `.loss` field"):
        _capture(ReturnsDict(), {"x": torch.randn(4, 4)})


def test_11_no_loss():
    with pytest.raises(CaptureError, match=r"ReturnsLogits's output has no scalar loss.*pass labels \(Hugging Face models\)"):
        _capture(ReturnsLogits(), {"x": torch.randn(4, 4)})


def test_12_batch_without_batch_dimension():
    with pytest.raises(CaptureError, match=r"input 'x' is a 0-d tensor: every tensor input needs a batch dimension.*"
                                           r"shape \[batch, \.\.\.\]"):
        _capture(ReturnsLogits(), {"x": torch.tensor(3.0)})


def test_13_inputs_with_different_batch_sizes():
    with pytest.raises(CaptureError, match=r"inputs disagree on the batch size \(dim 0\): \{'x': 4, 'y': 2\}.*must have the "
                                           r"batch as its first dimension"):
        _capture(MLP(), {"x": torch.randn(4, 16), "y": torch.randn(2, 16)})


def test_14_batch_not_divisible_into_microbatches(one_rank):
    cfg = rannc_hf.RanncConfig(num_microbatches=3, precision="fp32")
    with pytest.raises(ShapeMismatchError, match=r"batch of 4 samples cannot be split into 1 replica\(s\) x 3 microbatches; "
                                                 r"use a batch size that is a multiple of 3.*drop_last=True"):
        _rm(cfg)
    from rannc_hf.reliability import trim_batch

    with pytest.raises(ShapeMismatchError, match=r"not a multiple of 3.*drop_last=True"):
        trim_batch(_batch(4), 3, policy="error")
    assert trim_batch(_batch(4), 3)["x"].shape[0] == 3          # the bucketing helper's default: drop the rest


# ---- memory -----------------------------------------------------------------------------------------
def test_15_gpu_memory_cap_too_small():
    from rannc_hf.zoo import make

    model, batch = make("gpt2", 4)
    with pytest.raises(PlanDoesNotFitError, match=r"(?s)does not fit 2 GPU\(s\) of 1.00 KiB.*It needs at least [0-9.]+ [KMG]iB "
                                                  r"per GPU with 2 GPU\(s\).*Fix:"):
        rannc_hf.plan(model, batch, cluster=rannc_hf.Cluster(num_gpus=2, gpu_memory="1KiB"),
                      config=rannc_hf.RanncConfig(precision="fp32"))


def test_16_host_memory_too_small_for_offload(monkeypatch):
    from rannc_hf.offload import store

    monkeypatch.setattr(store, "available_host_memory", lambda: 2**30)
    with pytest.raises(OffloadError, match=r"offload mode 'all' needs 8.00 GiB of host memory \(params 8.00 GiB\) but only "
                                           r"1.00 GiB is available.*To fit: use offload='params'"):
        store.check_host_memory(8 * 2**30, {"params": 8 * 2**30}, "all")


def test_17_unsupported_optimizer_for_offload():
    from rannc_hf.offload.optimizer import check_supported

    m = MLP()
    with pytest.raises(OffloadError, match=r"offload cannot run optimizer torch.optim.lbfgs.LBFGS.*Supported: Adam, AdamW.*"
                                           r"or offload='none'"):
        check_supported(torch.optim.LBFGS(m.parameters()))


# ---- checkpoints and data ---------------------------------------------------------------------------
def test_18_checkpoint_from_a_different_model(saved):
    from rannc_hf.reliability import load_checkpoint

    other = MLP(8)
    with pytest.raises(CheckpointError, match=r"belongs to a different model: .*'layers.0.bias': \[16\] float32 in the "
                                              r"checkpoint vs \[8\] float32 here.*Point the run at the checkpoint directory"):
        load_checkpoint(other, saved / "ckpt")
    assert torch.equal(other.layers[0].bias, other.layers[0].bias)      # and nothing was loaded into it


def test_19_corrupted_checkpoint(saved, tmp_path):
    from rannc_hf.reliability import load_checkpoint

    copy = tmp_path / "ckpt"
    shutil.copytree(saved / "ckpt", copy)
    f = copy / "checkpoint-00000007" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"file 'model.safetensors' sha256 is [0-9a-f]{16}\.\.\., the manifest expects"):
        load_checkpoint(MLP(), copy / "checkpoint-00000007")
    with pytest.raises(CheckpointError, match=r"none of the 1 checkpoint\(s\) under .* verifies.*Restore one from a backup, "
                                              r"or move them away"):
        load_checkpoint(MLP(), copy)                 # never silently restart from scratch


def test_20_missing_dataset_file(tmp_path):
    from rannc_hf.data.errors import DataFileNotFoundError
    from rannc_hf.data.pipeline import load_text_dataset

    with pytest.raises(DataFileNotFoundError, match=r"--train_file '.*missing.txt' does not exist"):
        load_text_dataset(train_file=str(tmp_path / "missing.txt"))


def test_21_out_of_memory_in_a_training_step(one_rank, monkeypatch):
    """A CUDA out-of-memory error inside a step (torch's pipelining wraps a stage backward's in a RuntimeError)
    comes out as PlanDoesNotFitError naming the plan's prediction, the offload engine's GPU-stepped blocks and
    the settings that give memory back; other errors pass through unchanged. The error is raised by a stub."""
    from types import SimpleNamespace

    from rannc_hf.runtime.oom import explain_oom

    from rannc_hf.zoo import loss_of, make

    model, batch = make("gpt2", 4)
    m = rannc_hf.RanncModule(model, torch.optim.AdamW(model.parameters()), example_batch=batch,
                             config=rannc_hf.RanncConfig(num_stages=1, offload="all", compile="false"))
    loss_of(m(**batch)).backward()   # builds the pipeline and the engine
    pipe = m._primary.pipe

    def oom(*a, **k):
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.54 GiB.")
        except torch.OutOfMemoryError as e:
            raise RuntimeError("Failed to run stage backward") from e

    monkeypatch.setattr(pipe, "run", oom)
    with pytest.raises(PlanDoesNotFitError, match=r"(?s)CUDA ran out of memory during a training step: CUDA out of "
                                                  r"memory\. Tried to allocate 1\.54 GiB.*The plan predicted a peak of "
                                                  r".*To fit, set one of: .*mem_margin: 0\.25"):
        m(**batch)
    monkeypatch.setattr(pipe, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="something else"):
        m(**batch)
    # with GPU-stepped offload blocks: the count to try next
    so = m._offload
    m._offload = SimpleNamespace(engine=SimpleNamespace(device_step_blocks=12, gpu_step_rest=True,
                                                        stepped_in_backward=lambda: 3))
    assert explain_oom(m, RuntimeError("y")) is None
    try:
        raise RuntimeError("wrapped") from torch.OutOfMemoryError("CUDA out of memory")
    except RuntimeError as e:
        err = explain_oom(m, e)
    assert "12 GPU-stepped block(s) and the rest group" in str(err) and "gpu_step_blocks: 6" in str(err)
    assert "restart from the last checkpoint" in str(err)
    m._offload = so


def test_zz_catalogue_size():
    assert len([c for c in CASES if c.startswith("test_") and c[5:7].isdigit()]) >= 15
    assert all(issubclass(e, RanncError) for e in (CaptureError, CheckpointError, ConfigError, OffloadError,
                                                    PlanDoesNotFitError, PlanMismatchError, ShapeMismatchError))
