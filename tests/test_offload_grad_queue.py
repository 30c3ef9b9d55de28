"""The offload engine's CUDA gradient path (a block's gradients queued, then sent under one copy-stream switch with
one foreach norm: ``gradients._flush_pending``) on CPU, with CUDA's streams and events replaced by no-ops: host
gradients, first-arrival bookkeeping, staged later arrivals and the block norm must come out as without the queue."""

from __future__ import annotations

import contextlib

import pytest
import torch

from rannc_hf.offload import gradients as grads_mod
from rannc_hf.offload.engine import OffloadEngine

SHAPES = [(7, 5), (5,), (9, 7), (9,)]


class _Stream:
    def wait_stream(self, other):
        pass


class _Event:
    def __init__(self, *a, **k):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: None)


def _engine(dtype=torch.bfloat16):
    torch.manual_seed(0)
    blocks = [[torch.nn.Parameter(torch.randn(s)) for s in SHAPES] for _ in range(2)]
    eng = OffloadEngine(blocks, device="cpu", mode="optimizer", compute_dtype=dtype, async_step=True,
                        check_memory=False)
    eng.cuda = True   # take the CUDA branch of _send from here on (streams and events are the fakes above)
    eng.d2h_stream = _Stream()
    for g in eng.blocks:
        g.staging = torch.zeros(g.numel, dtype=dtype)   # a CPU group has no staging buffer of its own
    return eng


@pytest.mark.parametrize("pending_bytes", [grads_mod.PENDING_BYTES, 1], ids=["queued per block", "flushed each"])
def test_queued_gradients_land_like_sent_ones(fake_cuda, monkeypatch, pending_bytes):
    monkeypatch.setattr(grads_mod, "PENDING_BYTES", pending_bytes)
    eng = _engine()
    g = eng.blocks[0]
    gen = torch.Generator().manual_seed(1)
    mb = [[torch.randn(s, generator=gen).to(torch.bfloat16) for s in SHAPES] for _ in range(2)]
    for j in (3, 1, 0, 2):          # micro-batch 1, in backward's order: upcast straight into the host buffer
        eng._send(g, j, mb[0][j])
    assert not g.pending and not g.round          # the round completed and went to the worker
    eng._wait_folds()
    assert g.has_grad == [True] * 4
    want = torch.linalg.vector_norm(torch.cat([t.float().reshape(-1) for t in mb[0]]))
    torch.testing.assert_close(g.gnorm, want)    # the block norm from the foreach norms of the first arrivals
    for j in (3, 1):                # micro-batch 2, partly: staged, folded by the worker
        eng._send(g, j, mb[1][j])
    assert g.round == [3, 1] and (g.pending == [] if pending_bytes == 1 else len(g.pending) == 2)
    eng._send(g, 0, mb[1][0])
    eng._send(g, 2, mb[1][2])
    eng._wait_folds()
    for j in range(4):
        torch.testing.assert_close(g.view(g.grad, j), mb[0][j].float() + mb[1][j].float())
    assert g.gnorm is None              # later arrivals: the norm is taken from the host sums when asked
    other = eng.blocks[1]
    assert not other.has_grad[0] and other.grad.abs().sum() == 0


def test_a_parameter_seen_twice_before_its_block_completes_folds_what_arrived(fake_cuda):
    eng = _engine()
    g = eng.blocks[0]
    a, b = torch.ones(SHAPES[1], dtype=torch.bfloat16), torch.full(SHAPES[1], 2.0, dtype=torch.bfloat16)
    eng._send(g, 1, a)
    eng._send(g, 1, b)                  # submits the round holding the first arrival, then queues this one
    assert g.round == [1] and len(g.pending) == 1 and 1 not in g.round_direct
    eng._wait_folds()
    torch.testing.assert_close(g.view(g.grad, 1), torch.full(SHAPES[1], 3.0))


def test_a_later_micro_batch_folds_in_a_few_torch_calls_however_many_chunks(fake_cuda, monkeypatch):
    """The fold runs on the engine's worker while backward's hooks run Python: each torch call it makes waits to take
    the GIL back. A later micro-batch's fold is one foreach add over the chunks, not a Python loop of 4 calls a
    chunk (a 12.6M-parameter block: 167 ms beside a Python-busy thread on 2 cores, 22.5 as one call)."""
    from torch_calls import TorchCalls

    monkeypatch.setattr(grads_mod, "FOLD_CHUNK", 7)   # dozens of chunks over this block
    eng = _engine()
    g = eng.blocks[0]
    gen = torch.Generator().manual_seed(2)
    mb = [[torch.randn(s, generator=gen).to(torch.bfloat16) for s in SHAPES] for _ in range(2)]
    for j in range(4):
        eng._send(g, j, mb[0][j])
    eng._wait_folds()
    g.staging.zero_()
    for j in range(4):
        g.view(g.staging, j).copy_(mb[1][j])
    with TorchCalls() as c:
        eng._fold_task(g, [0, 1, 2, 3], _Event())
    assert g.numel > 30 * 7 and c.calls.count("_foreach_add_") == 1 and len(c.calls) <= 4, c.calls
    for j in range(4):
        torch.testing.assert_close(g.view(g.grad, j), mb[0][j].float() + mb[1][j].float())
