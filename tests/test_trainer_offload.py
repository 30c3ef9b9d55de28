"""RanncTrainer with offload in one process trains exactly like the plain Trainer (fp32, CPU).

The Trainer clears gradients with ``model.zero_grad()``, not ``optimizer.zero_grad()``: with offload the
gradients live in the engine's host buffers, so RanncModule.zero_grad must clear them too (they used to
add up across steps, and every forward waited on the engine once per parameter to set them aside)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))


def _train(tmp, rannc_mode, max_grad_norm=1.0, **rannc_kw):
    import torch
    from transformers import Trainer, TrainingArguments
    from trainer_common import ListDataset, tiny_model

    import rannc_hf

    torch.manual_seed(0)
    model = tiny_model("gpt2")
    kw = dict(output_dir=str(tmp), per_device_train_batch_size=4, max_steps=4, logging_steps=1, learning_rate=1e-3,
              lr_scheduler_type="constant", max_grad_norm=max_grad_norm, report_to=[], save_strategy="no", disable_tqdm=True,
              use_cpu=True, seed=0, dataloader_drop_last=True)
    data = ListDataset("gpt2", 16)
    if rannc_mode is None:
        trainer = Trainer(model=model, args=TrainingArguments(**kw), train_dataset=data)
        trainer.model_accepts_loss_kwargs = False  # mean losses, as RanncModule computes them
    else:
        cfg = rannc_hf.RanncConfig(num_stages=1, num_microbatches=1, precision="fp32", offload=rannc_mode,
                                   compile="false", **rannc_kw)
        trainer = rannc_hf.RanncTrainer(model=model, args=rannc_hf.RanncTrainingArguments(rannc_config=cfg, **kw),
                                        train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, trainer


@pytest.mark.parametrize("mode", ["optimizer", "all"])
def test_trainer_with_offload_matches_plain_trainer(tmp_path, mode):
    import torch
    from rannc_hf.offload.engine import OffloadEngine

    ref_losses, ref_sd, _ = _train(tmp_path / "plain", None)
    waits = {"n": 0}
    orig = OffloadEngine.grad_of

    def counting(self, p):
        waits["n"] += 1
        return orig(self, p)

    OffloadEngine.grad_of = counting
    try:
        losses, sd, trainer = _train(tmp_path / "rannc", mode)
    finally:
        OffloadEngine.grad_of = orig
    assert trainer.rannc_module._offload is not None, "offload was not engaged"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
    for k in ref_sd:
        torch.testing.assert_close(sd[k], ref_sd[k], rtol=1e-5, atol=1e-5, msg=k)
    assert waits["n"] == 0, f"{waits['n']} per-parameter engine reads during training (each one a wait on CUDA)"
    # the stats callback's summary reports the engine per step after the first (which builds), as it counted them
    import json

    off = json.loads((tmp_path / "rannc" / "rannc_stats.json").read_text())["offload"]
    st, first = trainer.rannc_module.offload_stats(), trainer._rannc_stats._offload_first
    assert st["steps"] == 4 and first["steps"] == 1 and off["steps"] == 3 and off["mode"] == mode
    assert off["host_gib"] > 0 and off["host_step_threads"] >= 1
    assert off["h2d_gb_per_step"] == pytest.approx((st["h2d_bytes"] - first["h2d_bytes"]) / 3 / 1e9)
    assert off["host_step_ms"] == pytest.approx((st["step_time_s"] - first["step_time_s"]) / 3 * 1e3)
    assert 0 <= off["cpu_block_refill_ms"] <= off["cpu_block_step_ms"]
    assert off["worker_threads"] <= 1 and off["worker_overlap_ms"] == 0


def test_trainer_with_step_in_backward_matches_plain_trainer(tmp_path, monkeypatch):
    """rannc config step_in_backward: the offloaded blocks step inside backward (the CPU stands in for CUDA's
    async pipeline); without clipping the Trainer trains as the plain one. With clipping or Trainer-side
    accumulation it is refused up front, saying what to change."""
    import functools

    import torch
    from rannc_hf.offload.engine import OffloadEngine
    from rannc_hf.runtime import offload_stage

    monkeypatch.setattr(offload_stage, "OffloadEngine", functools.partial(OffloadEngine, async_step=True))
    ref_losses, ref_sd, _ = _train(tmp_path / "plain", None, max_grad_norm=0.0)
    losses, sd, trainer = _train(tmp_path / "rannc", "all", max_grad_norm=0.0, step_in_backward=True)
    eng = trainer.rannc_module._offload.engine
    assert eng.stats()["early_block_steps"] == eng.num_blocks * 4
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
    for k in ref_sd:
        torch.testing.assert_close(sd[k], ref_sd[k], rtol=1e-5, atol=1e-6, msg=k)
    with pytest.raises(ValueError, match="max_grad_norm=0 \\(now 1.0\\)"):
        _train(tmp_path / "clip", "all", max_grad_norm=1.0, step_in_backward=True)


@pytest.mark.parametrize("nan_filter", [None, True])
def test_trainer_logs_a_diverged_loss_as_it_is(tmp_path, nan_filter):
    """RanncTrainingArguments defaults logging_nan_inf_filter to False: the stock filter reads every step's loss on
    the host (two device syncs a step) and logs the running mean in place of a NaN. True restores it."""
    import math

    import torch
    from trainer_common import ListDataset, tiny_model

    import rannc_hf

    torch.manual_seed(0)
    cfg = rannc_hf.RanncConfig(num_stages=1, num_microbatches=1, precision="fp32", compile="false")
    kw = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
              learning_rate=1e30, lr_scheduler_type="constant", max_grad_norm=0, report_to=[], save_strategy="no",
              disable_tqdm=True, use_cpu=True, seed=0, dataloader_drop_last=True)
    if nan_filter is not None:
        kw["logging_nan_inf_filter"] = nan_filter
    args = rannc_hf.RanncTrainingArguments(rannc_config=cfg, **kw)
    assert args.logging_nan_inf_filter is bool(nan_filter)
    trainer = rannc_hf.RanncTrainer(model=tiny_model("gpt2"), args=args, train_dataset=ListDataset("gpt2", 16))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert math.isfinite(losses[0])
    if nan_filter:
        assert all(math.isfinite(x) for x in losses), losses      # hidden behind the running mean
    else:
        assert not all(math.isfinite(x) for x in losses[1:]), losses   # the divergence shows
