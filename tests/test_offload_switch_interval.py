"""The engine lowers the interpreter's GIL switch interval while its step worker runs and puts it back on close.

Python keeps the interval in whole microseconds, hence the 2 us tolerance.
"""

from __future__ import annotations

import sys

import pytest
import torch

from rannc_hf import zoo
from rannc_hf.errors import ConfigError
from rannc_hf.offload import offload_module
from rannc_hf.offload import switch_interval


@pytest.fixture
def interval(monkeypatch):
    """5 ms to start from, and no shares held (engines other tests left open keep theirs apart)."""
    monkeypatch.setattr(switch_interval, "_live", set())
    monkeypatch.setattr(switch_interval, "_saved", None)
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    yield
    sys.setswitchinterval(old)


def _offloaded(async_step: bool):
    model, batch_fn = zoo.make_with_batches("gpt2", 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    h = offload_module(model, opt, "all", device="cpu", async_step=async_step, cpu_fused=True)
    zoo.loss_of(model(**batch_fn(2, 0))).backward()
    opt.step()
    opt.zero_grad()
    h.engine.synchronize()
    return h


def test_a_step_worker_shortens_the_interval_until_its_engine_closes(interval):
    first = _offloaded(async_step=True)
    assert sys.getswitchinterval() == pytest.approx(switch_interval.DEFAULT_US * 1e-6, abs=2e-6)
    second = _offloaded(async_step=True)
    first.remove()
    assert sys.getswitchinterval() == pytest.approx(switch_interval.DEFAULT_US * 1e-6, abs=2e-6)   # second still runs
    second.remove()
    assert sys.getswitchinterval() == pytest.approx(0.005, abs=2e-6)


def test_no_worker_leaves_the_interval_alone(interval):
    h = _offloaded(async_step=False)
    assert sys.getswitchinterval() == pytest.approx(0.005, abs=2e-6)
    h.remove()
    assert sys.getswitchinterval() == pytest.approx(0.005, abs=2e-6)


def test_the_environment_sets_or_disables_it(interval, monkeypatch):
    monkeypatch.setenv("RANNC_HF_OFFLOAD_SWITCH_US", "0")
    h = _offloaded(async_step=True)
    assert sys.getswitchinterval() == pytest.approx(0.005, abs=2e-6)
    h.remove()
    monkeypatch.setenv("RANNC_HF_OFFLOAD_SWITCH_US", "200")
    h = _offloaded(async_step=True)
    assert sys.getswitchinterval() == pytest.approx(200e-6, abs=2e-6)
    h.remove()
    assert sys.getswitchinterval() == pytest.approx(0.005, abs=2e-6)
    monkeypatch.setenv("RANNC_HF_OFFLOAD_SWITCH_US", "fast")
    with pytest.raises(ConfigError, match="RANNC_HF_OFFLOAD_SWITCH_US"):
        switch_interval.shorten()


def test_a_longer_wish_never_raises_a_shorter_interval(interval):
    sys.setswitchinterval(100e-6)
    share = switch_interval.shorten(500)
    assert sys.getswitchinterval() == pytest.approx(100e-6, abs=2e-6)
    switch_interval.restore(share)
    switch_interval.restore(share)   # twice: nothing more
    assert sys.getswitchinterval() == pytest.approx(100e-6, abs=2e-6)
