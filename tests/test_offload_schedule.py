"""Scheduling logic of the offload engine, without a GPU: what is resident when, in what order."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rannc_hf.errors import OffloadError
from rannc_hf.offload import (OffloadEngine, choose_mode, find_blocks, offload_cost, offload_enter, offload_exit,
                              offload_memory, offload_module)

N = 5


class Chain(nn.Module):
    def __init__(self, n=N, dim=8, recompute=None, probe=None):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(n))
        self.out = nn.Linear(dim, 1)
        self.recompute = recompute
        self.probe = probe

    def forward(self, x):
        h = self.inp(x)
        for i, layer in enumerate(self.layers):
            if self.recompute is None:
                h = layer(h)
            else:
                h = checkpoint(layer, h, use_reentrant=self.recompute == "reentrant")
            if self.probe is not None:
                self.probe(i)
        return self.out(h).sum()


def _setup(p=1, mode="all", recompute=None):
    log = []
    model = Chain(recompute=recompute)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h = offload_module(model, opt, mode, device="cpu", prefetch_blocks=p, trace=True)
    model.probe = lambda i: log.append((i, h.engine.resident_blocks()))
    return model, opt, h, log


def _events(trace, kinds):
    return [e for e in trace if e[0] in kinds]


def test_forward_prefetch_order_and_tail_kept():
    model, _, h, log = _setup(p=1)
    model(torch.randn(3, 8))
    tr = h.engine.trace
    assert tr[:3] == [("fetch", 0), ("forward", 0), ("prefetch", 1)]  # only block 0 waits on a copy
    assert _events(tr, {"fetch"}) == [("fetch", 0)]
    assert _events(tr, {"prefetch"}) == [("prefetch", i) for i in range(1, N)]
    # after block i's forward: block i+1 was prefetched; i released unless among the last p+1
    assert log == [(0, [1]), (1, [2]), (2, [3]), (3, [3, 4]), (4, [3, 4])]
    assert _events(tr, {"keep"}) == [("keep", 3), ("keep", 4)]


@pytest.mark.parametrize("p", [0, 1, 2, 3])
def test_working_set_bounded(p):
    model, opt, h, _ = _setup(p=p)
    for _ in range(2):
        model(torch.randn(3, 8)).backward()
        opt.step()
        opt.zero_grad()
    st = h.stats()
    # p + 1 blocks; with p = 0 two meet for an instant when backward hands over from block i+1 to i
    bound = min(N, max(p + 1, 2))
    assert st["resident_peak_blocks"] == bound
    assert st["resident_peak_bytes"] <= bound * h.engine.blocks[0].work_bytes


def test_backward_fetch_order_and_release():
    model, _, h, _ = _setup(p=1)
    model(torch.randn(3, 8)).backward()
    tr = h.engine.trace
    bwd = tr[tr.index(("backward", 4)):]
    assert _events(bwd, {"backward"}) == [("backward", i) for i in reversed(range(N))]
    # kept tail (3, 4) is not fetched again; blocks 2, 1, 0 are prefetched in reverse order
    assert _events(bwd, {"fetch", "prefetch"}) == [("prefetch", 2), ("prefetch", 1), ("prefetch", 0)]
    # each block is released right after its backward, before the block two below it is fetched
    assert bwd.index(("release", 4)) < bwd.index(("prefetch", 2))
    assert bwd.index(("release", 3)) < bwd.index(("prefetch", 1))
    assert h.engine.resident_blocks() == []  # nothing left after backward
    assert all(p.untyped_storage().nbytes() == 0 for layer in model.layers for p in layer.parameters())
    assert all(p.untyped_storage().nbytes() > 0 for p in model.inp.parameters())  # rest stays resident


def test_eval_without_grad_releases_every_block():
    model, _, h, log = _setup(p=1)
    with torch.no_grad():
        model(torch.randn(3, 8))
    assert _events(h.engine.trace, {"keep"}) == []
    assert h.engine.resident_blocks() == []  # no backward will come: every block left after its forward
    assert [r for _, r in log] == [[1], [2], [3], [4], []]
    model(torch.randn(3, 8)).backward()
    assert h.engine.stats()["resident_peak_blocks"] <= 2


def test_optimizer_mode_keeps_every_block_resident():
    model, opt, h, _ = _setup(p=1, mode="optimizer")
    model(torch.randn(3, 8)).backward()
    opt.step()
    assert h.engine.trace == [("backward_end", -1)] and h.stats()["fetches"] == 0
    assert all(p.untyped_storage().nbytes() > 0 for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())  # gradients went to the host


def _plain_grads(recompute):
    model = Chain(recompute=recompute)
    model(torch.randn(3, 8, generator=torch.Generator().manual_seed(1))).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("recompute", ["non-reentrant", "reentrant"])
def test_recompute_refetches_in_backward(recompute):
    ref = _plain_grads(None)
    model, _, h, _ = _setup(p=1, recompute=recompute)
    model(torch.randn(3, 8, generator=torch.Generator().manual_seed(1))).backward()
    tr = h.engine.trace
    rec = _events(tr, {"recompute"})
    assert [i for _, i in rec] == list(reversed(range(N)))  # each block's forward runs again, last first
    # when a block recomputes, it is resident (fetched for backward, or on demand)
    assert h.stats()["resident_peak_blocks"] <= 2
    assert h.engine.resident_blocks() == []
    grads = h.engine.host_grads()
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)


def test_fences_in_fx_graph_with_get_attr():
    """The runtime's path: an fx graph reading weights through get_attr, fenced by call_function nodes."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.w = nn.ParameterList(nn.Parameter(torch.randn(8, 8) * 0.3) for _ in range(4))

        def forward(self, x):
            for w in self.w:
                x = torch.tanh(F.linear(x, w))
            return x.sum()

    ref = Functional()
    x = torch.randn(2, 8)
    ref(x).backward()
    mod = Functional()
    gm = torch.fx.symbolic_trace(mod)
    eng = OffloadEngine([[p] for p in mod.w], device="cpu", mode="params", prefetch_blocks=1, trace=True)
    g = gm.graph
    # fence each block: enter before its linear, exit after its tanh
    lin = [n for n in g.nodes if n.op == "call_function" and n.target is F.linear]
    assert all(n.args[1].op == "get_attr" for n in lin)
    for i, n in enumerate(lin):
        with g.inserting_before(n):
            e = g.call_function(offload_enter, (eng.id, i, n.args[0]))
        n.args = (e,) + n.args[1:]
        th = next(iter(n.users))
        with g.inserting_after(th):
            ex = g.call_function(offload_exit, (eng.id, i, th))
        th.replace_all_uses_with(ex, delete_user_cb=lambda u: u is not ex)
    gm.recompile()
    assert "offload_enter" in gm.code and "offload_exit" in gm.code
    out = gm(x)
    out.backward()
    for r, h in zip(ref.w, eng.host_grads()):
        torch.testing.assert_close(h, r.grad)
    assert eng.stats()["resident_peak_blocks"] <= 2 and eng.resident_blocks() == []
    # several tensors: a tuple comes back
    a, b = torch.ones(2, requires_grad=True), torch.zeros(2)
    assert offload_enter(eng.id, 0, a, b) == (a, b)
    assert operator.getitem(offload_exit(eng.id, 0, a, b), 0) is a
    eng.release_all()


def test_inplace_after_fence_is_allowed():
    model, _, h, _ = _setup(p=1)
    x = torch.randn(3, 8, requires_grad=True)
    y = offload_exit(h.engine.id, 0, offload_enter(h.engine.id, 0, x * 1.0))
    y.add_(1.0)  # same tensor returned, no custom-Function view: in-place is fine
    y.sum().backward()


def test_engine_rejects_bad_input():
    with pytest.raises(OffloadError, match="mode"):
        OffloadEngine([], device="cpu", mode="none")
    eng = OffloadEngine([[nn.Parameter(torch.ones(2))]], device="cpu", mode="all")
    with pytest.raises(OffloadError, match="out of range"):
        eng.before_forward(3)
    with pytest.raises(OffloadError, match="no optimizer"):
        eng.step()


def test_shared_parameters_go_to_rest():
    shared = nn.Parameter(torch.ones(3))
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    eng = OffloadEngine([[a, shared], [b, shared]], device="cpu", mode="all")
    assert eng.blocks[0].params == [a] and eng.blocks[1].params == [b] and eng.rest.params == [shared]
    assert shared.untyped_storage().nbytes() > 0 and a.untyped_storage().nbytes() == 0


def test_find_blocks():
    from rannc_hf import zoo

    gpt2, _ = zoo.make("gpt2", 2)
    assert find_blocks(gpt2) == list(gpt2.transformer.h)
    bert, _ = zoo.make("bert", 2)
    assert find_blocks(bert) == list(bert.bert.encoder.layer)
    cnn, _ = zoo.make("cnn", 2)
    assert find_blocks(cnn) == list(cnn.blocks)


def test_cost_model():
    kw = dict(param_bytes=2.7e9 * 4, grad_bytes=2.7e9 * 2, optim_bytes=2.7e9 * 8, fwd_time=0.14, bwd_time=0.28,
              link_gbps=55.0, cpu_adam_params_per_s=4e9, num_blocks=32, prefetch_blocks=2)
    none = offload_cost(mode="none", **kw)
    costs = {m: offload_cost(mode=m, **kw) for m in ("optimizer", "params", "all")}
    assert none.extra_step_time == 0 and none.step_time == pytest.approx(0.42)
    assert all(c.step_time > none.step_time for c in costs.values())
    assert costs["all"].h2d_bytes > costs["optimizer"].h2d_bytes
    assert 0.0 <= costs["all"].hidden_fraction <= 1.0
    slow = offload_cost(mode="all", **{**kw, "link_gbps": 1.0})
    assert slow.exposed_copy_time > costs["all"].exposed_copy_time and slow.hidden_fraction < costs["all"].hidden_fraction
    more_mb = offload_cost(mode="optimizer", microbatches=8, **kw)
    assert more_mb.optimizer_time == costs["optimizer"].optimizer_time  # step once per optimizer step
    m_all = offload_memory(1e9, "all", num_blocks=10, prefetch_blocks=2)
    m_opt = offload_memory(1e9, "optimizer", num_blocks=10)
    assert m_all["gpu_bytes"] < m_opt["gpu_bytes"] < offload_memory(1e9, "none")["gpu_bytes"]
    assert choose_mode(1e9, 80e9) == "none" and choose_mode(1e9, 1e6) is None


def test_cost_model_prices_the_gpu_step_pipe_and_streamed_state():
    """GPU steps (``params`` mode's, the GPU-stepped share of an ``all`` stage, the streamed share) move master +
    gradient (+ streamed state) in on one stream and master + shadow (+ state) out on another: the link runs both
    ways at once, concurrently with the CPU stepping the rest (the engine's hybrid step)."""
    n = 1.3e9
    kw = dict(param_bytes=n * 4, grad_bytes=n * 2, optim_bytes=n * 8, fwd_time=0.064, bwd_time=0.128,
              link_gbps=55.0, duplex_gbps=75.0, cpu_adam_params_per_s=2e9, num_blocks=24, prefetch_blocks=2,
              recompute=True)
    params = offload_cost(mode="params", **kw)
    assert params.optimizer_time == pytest.approx(n * 14 / 75e9 + n / 50e9)   # both ways at once: duplex-bound
    cpu_only = offload_cost(mode="all", **kw)
    assert cpu_only.optimizer_time == pytest.approx(n / 2e9)
    whole = offload_cost(mode="all", gpu_step_fraction=1.0, **kw)
    assert whole.optimizer_time == pytest.approx(params.optimizer_time)
    half = offload_cost(mode="all", gpu_step_fraction=0.5, **kw)
    assert half.optimizer_time == pytest.approx(max(params.optimizer_time / 2, n / 2 / 2e9))
    # a CPU-stepped block's first fetch sends its fp32 master (2 B more than bf16) and writes the bf16 cast back
    assert half.h2d_bytes == pytest.approx(cpu_only.h2d_bytes + 0.5 * n * 8 - 0.5 * n * 2)
    assert half.d2h_bytes == pytest.approx(cpu_only.d2h_bytes + 0.5 * n * 6 - 0.5 * n * 2)
    assert offload_cost(mode="all", gpu_step_fraction=-1, **kw).optimizer_time == cpu_only.optimizer_time
    # optimizer mode: the blocks stay resident and get their new weights on the GPU, so no bf16 shadow goes back:
    # fp32 gradients out in backward, then master + gradient in and the master out
    resident = offload_cost(mode="optimizer", gpu_step_fraction=1.0, **kw)
    assert resident.h2d_bytes == pytest.approx(8 * n) and resident.d2h_bytes == pytest.approx(8 * n)
    # streamed: master, gradient and 8 B of AdamW state in; master, bf16 shadow and state out
    streamed = offload_cost(mode="all", stream_step_fraction=1.0, **kw)
    assert streamed.h2d_bytes == pytest.approx(cpu_only.h2d_bytes + 16 * n - 2 * n)   # fresh shadows: no fp32 fetch
    assert streamed.d2h_bytes == pytest.approx(cpu_only.d2h_bytes + 14 * n - 2 * n)
    assert streamed.optimizer_time == pytest.approx(30 * n / 75e9 + n / 50e9)
    # the chooser balances the CPU against the link: better than either alone
    from rannc_hf.offload.cost import choose_stream_step_blocks
    k = choose_stream_step_blocks([n / 24] * 24, 0.0, device_grads=False, compute_itemsize=2, state_bytes_per_param=8,
                                  link_bps=55e9, duplex_bps=75e9, cpu_adam_params_per_s=2e9)
    mixed = offload_cost(mode="all", stream_step_fraction=k / 24, **kw)
    assert 0 < k < 24 and mixed.optimizer_time < min(cpu_only.optimizer_time, streamed.optimizer_time) * 0.7
    rest = 1e8   # embeddings: stepped on the CPU while the GPU steps run (queued first), outside those layers
    with_rest = offload_cost(mode="params", rest_params=rest, **kw)
    assert with_rest.optimizer_time == pytest.approx(max((n - rest) * 14 / 75e9 + (n - rest) / 50e9, rest / 2e9))
    # all: the worker steps the rest group, then the CPU-stepped half, beside the GPU-stepped half's pipe
    half_rest = offload_cost(mode="all", gpu_step_fraction=0.5, rest_params=rest, **kw)
    layers = n - rest
    pipe_half = layers / 2 * 14 / 75e9 + layers / 2 / 50e9
    assert half_rest.optimizer_time == pytest.approx(max(pipe_half, rest / 2e9 + layers / 2 / 2e9))


def test_planner_finds_the_layers_the_engine_offloads():
    """The planner prices the engine's resident group (parameters outside find_blocks' layers) from
    parameter names alone; for GPT-2 that is the embeddings and the final norm."""
    from rannc_hf.capture import capture
    from rannc_hf import zoo
    from rannc_hf.planner.costs import CostModel

    model, bf = zoo.make_with_batches("gpt2", 0)
    cm = CostModel.build(capture(model, bf(2, 0)), device="h200", precision="bf16")
    assert cm.layer_prefixes == {"transformer.h"}
    n, _, names = cm.stage_params(0, cm.num_blocks - 1)
    outside = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("transformer.h."))
    assert cm.outside_layers(0, cm.num_blocks - 1, names) == outside
    assert [m for m in find_blocks(model)] == list(model.transformer.h)


def test_cost_model_prices_host_folds_or_device_sums():
    """Several micro-batches: summed on the host, every micro-batch's gradients leave and the worker adds
    micro-batches 2..m (exposed beyond the later backward passes); summed on the GPU, one copy leaves."""
    n = 1.3e9
    kw = dict(param_bytes=n * 4, grad_bytes=n * 2, optim_bytes=n * 8, fwd_time=0.024, bwd_time=0.041,
              link_gbps=55.0, cpu_adam_params_per_s=2e9, num_blocks=24, prefetch_blocks=2, mode="optimizer",
              microbatches=4, host_fold_params_per_s=4e9)
    host = offload_cost(**kw)
    dev = offload_cost(device_accumulate=True, **kw)
    one = offload_cost(**{**kw, "microbatches": 1})
    # the first micro-batch's gradients leave upcast to fp32 (4 B), later ones in bf16 (2 B) to be added on the host
    assert host.d2h_bytes == pytest.approx(n * 4 + 3 * n * 2) and dev.d2h_bytes == pytest.approx(one.d2h_bytes)
    assert dev.d2h_bytes == pytest.approx(n * 4)
    folds = 3 * n / 4e9
    sends = 3 * 24 * max(0.0, n * 2 / 24 / 55e9 - 0.041 / 24)      # three more micro-batches' copies, per block
    assert host.exposed_copy_time - dev.exposed_copy_time == pytest.approx(folds - 3 * 0.041 + sends, rel=1e-6)
    assert offload_cost(device_accumulate=True, **{**kw, "microbatches": 1}).step_time == pytest.approx(one.step_time)


def test_cost_model_device_grads_keep_the_gpu_share_off_the_link():
    """GPU-stepped layers keeping their gradients on the GPU: their gradients neither leave in backward nor
    come back for the step (only the fp32 master does)."""
    n = 1.3e9
    kw = dict(param_bytes=n * 4, grad_bytes=n * 2, optim_bytes=n * 8, fwd_time=0.064, bwd_time=0.128,
              link_gbps=55.0, cpu_adam_params_per_s=2e9, num_blocks=24, prefetch_blocks=2, mode="all",
              gpu_step_fraction=0.5, recompute=True)
    host = offload_cost(**kw)
    dev = offload_cost(device_grads=True, **kw)
    assert host.d2h_bytes - dev.d2h_bytes == pytest.approx(0.5 * n * 4)          # half the (fp32) gradients stay
    assert host.h2d_bytes - dev.h2d_bytes == pytest.approx(0.5 * n * 4)          # and are not streamed back in
    assert dev.optimizer_time <= host.optimizer_time and dev.step_time < host.step_time
    params = dict(kw, mode="params")
    assert offload_cost(device_grads=True, **params).optimizer_time < offload_cost(**params).optimizer_time


def test_cost_model_host_time_per_block_shows_only_behind_short_blocks():
    """The engine's host work per block and micro-batch is exposed by the part the block's GPU work does not
    cover: 8 micro-batches of 1 sample (GPU per block shorter than the host) pay it, one of 8 does not."""
    n = 1.3e9
    kw = dict(param_bytes=n * 4, grad_bytes=n * 2, optim_bytes=n * 8, link_gbps=55.0, cpu_adam_params_per_s=2e9,
              num_blocks=160, prefetch_blocks=2, mode="optimizer", device_accumulate=True)
    small = dict(kw, fwd_time=0.0116, bwd_time=0.0213, microbatches=8)
    big = dict(kw, fwd_time=0.0928, bwd_time=0.1704, microbatches=1, recompute=True)
    extra = offload_cost(block_host_time=2.8e-3, engine_blocks=24, **small).step_time - offload_cost(**small).step_time
    assert extra == pytest.approx(8 * 24 * (2.8e-3 - (0.0116 + 0.0213) / 24), rel=1e-6)
    assert offload_cost(block_host_time=2.8e-3, engine_blocks=24, **big).step_time == pytest.approx(
        offload_cost(**big).step_time)


def test_stale_shadow_is_filled_from_the_fp32_master():
    """After a CPU step the engine leaves a GPU block's bf16 shadow stale: the next fill sends the fp32 master
    (4 bytes per parameter) and casts on the device; a fresh shadow crosses in bf16 (2 bytes)."""
    from rannc_hf.offload.store import ParamGroup

    ps = [nn.Parameter(torch.randn(3, 5)), nn.Parameter(torch.randn(7))]
    g = ParamGroup(0, ps, torch.device("cpu"), torch.bfloat16, offload=True)
    g.mark_shadow_stale()          # on a CPU device the shadow is recast at once
    assert not g.shadow_stale
    g.master.mul_(3.0)
    g.shadow_stale = True          # as mark_shadow_stale leaves a CUDA block
    assert g.fill_work() == (4 * g.numel, 0)
    torch.testing.assert_close(g.work, g.master.to(torch.bfloat16), rtol=0, atol=0)
    assert g.shadow_stale          # no write-back stream: the shadow stays stale, the next fill casts again
    g.refresh_shadow()
    assert not g.shadow_stale and g.fill_work() == (2 * g.numel, 0)
    torch.testing.assert_close(g.work, g.master.to(torch.bfloat16), rtol=0, atol=0)


def test_cost_model_prices_the_step_in_backward():
    """step_in_backward: the CPU step of the last layers hides behind the rest of backward, the rest group's step
    and the next forward's GPU-stepped layers; only what is left is exposed. GPU-stepped layers' gradients no
    longer cross PCIe, and their step pipe fills backward's idle link time."""
    from rannc_hf.offload.cost import offload_cost

    kw = dict(param_bytes=32e8 * 4, grad_bytes=32e8 * 2, optim_bytes=32e8 * 8, fwd_time=0.16, bwd_time=0.32,
              link_gbps=50.0, duplex_gbps=75.0, cpu_adam_params_per_s=2e9, mode="all", num_blocks=32,
              recompute=True, gpu_step_fraction=0.5)
    after = offload_cost(**kw)
    inside = offload_cost(**kw, step_in_backward=True)
    t_cpu = 16e8 / 2e9                                     # 0.8 s for the 16 CPU-stepped layers
    window = (0.32 + 0.16) * (1 - 1 / 32) + 0.16 * 0.5     # backward after the first layer + 16 layers' forward
    assert inside.optimizer_time == pytest.approx(t_cpu - window, rel=1e-6)
    assert after.optimizer_time == pytest.approx(t_cpu, rel=1e-6)
    assert inside.d2h_bytes == pytest.approx(after.d2h_bytes - 16e8 * 4, rel=1e-6)   # the GPU-stepped (fp32) gradients
    assert inside.h2d_bytes == pytest.approx(after.h2d_bytes - 16e8 * 4, rel=1e-6)   # and their fp32 trip back in
    assert inside.step_time < after.step_time
    # several micro-batches without summing them on the GPU: the engine steps after backward, and so does the model
    assert offload_cost(**kw, microbatches=4, step_in_backward=True).step_time == pytest.approx(
        offload_cost(**kw, microbatches=4).step_time)
    # what the window leaves runs at the host's idle rate once the GPU work is over
    idle = offload_cost(**kw, step_in_backward=True, cpu_adam_idle_params_per_s=4e9)
    assert idle.optimizer_time == pytest.approx((16e8 - window * 2e9) / 4e9, rel=1e-6)
    assert offload_cost(**kw, step_in_backward=True, cpu_adam_idle_params_per_s=2e9).optimizer_time == pytest.approx(
        inside.optimizer_time, rel=1e-6)                   # the same rate throughout: as without it


def test_host_step_threads_take_the_process_share_of_its_cores(monkeypatch):
    """torchrun and accelerate launch set OMP_NUM_THREADS=1 per process; the host step then gets this process's share
    of the cores it may run on instead of one (GPT-2 2.7B over two ranks: 7.6 s a step on one core each)."""
    import os

    from rannc_hf.offload.engine import host_step_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert host_step_threads() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert host_step_threads() == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert host_step_threads() == 32
    monkeypatch.setattr(torch, "get_num_threads", lambda: 48)   # the user asked for more: kept
    assert host_step_threads() == 48


def test_cost_model_prices_the_rest_group_stepped_on_the_gpu():
    """gpu_step_rest: the embeddings' step (exposed: the next forward starts with them) becomes GPU kernels, their
    gradients stay on the GPU and their new weights need no copy in (only the master goes back). They may go there
    when their 16 bytes per parameter fit (the planner then prices both places). The fitted engine overhead adds
    its time per parameter and step."""
    from rannc_hf.offload.cost import choose_gpu_step_rest, gpu_step_rest_bytes, offload_cost

    n, rest = 2.78e9, 1.31e8
    kw = dict(param_bytes=n * 4, grad_bytes=n * 2, optim_bytes=n * 8, fwd_time=0.16, bwd_time=0.32, link_gbps=50.0,
              duplex_gbps=75.0, cpu_adam_params_per_s=2.6e9, mode="all", num_blocks=32, recompute=True,
              gpu_step_fraction=0.3, rest_params=rest)
    host, dev = offload_cost(**kw), offload_cost(**kw, gpu_step_rest=True)
    assert host.optimizer_time - dev.optimizer_time == pytest.approx(rest / 2.6e9 - rest / 50e9, rel=1e-6)
    assert host.d2h_bytes == pytest.approx(dev.d2h_bytes, abs=1.0)   # the fp32 gradients stay, the fp32 master goes
    assert host.h2d_bytes - dev.h2d_bytes == pytest.approx(rest * 2, rel=1e-6)              # no working copy in
    assert dev.step_time < host.step_time
    assert offload_cost(**dict(kw, mode="params"), gpu_step_rest=True).step_time == pytest.approx(
        offload_cost(**dict(kw, mode="params")).step_time)   # params mode has no host step to replace
    assert gpu_step_rest_bytes(rest) == pytest.approx(rest * 16)
    assert choose_gpu_step_rest(rest, rest * 16 / 0.8) and not choose_gpu_step_rest(rest, rest * 16 / 0.8 - 1)
    assert not choose_gpu_step_rest(0, 1e12)
    assert offload_cost(**kw, param_overhead_s=55e-12).step_time - host.step_time == pytest.approx(n * 55e-12, rel=1e-6)


@pytest.mark.parametrize("numel", [1, 7, 21, 22])
def test_converting_copy_in_pieces(monkeypatch, numel):
    """copy_cast_ converts piece by piece (a bounded temporary); every element lands, for sizes below, at and
    across piece boundaries, in both dtypes' directions."""
    from rannc_hf.offload import store

    monkeypatch.setattr(store, "CAST_CHUNK", 7)
    src = torch.randn(numel, dtype=torch.float32).reshape(-1, 1)
    half = torch.empty(numel, dtype=torch.bfloat16)
    store.copy_cast_(half, src)
    assert torch.equal(half, src.reshape(-1).to(torch.bfloat16))
    back = torch.empty(numel, 1, dtype=torch.float32)
    store.copy_cast_(back, half)
    assert torch.equal(back.reshape(-1), half.float())


@pytest.mark.parametrize("rest_first", [False, True], ids=["gpu-pipe-first", "rest-first (RANNC_HF_OFFLOAD_REST_FIRST)"])
def test_step_queues_the_gpu_pipe_before_the_rest_groups_host_step(monkeypatch, rest_first):
    """After backward the GPU-stepped blocks are queued first (microseconds of host work), then the main thread steps
    the rest group on the CPU while the GPU pipe runs, then the worker takes the CPU-stepped blocks. The GPT recipe's
    rest group (107M parameters) stepped first used to leave the GPU idle for its whole step. The rest step runs on
    the step worker, on the engine's host-step thread count (the main thread's own may be 1)."""
    if rest_first:
        monkeypatch.setenv("RANNC_HF_OFFLOAD_REST_FIRST", "1")
    torch.manual_seed(0)
    blocks = [[torch.nn.Parameter(torch.randn(6, 6))] for _ in range(4)]
    rest = [torch.nn.Parameter(torch.randn(10, 6))]
    params = [p for b in blocks for p in b] + rest
    opt = torch.optim.AdamW(params, lr=1e-2)
    eng = OffloadEngine(blocks, device="cpu", mode="optimizer", optimizer=opt, rest=rest, async_step=True,
                        device_step_blocks=2, cpu_threads=3, check_memory=False)
    order, threads = [], []
    dev_step, host_step = eng._device_step_async, eng._step_group

    def on_device(g, *a, **k):
        order.append(("gpu", g.index))
        return dev_step(g, *a, **k)

    def on_host(g, *a, **k):
        order.append(("cpu", g.index))
        if g is eng.rest:
            threads.append(torch.get_num_threads())
        return host_step(g, *a, **k)

    monkeypatch.setattr(eng, "_device_step_async", on_device)
    monkeypatch.setattr(eng, "_step_group", on_host)
    before = torch.get_num_threads()
    sum((p * p).sum() for p in params).backward()
    eng.step()
    eng.synchronize()
    main = [o for o in order if o != ("cpu", 2) and o != ("cpu", 3)]   # the worker's steps interleave freely
    gpu, rest_step = [("gpu", 0), ("gpu", 1)], [("cpu", 4)]
    assert main == (rest_step + gpu if rest_first else gpu + rest_step)
    assert sorted(order) == sorted(gpu + rest_step + [("cpu", 2), ("cpu", 3)])
    if not rest_first:   # the worker gets the CPU blocks only after the rest group's step
        assert order.index(("cpu", 4)) < min(order.index(("cpu", 2)), order.index(("cpu", 3)))
    assert threads == [3] and torch.get_num_threads() == before
    st = eng.stats()
    assert st["rest_step_time_s"] > 0 and st["host_step_threads"] == 3
    assert st["cpu_block_steps"] == 2 and st["cpu_block_step_time_s"] > 0
    assert 0 < st["cpu_block_refill_time_s"] < st["cpu_block_step_time_s"]   # resident blocks: new weights copied in
    # one worker thread, its tasks one after another: the rest group's and the blocks' steps (and folds) add up
    assert st["worker_threads"] == 1 and st["worker_overlap_s"] == 0
    assert st["worker_task_time_s"] > st["cpu_block_step_time_s"]   # the rest group steps there too
    t = eng._last_task_end + 10.0              # tasks that overlap finished ones are counted, whatever the thread
    eng._note_worker_task(t, t + 1.0)
    eng._note_worker_task(t + 0.5, t + 0.75)
    assert eng._stats["worker_overlap_s"] == pytest.approx(0.25)
    eng.close()


def test_step_worker_keeps_its_thread_count_when_another_thread_sets_torchs():
    """A thread's first parallel op takes torch's thread count from whichever thread set it last: a DataLoader's
    pin-memory thread sets 1, and the step worker, made with its own count, then stepped on one core (the GPT-2
    1.3B recipe's CPU-stepped blocks: 75 ms each, the GPU idle). Its count must hold whatever others set."""
    import threading

    torch.manual_seed(0)
    blocks = [[torch.nn.Parameter(torch.randn(6, 6))] for _ in range(2)]
    opt = torch.optim.AdamW([p for b in blocks for p in b], lr=1e-2)
    eng = OffloadEngine(blocks, device="cpu", mode="optimizer", optimizer=opt, async_step=True, cpu_threads=3,
                        check_memory=False)
    eng._pool().submit(lambda: None).result()   # the worker exists, no parallel op has run on it yet
    before = torch.get_num_threads()
    try:
        t = threading.Thread(target=torch.set_num_threads, args=(1,))   # what a pin-memory thread does
        t.start()
        t.join()
        assert eng._pool().submit(torch.get_num_threads).result() == 3
    finally:
        torch.set_num_threads(before)
        eng.close()
