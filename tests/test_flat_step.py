"""The offload engine's flat CPU Adam/AdamW step (rannc_hf.offload.flat_step) against torch's per-parameter step."""

from __future__ import annotations

import copy

import pytest
import torch

from rannc_hf import zoo
from rannc_hf.offload import offload_module
from rannc_hf.offload.flat_step import FlatStep
from rannc_hf.offload.store import ParamGroup

SHAPES = [(33, 17), (17,), (64, 33), (64,), (5,)]   # odd sizes: padding between parameters
# the fused kernel's vector body and scalar tail round differently (FMA): a tensor's last elements may move by an ulp
TOL = dict(rtol=1e-6, atol=1e-9)


def _block(seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]


def _grads(step, n=len(SHAPES)):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen) for s in SHAPES[:n]]


@pytest.mark.parametrize("cls,kw", [(torch.optim.AdamW, dict(weight_decay=0.1)), (torch.optim.Adam, dict(amsgrad=True)),
                                    (torch.optim.AdamW, dict(maximize=True, betas=(0.8, 0.9)))])
def test_flat_step_equals_per_parameter_fused_step(cls, kw):
    ref_ps = _block()
    ref = cls(ref_ps, lr=1e-2, fused=True, **kw)
    g = ParamGroup(0, _block(), "cpu", torch.float32, offload=False)
    inner = cls(g.host_params, lr=1e-2, fused=True, **kw)
    flat = FlatStep.build(g, inner)
    assert flat is not None
    for step in range(3):
        for j, gr in enumerate(_grads(step)):
            ref_ps[j].grad = gr
            g.view(g.grad, j).copy_(gr)
        ref.step()
        assert flat.step([True] * len(SHAPES))
    for j, p in enumerate(ref_ps):
        torch.testing.assert_close(g.host_params[j].detach(), p.detach(), **TOL)
        st, rst = inner.state[g.host_params[j]], ref.state[p]
        assert st.keys() == rst.keys() and float(st["step"]) == 3.0
        for k in rst:
            torch.testing.assert_close(st[k], rst[k], **TOL)
    pad = torch.ones(g.numel, dtype=torch.bool)
    for o, n in zip(g.offsets, g.numels):
        pad[o:o + n] = False
    assert pad.any() and g.master[pad].abs().max() == 0   # padding stays zero
    assert all(b[k][pad[:b[k].numel()]].abs().max() == 0 for b in flat.buffers for k in flat.keys)


def test_flat_step_needs_consecutive_groups_and_falls_back_per_parameter():
    g = ParamGroup(0, _block(), "cpu", torch.float32, offload=False)
    hp = g.host_params
    interleaved = torch.optim.AdamW([{"params": hp[0::2]}, {"params": hp[1::2], "weight_decay": 0.0}], fused=True)
    assert FlatStep.build(g, interleaved) is None
    assert FlatStep.build(g, torch.optim.AdamW(hp, foreach=True)) is None   # not the fused CPU kernel
    assert FlatStep.build(g, torch.optim.SGD(hp, lr=0.1)) is None

    # consecutive groups with their own hyperparameters; one step with a parameter lacking a gradient
    ref_ps = _block()
    groups = lambda ps: [{"params": ps[:2], "lr": 3e-2}, {"params": ps[2:], "weight_decay": 0.0}]  # noqa: E731
    ref = torch.optim.AdamW(groups(ref_ps), lr=1e-2, weight_decay=0.2, fused=True)
    inner = torch.optim.AdamW(groups(hp), lr=1e-2, weight_decay=0.2, fused=True)
    flat = FlatStep.build(g, inner)
    assert flat is not None and [(a, b) for _, a, b in flat.runs][0][0] == 0
    ran = []
    for step in range(4):
        has = [not (step == 1 and j == 4) for j in range(len(SHAPES))]
        for j, gr in enumerate(_grads(step)):
            ref_ps[j].grad = gr if has[j] else None
            hp[j].grad = g.view(g.grad, j).copy_(gr) if has[j] else None
        ref.step()
        if not flat.step(has):
            inner.step()
            ran.append("per-parameter")
        else:
            ran.append("flat")
        for p in hp:
            p.grad = None
    # step 1 lacks a gradient; after it the step counts differ (4 vs 3), so the rest stays per parameter
    assert ran == ["flat", "per-parameter", "per-parameter", "per-parameter"]
    for j, p in enumerate(ref_ps):
        torch.testing.assert_close(hp[j].detach(), p.detach(), **TOL)


def _decay_groups(model):
    """Transformers' Trainer's grouping: weight decay on matrices, none on biases and norms (they alternate)."""
    ps = list(model.parameters())
    return [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]


def _run(flat_env, monkeypatch, resume_from=None, steps=3, groups=False):
    monkeypatch.setenv("RANNC_HF_OFFLOAD_FLAT_STEP", flat_env)
    model, batch_fn = zoo.make_with_batches("bert", 0)
    opt = torch.optim.AdamW(_decay_groups(model) if groups else model.parameters(), lr=1e-2, weight_decay=0.1)
    h = offload_module(model, opt, "all", device="cpu", prefetch_blocks=1, async_step=True,
                       cpu_fused=True)   # on a CPU device the engine keeps the user's kernel by default
    if resume_from is not None:
        model.load_state_dict(resume_from[0])
        opt.load_state_dict(copy.deepcopy(resume_from[1]))
    for s in range(steps):
        zoo.loss_of(model(**batch_fn(4, s + (10 if resume_from is not None else 0)))).backward()
        h.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
    h.engine.synchronize()
    flat_steps = sum(f.steps for f in h.engine._flat.values() if f is not None)
    return ({k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(opt.state_dict()), flat_steps)


def test_engine_flat_step_trains_and_checkpoints_like_per_parameter(monkeypatch):
    sd, osd, n_flat = _run("1", monkeypatch)
    ref_sd, ref_osd, n_ref = _run("0", monkeypatch)
    blocks = 5   # the zoo BERT's 4 blocks and the rest group, all stepped on the CPU
    assert n_flat == 3 * blocks and n_ref == 0
    for k in ref_sd:
        torch.testing.assert_close(sd[k], ref_sd[k], **TOL)
    assert osd["state"].keys() == ref_osd["state"].keys()
    for i, st in ref_osd["state"].items():
        for k, v in st.items():
            torch.testing.assert_close(osd["state"][i][k], v, **TOL)
    # a resumed run (state loaded from the per-parameter run) continues flat and equal to per-parameter
    got = _run("1", monkeypatch, resume_from=(ref_sd, ref_osd), steps=2)
    ref = _run("0", monkeypatch, resume_from=(ref_sd, ref_osd), steps=2)
    assert got[2] == 2 * blocks
    for k in ref[0]:
        torch.testing.assert_close(got[0][k], ref[0][k], **TOL)


def test_flat_state_saves_to_safetensors_like_separate_tensors(monkeypatch, tmp_path):
    """With the flat step, each parameter's state is a view of its block's flat buffer: the reliability
    checkpoint's safetensors file must still take them (disjoint views of one storage) and give the values back."""
    from safetensors.torch import load_file, save_file

    from rannc_hf.reliability.checkpoint import _opt_to_files

    monkeypatch.setenv("RANNC_HF_OFFLOAD_FLAT_STEP", "1")
    model, batch_fn = zoo.make_with_batches("bert", 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    h = offload_module(model, opt, "all", device="cpu", async_step=True, cpu_fused=True)
    zoo.loss_of(model(**batch_fn(4, 0))).backward()
    opt.step()
    h.engine.synchronize()
    assert sum(f.steps for f in h.engine._flat.values() if f is not None) > 0
    osd = h.engine.optimizer_state_dict()
    shared = [v for st in osd["state"].values() for k, v in st.items() if k == "exp_avg" and v._base is not None]
    assert shared   # the case this test is about: views, not separate tensors
    tensors, index = _opt_to_files(osd)
    save_file(tensors, str(tmp_path / "optimizer.safetensors"))
    back = load_file(str(tmp_path / "optimizer.safetensors"))
    for i, (k, st) in enumerate(sorted(osd["state"].items())):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(back[f"{i}.{key}"], st[key], rtol=0, atol=0)


def test_decay_groups_step_flat_after_the_engine_orders_blocks_by_group(monkeypatch):
    """The engine lays each block out in the optimizer's order, so interleaved decay / no-decay groups become two
    runs of the flat buffer: every block steps flat, and training equals the per-parameter step."""
    got = _run("1", monkeypatch, groups=True)
    ref = _run("0", monkeypatch, groups=True)
    assert got[2] == 3 * 5 and ref[2] == 0
    for k in ref[0]:
        torch.testing.assert_close(got[0][k], ref[0][k], **TOL)
    model, _ = zoo.make_with_batches("bert", 0)
    plain_opt = torch.optim.AdamW(_decay_groups(model), lr=1e-2)
    h = offload_module(model, plain_opt, "all", device="cpu", async_step=True, cpu_fused=True)
    for g, inner in zip(h.engine.groups, h.engine._inner):
        if inner is not None:
            assert len(inner.param_groups) == 2 and FlatStep.build(g, inner) is not None


@pytest.mark.parametrize("family", ["gpt2", "bert", "cnn"])
def test_flat_step_trains_like_plain_fused_adamw(family, monkeypatch):
    """Every model family: offloaded with the flat CPU step (decay / no-decay groups, clipping, 2 micro-batches)
    trains the same model as plain PyTorch with torch's fused AdamW, step for step."""
    monkeypatch.setenv("RANNC_HF_OFFLOAD_FLAT_STEP", "1")

    def run(offload: bool):
        model, batch_fn = zoo.make_with_batches(family, 0)
        opt = torch.optim.AdamW(_decay_groups(model), lr=1e-2, weight_decay=0.1, fused=not offload)
        h = offload_module(model, opt, "all", device="cpu", async_step=True, cpu_fused=True) if offload else None
        losses = []
        for s in range(3):
            for m in range(2):
                loss = zoo.loss_of(model(**batch_fn(4, 10 * s + m))) / 2
                loss.backward()
                losses.append(loss.item())
            if h is not None:
                h.clip_grad_norm_(1.0)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
        flat = sum(f.steps for f in h.engine._flat.values() if f is not None) if h is not None else 0
        return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, flat

    ref, got = run(False), run(True)
    assert got[2] > 0
    torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(ref[0]), rtol=1e-5, atol=1e-6)
    # atol 1e-5: GPT-2's key biases get gradients that are rounding noise (softmax ignores them), which Adam turns
    # into updates near lr * |g| / eps, ~1e-6 here, in either run; the per-parameter step differs from plain by as
    # much (5.9e-6). A wrong weight decay on a bias would move it by ~6e-5 in these 3 steps.
    for k in ref[1]:
        torch.testing.assert_close(got[1][k], ref[1][k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")


def test_a_steady_flat_step_makes_a_few_torch_calls():
    """From the step worker every torch call hands the GIL back and waits to take it again (up to the interpreter's
    5 ms switch interval while the main thread runs Python): the GPT-2 recipe's blocks stepped 2.4x slower through
    the accelerate loop than through the Trainer. After its first step a block's flat step makes one per param
    group, the fused kernel (numpy advances the step counts); a clipped step's 1/scale is made once per step."""
    from torch_calls import TorchCalls

    from rannc_hf.offload.engine import OffloadEngine

    torch.manual_seed(0)
    blocks = [[torch.nn.Parameter(torch.randn(s)) for s in SHAPES] for _ in range(2)]
    ps = [p for b in blocks for p in b]
    opt = torch.optim.AdamW(_decay_groups_of(ps), lr=1e-2)
    eng = OffloadEngine(blocks, device="cpu", mode="optimizer", optimizer=opt, async_step=True, cpu_fused=True,
                        check_memory=False)
    has = [True] * len(SHAPES)
    for g in eng.blocks:
        g.grad.normal_()
    scale = torch.tensor(0.5)
    for _ in range(2):   # the first step moves the state into the flat buffers
        for g in eng.blocks:
            eng._step_group(g, eng._inner[g.index], has, scale, None)
    scale = torch.tensor(0.25)   # a new step's clip coefficient
    eng._inv_scale = None
    counts = []
    for g in eng.blocks:
        with TorchCalls() as c:
            eng._step_group(g, eng._inner[g.index], has, scale, None)
        counts.append(c.calls)
    getters = {"data_ptr", "element_size"}   # hold the GIL
    counts = [sorted(c for c in calls if c not in getters) for calls in counts]
    # the kernel per param group (numpy advances the step counts) and the resident working copy's refill (at once
    # on a CPU device)
    assert counts[1] == ["_fused_adamw_", "_fused_adamw_", "copy_"], counts[1]
    assert counts[0] == sorted(counts[1] + ["__rdiv__", "to"]), counts[0]   # this step's 1 / scale, made once
    assert all(f.steps == 3 for f in eng._flat.values())
    assert all(float(eng._inner[0].state[hp]["step"]) == 3.0 for hp in eng.blocks[0].host_params)
    eng.close()


def _decay_groups_of(ps):
    return [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]
