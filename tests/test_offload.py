"""Offload modes train exactly like plain PyTorch (fp32, CPU): losses and final weights, step for step."""

from __future__ import annotations

import copy

import pytest
import torch

from rannc_hf import zoo
from rannc_hf.config import RanncConfig
from rannc_hf.errors import OffloadError
from rannc_hf.offload import offload_module
from rannc_hf.offload import store as offload_store

STEPS, ACCUM, BATCH = 3, 2, 4


def _train(family, mode, opt_fn, *, clip=1.0, prefetch=1, use_handle=False, dtype=None):
    model, batch_fn = zoo.make_with_batches(family, 0)
    opt = opt_fn(model.parameters())
    h = None
    if mode is not None:
        h = offload_module(model, opt, mode, device="cpu", prefetch_blocks=prefetch, compute_dtype=dtype)
    losses = []
    for s in range(STEPS):
        for m in range(ACCUM):
            loss = zoo.loss_of(model(**batch_fn(BATCH, 100 * s + m))) / ACCUM
            loss.backward()
            losses.append(loss.item())
        if clip is not None:
            if h is not None:
                h.clip_grad_norm_(clip)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if use_handle:
            h.step()
            h.zero_grad()
        else:
            opt.step()
            opt.zero_grad()
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    return losses, state, h, opt


def _adamw(ps):
    return torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)


def _assert_same(ref, got):
    rl, rs = ref[0], ref[1]
    gl, gs = got[0], got[1]
    torch.testing.assert_close(torch.tensor(gl), torch.tensor(rl), rtol=1e-5, atol=1e-6)
    assert rs.keys() == gs.keys()
    for k in rs:
        torch.testing.assert_close(gs[k], rs[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


_REFS: dict = {}


def _ref(family, opt_name, opt_fn):
    key = (family, opt_name)
    if key not in _REFS:
        _REFS[key] = _train(family, None, opt_fn)
    return _REFS[key]


@pytest.mark.parametrize("family", ["gpt2", "bert", "cnn"])
@pytest.mark.parametrize("mode", ["optimizer", "params", "all"])
def test_adamw_accum_clip_matches_plain(family, mode):
    ref = _ref(family, "adamw", _adamw)
    got = _train(family, mode, _adamw)
    _assert_same(ref, got)
    st = got[2].stats()
    assert st["steps"] == STEPS and st["d2h_bytes"] > 0
    if mode != "optimizer":
        assert 0 < st["resident_peak_blocks"] <= 2  # prefetch_blocks=1 -> at most 2 blocks resident


@pytest.mark.parametrize("family", ["gpt2", "cnn"])
@pytest.mark.parametrize("mode", ["optimizer", "all"])
def test_sgd_momentum_matches_plain(family, mode):
    fn = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01)  # noqa: E731
    _assert_same(_ref(family, "sgd", fn), _train(family, mode, fn, use_handle=True))


def test_fused_adamw_cpu_step_matches_fused_reference():
    fn = lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True)  # noqa: E731
    ref = _train("bert", None, fn)
    got = _train("bert", "all", fn)
    _assert_same(ref, got)


def test_param_groups_and_lr_scheduler_follow_user_optimizer():
    def fn(ps):
        ps = list(ps)
        return torch.optim.AdamW([{"params": ps[:5], "lr": 1e-2}, {"params": ps[5:], "weight_decay": 0.0}], lr=3e-3)

    def run(mode):
        model, batch_fn = zoo.make_with_batches("cnn", 0)
        opt = fn(model.parameters())
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        if mode:
            offload_module(model, opt, mode, device="cpu")
        for s in range(3):
            zoo.loss_of(model(**batch_fn(4, s))).backward()
            opt.step()
            opt.zero_grad()
            sched.step()
        return {k: v.clone() for k, v in model.state_dict().items()}

    ref, got = run(None), run("all")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("engine_kw", [{}, dict(async_step=True, device_step_blocks=1, stream_step_blocks=2),
                                       dict(async_step=True, gpu_step_rest=True)],
                         ids=["sync", "gpu-and-streamed-steps", "gpu-stepped-rest"])
def test_state_dict_roundtrip_and_resume(engine_kw):
    """Model + optimizer state dicts look like plain PyTorch's and resume training identically (also with
    blocks whose optimizer state lives on the device or streams through it)."""
    model, batch_fn = zoo.make_with_batches("gpt2", 0)
    opt = _adamw(model.parameters())
    plain_keys = set(model.state_dict())
    h = offload_module(model, opt, "all", device="cpu", prefetch_blocks=1, **engine_kw)
    zoo.loss_of(model(**batch_fn(4, 1))).backward()
    opt.step()
    opt.zero_grad()
    sd = {k: v.clone() for k, v in model.state_dict().items()}   # a checkpoint: masters are live views
    osd = copy.deepcopy(opt.state_dict())  # live state tensors would be shared by both optimizers
    assert set(sd) == plain_keys and all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    assert len(osd["state"]) == len(list(model.parameters())) and "exp_avg" in osd["state"][0]

    # a plain model loading this checkpoint continues exactly like the offloaded one
    plain, _ = zoo.make_with_batches("gpt2", 0)
    plain.load_state_dict({k: v.clone() for k, v in sd.items()})
    popt = _adamw(plain.parameters())
    popt.load_state_dict(copy.deepcopy(osd))
    b = batch_fn(4, 2)
    for m, o in ((plain, popt), (model, opt)):
        zoo.loss_of(m(**b)).backward()
        o.step()
        o.zero_grad()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6)

    # loading back into the offloaded model restores masters, working copies and optimizer state
    model.load_state_dict(sd)
    opt.load_state_dict(copy.deepcopy(osd))   # torch's load shares same-device tensors with the dict
    for k, v in sd.items():
        torch.testing.assert_close(model.state_dict()[k], v)
    plain.load_state_dict(sd)
    popt.load_state_dict(copy.deepcopy(osd))
    for m, o in ((plain, popt), (model, opt)):
        zoo.loss_of(m(**batch_fn(4, 3))).backward()
        o.step()
        o.zero_grad()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    h.remove()
    assert all(p.untyped_storage().nbytes() > 0 for p in model.parameters())


def test_bf16_compute_trains_close_to_fp32():
    ref = _train("gpt2", None, _adamw, clip=None)
    got = _train("gpt2", "all", _adamw, clip=None, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in got[2].module.parameters())
    assert all(v.dtype == torch.float32 for v in got[1].values() if v.is_floating_point())
    assert max(abs(a - b) for a, b in zip(ref[0], got[0])) < 0.05


def test_config_object_and_auto_on_cpu():
    model, batch_fn = zoo.make_with_batches("cnn", 0)
    opt = _adamw(model.parameters())
    h = offload_module(model, opt, RanncConfig(offload="all", precision="fp32", prefetch_blocks=1), device="cpu")
    assert h.mode == "all" and h.engine.max_resident == 2
    model2, _ = zoo.make_with_batches("cnn", 0)
    h2 = offload_module(model2, _adamw(model2.parameters()), "auto", device="cpu")
    assert h2.mode == "none" and h2.engine is None


def test_unsupported_optimizer_is_refused():
    model, _ = zoo.make_with_batches("cnn", 0)
    opt = torch.optim.LBFGS(model.parameters())
    with pytest.raises(OffloadError, match="LBFGS.*Supported: Adam, AdamW, SGD"):
        offload_module(model, opt, "optimizer", device="cpu")


def test_host_memory_refusal(monkeypatch):
    model, _ = zoo.make_with_batches("gpt2", 0)
    opt = _adamw(model.parameters())
    monkeypatch.setattr(offload_store, "available_host_memory", lambda: 100_000)
    with pytest.raises(OffloadError, match=r"needs .* of host memory .*optimizer state.* only 97.66 KiB is available"):
        offload_module(model, opt, "all", device="cpu")
    # nothing was changed: the model still trains normally
    assert all(p.untyped_storage().nbytes() > 0 for p in model.parameters())


def _train_async(family, mode, opt_fn, fused, device_blocks=0, device_grads=False, stream_blocks=0, rest=False):
    model, batch_fn = zoo.make_with_batches(family, 0)
    opt = opt_fn(model.parameters())
    h = offload_module(model, opt, mode, device="cpu", prefetch_blocks=1, async_step=True, cpu_fused=fused,
                       device_step_blocks=device_blocks, device_grads=device_grads, stream_step_blocks=stream_blocks,
                       gpu_step_rest=rest)
    assert h.engine.async_step
    losses = []
    for s in range(STEPS):
        for m in range(ACCUM):
            loss = zoo.loss_of(model(**batch_fn(BATCH, 100 * s + m))) / ACCUM
            loss.backward()
            losses.append(loss.item())
        h.clip_grad_norm_(0.05)  # small: the coefficient is < 1 and goes into the step
        opt.step()
        opt.zero_grad()
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    return losses, state, h, opt


@pytest.mark.parametrize("mode", ["optimizer", "all"])
@pytest.mark.parametrize("opt_name,device_blocks,device_grads,stream_blocks,rest", [
    ("adamw_fused", 0, False, 0, False), ("sgd", 0, False, 0, False), ("adamw_fused", 1, False, 0, False),
    ("sgd", 1, False, 0, False), ("adamw_fused", 1, True, 0, False), ("sgd", 2, True, 0, False),
    ("adamw_fused", 0, False, 2, False), ("adamw_fused", 1, True, 1, False), ("sgd", 1, False, 1, False),
    ("adamw_fused", 0, False, 0, True), ("sgd", 1, True, 1, True)])
def test_async_step_matches_plain(mode, opt_name, device_blocks, device_grads, stream_blocks, rest):
    """Background pipeline (per-block norms, clip coefficient inside the step, blocks stepped on a
    worker thread while the next forward waits block by block) trains like plain PyTorch; ``rest``: the
    embeddings and head (the rest group) step on the device, their master, state and gradients kept there."""
    if opt_name == "adamw_fused":
        def opt_fn(ps):
            return torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True)
    else:
        def opt_fn(ps):
            return torch.optim.SGD(ps, lr=1e-1, momentum=0.9)
    model, batch_fn = zoo.make_with_batches("gpt2", 0)
    opt = opt_fn(model.parameters())
    losses = []
    for s in range(STEPS):
        for m in range(ACCUM):
            loss = zoo.loss_of(model(**batch_fn(BATCH, 100 * s + m))) / ACCUM
            loss.backward()
            losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
        opt.zero_grad()
    ref = (losses, {k: v.detach().float().clone() for k, v in model.state_dict().items()})
    got = _train_async("gpt2", mode, opt_fn, fused=opt_name == "adamw_fused", device_blocks=device_blocks,
                       device_grads=device_grads, stream_blocks=stream_blocks, rest=rest)
    eng = got[2].engine
    r = eng.rest
    assert (r.device_step, r.keep_grads, r.dev_master is not None, r.grad.numel() == 0) == (rest,) * 4
    # streamed blocks: spread over the CPU-side blocks, their optimizer state in flat host buffers between steps
    streamed = [g for g in eng.blocks if g.stream_step]
    assert len(streamed) == stream_blocks and not any(g.device_step for g in streamed)
    for g in streamed:
        inner = eng._inner[g.index]
        assert g.sstate, "a streamed block keeps its state in flat host buffers"
        for hp in g.host_params:
            for k, v in inner.state[hp].items():
                if v.dim() > 0:
                    buf = g.sstate[k]
                    assert buf.data_ptr() <= v.data_ptr() < buf.data_ptr() + buf.nbytes
    # device_grads: the GPU-stepped blocks' gradients never went to the host (the CPU stands in for the GPU)
    assert [g.keep_grads for g in eng.blocks] == [device_grads and i < device_blocks for i in range(len(eng.blocks))]
    if device_grads:
        host = _train_async("gpt2", mode, opt_fn, fused=opt_name == "adamw_fused", device_blocks=device_blocks,
                            stream_blocks=stream_blocks, rest=rest)[2]
        kept = eng.stats()["kept_grad_bytes"] - host.engine.stats()["kept_grad_bytes"]   # the rest's, if any, in both
        assert kept >= sum(g.numel for g in eng.blocks[:device_blocks]) * 4 * STEPS   # every step, all block params
        assert eng.stats()["d2h_bytes"] + kept == host.engine.stats()["d2h_bytes"]
        # and they have no host gradient buffer (fp32 here; on CUDA the compute-dtype staging goes too)
        freed = sum(g.numel for g in eng.blocks[:device_blocks]) * 4
        assert eng.stats()["host_bytes"] == host.engine.stats()["host_bytes"] - freed
        need = eng.host_bytes_needed([g.params for g in eng.blocks], eng.rest.params, got[3])
        count = [sum(p.numel() for p in g.params) for g in eng.groups]
        kept_params = sum(count[:device_blocks]) + (count[-1] if rest else 0)
        assert need["fp32 gradients"] == 4 * (sum(count) - kept_params)
        if mode == "optimizer" and opt_name == "adamw_fused":   # AdamW state of the GPU-stepped blocks is not on the host
            assert need["optimizer state"] == 8 * (sum(count) - kept_params)
        host.remove()
    if device_blocks:
        assert [g.device_step for g in got[2].engine.blocks] == [i < device_blocks for i in range(len(eng.blocks))]
        sd = got[2].optimizer_state_dict()  # the user's format, state of every parameter
        assert len(sd["state"]) == len(list(got[3].param_groups[0]["params"]))
    torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(ref[0]), rtol=1e-5, atol=1e-5)
    for k in ref[1]:
        torch.testing.assert_close(got[1][k], ref[1][k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    assert got[2].stats()["steps"] == STEPS
    got[2].remove()


def test_meta_model_materialised_block_by_block_trains_like_plain():
    """A model built on the meta device gets its values one block at a time inside offload_module (HF init,
    ties kept); from the same initial weights it trains like the plain model. Without ``materialize`` the
    error says what to pass."""
    import transformers as tf

    cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    with torch.device("meta"):
        model = tf.GPT2LMHeadModel(cfg)
    with pytest.raises(OffloadError, match="meta device.*materialize="):
        offload_module(model, None, "all", device="cpu")
    with pytest.raises(OffloadError, match="needs an offload mode"):
        offload_module(model, None, "none", device="cpu", materialize=model._init_weights)
    with torch.device("meta"):
        bn = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    with pytest.raises(OffloadError, match="buffer '1.running_mean' is on the meta device"):
        offload_module(bn, None, "all", blocks=[bn[0]], device="cpu", materialize=lambda m: None)
    opt = _adamw(model.parameters())
    h = offload_module(model, opt, "all", device="cpu", materialize=model._init_weights)
    assert not any(p.is_meta for p in model.parameters())
    assert model.transformer.wte.weight is model.lm_head.weight
    init = {k: v.clone() for k, v in h.state_dict().items()}
    w = init["transformer.h.0.attn.c_proj.weight"]
    assert abs(float(w.std()) - 0.02 / 2) < 0.004              # GPT-2's scaled residual init reached the block
    ref = tf.GPT2LMHeadModel(cfg)
    ref.load_state_dict(init)
    ref_opt = _adamw(ref.parameters())
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = {}
    for name, m, o in (("offload", model, opt), ("plain", ref, ref_opt)):
        losses[name] = []
        for _ in range(3):
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            o.step()
            o.zero_grad()
            losses[name].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["offload"]), torch.tensor(losses["plain"]), rtol=1e-5, atol=1e-6)
    got = h.state_dict()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got[k].float(), v.float(), rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
    h.remove()


def _train_steps(model, batch_fn, opt, steps=STEPS, on_step=None):
    losses = []
    for s in range(steps):
        loss = zoo.loss_of(model(**batch_fn(BATCH, 100 * s)))
        loss.backward()
        losses.append(loss.item())
        if on_step is not None:
            on_step(s)
        opt.step()
        opt.zero_grad()
    return losses, {k: v.detach().float().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["gpt2", "bert", "cnn"])
@pytest.mark.parametrize("mode,device_blocks,rest", [("all", 0, False), ("all", 2, False), ("optimizer", 1, False),
                                                 ("all", 1, True)])
def test_step_in_backward_matches_plain(family, mode, device_blocks, rest):
    """step_in_backward: each block steps as its last gradient arrives in backward (CPU-stepped blocks on the
    worker, GPU-stepped ones from gradients that never left the device); training equals plain PyTorch."""
    def opt_fn(ps):
        return torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)

    model, batch_fn = zoo.make_with_batches(family, 0)
    ref = _train_steps(model, batch_fn, opt_fn(model.parameters()))
    model, batch_fn = zoo.make_with_batches(family, 0)
    opt = opt_fn(model.parameters())
    h = offload_module(model, opt, mode, device="cpu", prefetch_blocks=1, async_step=True,
                       device_step_blocks=device_blocks, step_in_backward=True, gpu_step_rest=rest)
    eng = h.engine
    assert eng.rest.device_step == rest
    stepped = []

    def during(s):   # between backward and step: the blocks already stepped, gradients are off limits
        stepped.append(sum(g.early for g in eng.blocks))
        with pytest.raises(OffloadError, match="already stepped during backward"):
            h.clip_grad_norm_(1.0)

    got = _train_steps(model, batch_fn, opt, on_step=during)
    assert stepped == [len(eng.blocks)] * STEPS
    assert eng.stats()["early_block_steps"] == len(eng.blocks) * STEPS and eng.stats()["steps"] == STEPS
    torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(ref[0]), rtol=1e-5, atol=1e-6)
    for k in ref[1]:
        torch.testing.assert_close(got[1][k], ref[1][k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    # a second backward without optimizer.step() in between is refused, with the way out in the message
    loss = zoo.loss_of(model(**batch_fn(BATCH, 7)))
    loss.backward()
    with pytest.raises(OffloadError, match="after it already stepped"):
        zoo.loss_of(model(**batch_fn(BATCH, 8))).backward()
    h.remove()


@pytest.mark.parametrize("steps_only", [False, True])
@pytest.mark.parametrize("kernel", ["default", "fused", "capturable"])
def test_loaded_state_moves_to_the_device_with_step_counts_where_the_kernel_reads_them(kernel, steps_only):
    """A resumed device-stepped block: its Adam state goes to the GPU; the step counts too for the fused and
    capturable kernels (a Trainer's default AdamW is fused), which refuse host step counts among device tensors.
    A streamed block (``steps_only``) moves its step counts alone."""
    from rannc_hf.offload.engine_state import state_to_device_

    w = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))]
    opt = torch.optim.AdamW(w, lr=1e-3)
    for p in w:
        p.grad = torch.ones_like(p)
    opt.step()
    if kernel != "default":   # the flag as the device kernel sees it (capturable needs a GPU to step)
        opt.param_groups[0][kernel] = True
    before = [(k, v) for p in w for k, v in opt.state[p].items()]   # kept alive: ids stay unique
    key_of = {id(v): k for k, v in before}
    moved = []

    def move(v):
        moved.append(key_of[id(v)])
        return v.clone()

    state_to_device_(opt, move, steps_only=steps_only)
    want = ({} if steps_only else {"exp_avg": 2, "exp_avg_sq": 2}) | ({} if kernel == "default" else {"step": 2})
    assert {k: moved.count(k) for k in set(moved)} == want
    assert all(id(v) not in key_of for p in w for k, v in opt.state[p].items() if k in want)   # the moved copies
