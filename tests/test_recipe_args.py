"""Recipe arguments that need no training run to check, and the divergence guard (one short CPU run)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "recipes"))


@pytest.mark.parametrize("kind,config,lr", [("gpt", "gpt2-tiny", 1e-3), ("gpt", "gpt2-base", 6e-4),
                                            ("gpt", "gpt2-1.3b", 2e-4), ("gpt", "llama-13b", 1e-4),
                                            ("gpt", "gpt2-100b", 6e-5), ("bert", "bert-large", 1e-4),
                                            ("bert", "bert-tiny", 1e-3)])
def test_learning_rate_follows_model_width(kind, config, lr):
    from common import parse_args

    assert parse_args(kind, ["--model_config", config]).learning_rate == pytest.approx(lr)
    assert parse_args(kind, ["--model_config", config, "--learning_rate", "0.01"]).learning_rate == 0.01


def test_diverged_loss_stops_with_a_clear_error(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", RANNC_HF_CACHE=str(tmp_path / "cache"))
    env.pop("RANNC_HF_CONFIG", None)
    cmd = [sys.executable, os.path.join(ROOT, "recipes", "gpt", "pretrain.py"), "--max_steps", "10", "--log_every", "5",
           "--eval_every", "0", "--corpus_max_chars", "200000", "--output_dir", str(tmp_path / "out"), "--no_plot",
           "--learning_rate", "inf"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0
    assert "training diverged: the loss is nan at step 5" in proc.stderr, proc.stderr[-3000:]
    assert "lower --learning_rate" in proc.stderr


def test_step_in_backward_with_clipping_is_refused_before_training(tmp_path):
    """A rannc config with step_in_backward and the recipe's default clipping: refused up front, saying which flags
    to pass, before any data or model is built."""
    from common import parse_args
    from loop import train

    cfg = tmp_path / "rannc.yaml"
    cfg.write_text("offload: all\nstep_in_backward: true\n")
    args = parse_args("gpt", ["--rannc_config", str(cfg), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match=r"--max_grad_norm 0 \(now 1.0\)"):
        train(args)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_trainer_path_with_workers_and_profile(tmp_path):
    """``--trainer`` runs the recipe through RanncTrainer; collator workers and the step profiler go with it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", RANNC_HF_CACHE=str(tmp_path / "cache"))
    env.pop("RANNC_HF_CONFIG", None)
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "recipes", "gpt", "pretrain.py"), "--trainer", "--max_steps", "12",
           "--log_every", "4", "--eval_every", "0", "--eval_batches", "4", "--corpus_max_chars", "200000",
           "--output_dir", str(out), "--no_plot", "--profile_steps", "2", "--profile_start", "3",
           "--dataloader_num_workers", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((out / "history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert "over 2 training step(s), 3..4" in (out / "profile" / "steps_3-4.txt").read_text()
    assert (out / "profile" / "steps_3-4.json.gz").exists()
    from common import parse_args
    rows = 4 * parse_args("gpt", []).per_device_batch_size   # --eval_batches 4, as the loop reads them
    assert f"over {rows} validation sequences" in proc.stdout, proc.stdout[-2000:]


def test_eval_batches_below_one_is_refused():
    from common import parse_args

    from rannc_hf.data.pipeline import DataError

    with pytest.raises(DataError, match="--eval_batches must be >= 1, got 0"):
        parse_args("gpt", ["--eval_batches", "0"])


@pytest.mark.parametrize("flag", ["--profile_steps", "--profile_start", "--dataloader_num_workers"])
def test_negative_profile_and_loader_flags_are_refused(flag):
    from common import parse_args

    from rannc_hf.data.pipeline import DataError

    with pytest.raises(DataError, match=f"{flag} must be >= 0, got -1"):
        parse_args("gpt", [flag, "-1"])
    assert parse_args("gpt", []).dataloader_num_workers is None   # None: 2 on a GPU, 0 on a CPU


@pytest.mark.parametrize("flags,gpu,fused", [([], True, True), ([], False, None), (["--no-adam_fused"], True, None),
                                             (["--adam_fused"], False, True)])
def test_loop_adamw_kernel_matches_the_trainers_default(monkeypatch, flags, gpu, fused):
    """On a GPU the loop's AdamW is fused like RanncTrainer's default (with offload the engine steps GPU-kept
    blocks with it); ``--no-adam_fused`` gives torch the choice, and the Trainer path the same (``adamw_torch``)."""
    import torch
    from common import parse_args
    from loop import _optimizer, _trainer_args

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    args = parse_args("gpt", ["--model_config", "gpt2-tiny"] + flags)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = _optimizer(args, model)
    assert [g["fused"] for g in opt.param_groups] == [fused, fused]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]   # decay: the weight matrix; the rest not
    if "--no-adam_fused" in flags:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # the arguments would pick a CUDA device
        assert _trainer_args(args).optim == "adamw_torch"


@pytest.mark.parametrize("flags,pinned", [([], False), (["--dataloader_pin_memory"], True),
                                          (["--no-dataloader_pin_memory"], False)])
def test_batches_are_pinned_only_when_asked(monkeypatch, flags, pinned):
    """Pinning is off by default (its thread slows an offload engine's CPU step); asked for, both paths pin and
    copy without blocking."""
    import torch
    from common import parse_args
    from loop import _pin_memory, _trainer_args

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = parse_args("gpt", ["--model_config", "gpt2-tiny"] + flags)
    assert _pin_memory(args) is pinned
    monkeypatch.setattr("loop._pin_memory", lambda a: pinned)   # the Trainer's arguments, built on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    targs = _trainer_args(args)
    assert targs.dataloader_pin_memory is pinned
    assert targs.accelerator_config.non_blocking is pinned
