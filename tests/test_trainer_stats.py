"""RanncStatsCallback with a plain transformers.Trainer in one process (one "stage")."""

import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))

pytest.importorskip("tensorboard")


def test_stats_callback_plain_trainer(tmp_path):
    import torch
    from transformers import Trainer, TrainingArguments
    from trainer_common import ListDataset, tb_scalars, tiny_model

    from rannc_hf.integrations.stats import RanncStatsCallback

    torch.set_num_threads(1)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, logging_steps=2,
                             learning_rate=1e-3, report_to=["tensorboard"],
                             save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0)
    trainer = Trainer(model=tiny_model("gpt2"), args=args, train_dataset=ListDataset("gpt2", 16))
    cb = RanncStatsCallback(peak_tflops=1.0).attach(trainer)
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert h["rannc/stage0/peak_mem_gib"] > 0
        assert h["rannc/stage0/mem_gib"] > 0
        assert h["rannc/tokens_per_s"] > 0 and h["rannc/stage0/tokens_per_s"] > 0
        assert h["rannc/samples_per_s"] > 0
        assert h["rannc/step_time_s"] > 0
        assert 0.0 <= h["rannc/bubble_fraction"] < 1.0
        assert h["rannc/tflops"] > 0 and 0 < h["rannc/mfu"] < 1
        # 4 samples x 16 tokens per step
        assert math.isclose(h["rannc/tokens_per_s"] / h["rannc/samples_per_s"], 16.0, rel_tol=1e-6)
    summary = json.loads((tmp_path / "rannc_stats.json").read_text())
    assert summary["num_stages"] == 1 and summary["steps"] == 4
    # whole-run throughput is steady state: the first step (capture, plan) is reported apart
    assert summary["totals_exclude_first_step"] and summary["totals"]["first_step_time_s"] > 0
    assert math.isclose(summary["totals"]["step_time_s"] * 3 + summary["totals"]["first_step_time_s"],
                        sum(h["rannc/step_time_s"] * 2 for h in logs), rel_tol=1e-6)
    assert summary["stages"][0]["peak_mem_gib"] > 0
    assert cb.summary is not None
    tb = tb_scalars(str(tmp_path))
    for key in ("train/rannc/stage0/peak_mem_gib", "train/rannc/tokens_per_s", "train/rannc/bubble_fraction",
                "train/rannc/step_time_s"):
        assert key in tb and len(tb[key]) == 2, sorted(tb)
        assert all(v >= 0 for v in tb[key])


def test_step_profiler_callback_writes_summary_and_trace(tmp_path):
    """StepProfilerCallback with a plain Trainer traces exactly the asked steps and writes both files."""
    import gzip

    import torch
    from transformers import Trainer, TrainingArguments
    from trainer_common import ListDataset, tiny_model

    from rannc_hf.integrations.step_profiler import StepProfilerCallback

    torch.set_num_threads(1)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=5, logging_steps=5,
                             report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0)
    prof = StepProfilerCallback(str(tmp_path / "profile"), start=2, steps=2)
    trainer = Trainer(model=tiny_model("gpt2"), args=args, train_dataset=ListDataset("gpt2", 32), callbacks=[prof])
    trainer.train()

    assert prof.summary_path == str(tmp_path / "profile" / "steps_2-3.txt")
    text = open(prof.summary_path).read()
    assert "over 2 training step(s), 2..3" in text and "host waits on the device" in text
    assert "aten::mm" in text or "aten::addmm" in text   # the model's matmuls are in the op tables
    with gzip.open(prof.trace_path, "rt") as f:
        trace = json.load(f)
    assert any(e.get("name") == "ProfilerStep#0" or "aten::" in e.get("name", "") for e in trace["traceEvents"])
    assert not list((tmp_path / "profile").glob("*.tmp"))   # written atomically, nothing left over
    with pytest.raises(ValueError, match="steps=0"):
        StepProfilerCallback(str(tmp_path), start=0, steps=0)


def test_step_profiler_keeps_a_window_cut_short(tmp_path):
    """Training that ends inside the window still writes what was traced (on_train_end)."""
    import torch

    from rannc_hf.integrations.step_profiler import StepProfilerCallback

    prof = StepProfilerCallback(str(tmp_path), start=1, steps=5)
    w = torch.randn(8, 8, requires_grad=True)
    for _ in range(3):
        prof.on_step_begin(None, None, None)
        (w @ w).sum().backward()
        prof.on_step_end(None, None, None)
    assert prof.summary_path is None
    prof.on_train_end(None, None, None)
    assert prof.summary_path.endswith("steps_1-2.txt")
    assert "over 2 training step(s), 1..2" in open(prof.summary_path).read()
