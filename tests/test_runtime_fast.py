"""Single-stage fast path: one stage, one replica -> the user's module runs directly (plain autograd for M=1).

Reference: single-process training, per step gradient accumulation over M contiguous chunks (loss / M),
clip_grad_norm_(1.0), AdamW. fp32, CPU, one process (a one-rank gloo group).
"""

from __future__ import annotations

import pytest
import torch

import rannc_hf
from dist_helpers import accumulated_reference
from rannc_hf.zoo import loss_of, make, make_with_batches

BATCH, STEPS, LR = 4, 2, 1e-3


def _reference(fam: str, m: int, steps: int = STEPS):
    model, bf = make_with_batches(fam, 0)
    losses, _ = accumulated_reference(model, bf, steps, BATCH, m, LR)
    return losses, model.state_dict()


def _rannc(fam: str, m: int, steps: int = STEPS, batches=None, **cfg):
    """``batches``: wraps the family's batch function (e.g. to drop a key)."""
    model, bf = make_with_batches(fam, 0)
    bf = batches(bf) if batches is not None else bf
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    rm = rannc_hf.RanncModule(model, opt, config=rannc_hf.RanncConfig(
        num_stages=1, num_microbatches=m, precision="fp32", **cfg))
    losses = []
    for step in range(steps):
        loss = loss_of(rm(**bf(BATCH, step)))
        loss.backward()
        rm.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return rm, opt, losses


def _close(sd, ref, rtol=1e-5, atol=1e-6):
    assert set(sd) == set(ref)
    for k, r in ref.items():
        if r.is_floating_point():
            torch.testing.assert_close(sd[k], r, rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("family,m", [("gpt2", 1), ("gpt2", 2), ("llama", 1), ("cnn", 2), ("t5", 2)])
def test_fast_path_matches_single_process(family, m):
    rm, opt, losses = _rannc(family, m)
    assert rm._fast and rm._primary is None and not rm._variants
    ref_losses, ref_sd = _reference(family, m)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    _close(rm.state_dict(), ref_sd)
    # the optimizer was left alone: every parameter is local
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(rm.module.parameters()))


def test_fast_path_m1_returns_live_autograd_loss():
    model, bf = make_with_batches("gpt2", 0)
    rm = rannc_hf.RanncModule(model, None, config=rannc_hf.RanncConfig(num_stages=1, num_microbatches=1,
                                                                       precision="fp32"))
    out = rm(**bf(BATCH, 0))
    assert out.loss.grad_fn is not None and "CarryGrads" not in type(out.loss.grad_fn).__name__
    assert out.logits.shape[0] == BATCH                   # the model's whole output comes back


@pytest.mark.parametrize("m", [1, 2])
def test_fast_path_scaling_accumulation_and_optimizer_state(m):
    model, bf = make_with_batches("forkjoin", 0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    rm = rannc_hf.RanncModule(model, opt, config=rannc_hf.RanncConfig(num_stages=1, num_microbatches=m,
                                                                       precision="fp32"))
    ref, _ = make_with_batches("forkjoin", 0)
    ropt = torch.optim.AdamW(ref.parameters(), lr=LR)
    for step, w in enumerate([1.0, 0.5]):                 # accumulation across calls, user-side scaling
        b = bf(BATCH, step)
        (loss_of(rm(**b)) * w).backward()
        for c in range(m):
            (loss_of(ref(**{k: v.chunk(m)[c] for k, v in b.items()})) * w / m).backward()
    n1, n2 = rm.clip_grad_norm_(1.0), torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    torch.testing.assert_close(n1, n2, rtol=1e-5, atol=1e-6)
    opt.step()
    ropt.step()
    _close(rm.state_dict(), ref.state_dict())
    osd = rm.optimizer_state_dict()
    assert set(osd["state"]) == {n for n, _ in model.named_parameters()}
    rm.load_optimizer_state_dict(osd)
    with torch.no_grad():                                  # forward only: loss (and no gradients)
        out = rm(**bf(BATCH, 5))
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert torch.isfinite(loss_of(out))


def test_plan_keeps_planner_predictions():
    model, bf = make_with_batches("gpt2", 0)
    rm = rannc_hf.RanncModule(model, None, config=rannc_hf.RanncConfig(num_stages=1, num_microbatches=1,
                                                                       precision="fp32"), example_batch=bf(BATCH, 0))
    assert rm.built and rm.plan.predicted_step_time > 0 and rm.plan.stages[0].peak_bytes > 0
    assert "memory 0 B" not in rm.plan.summary()


@pytest.mark.parametrize("m", [1, 2])
def test_compile_true_matches_eager(monkeypatch, m):
    monkeypatch.setenv("RANNC_HF_COMPILE_BACKEND", "aot_eager")      # inductor on 2 CPU cores is too slow here
    rm, opt, losses = _rannc("forkjoin", m, compile="true")
    assert rm.compile_enabled and rm._fast_fn is not rm.module
    ref_losses, ref_sd = _reference("forkjoin", m)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-5)
    _close(rm.state_dict(), ref_sd, rtol=1e-4, atol=1e-5)
    assert not rannc_hf.RanncModule(torch.nn.Linear(2, 2), config=rannc_hf.RanncConfig(precision="bf16")).compile_enabled


def test_compiled_encoder_runs_the_captured_graph(monkeypatch):
    """Compiled, an encoder's own forward would build the all-true padding mask eager skips (fp32 math attention on
    the H200); the fast path steps aside and the captured graph, that mask dropped, is compiled and trains the same
    model as the single-process run. A causal model (GPT-2) keeps the fast path."""
    monkeypatch.setenv("RANNC_HF_COMPILE_BACKEND", "aot_eager")

    def unmasked(bf):   # input_ids and labels only, as in a packed pretraining batch
        return lambda b, s: {k: v for k, v in bf(b, s).items() if k != "attention_mask"}

    rm, opt, losses = _rannc("bert", 1, batches=unmasked, compile="true")
    assert rm.plan.bidirectional_attention and not rm._fast and rm._primary is not None
    stage = rm._primary.pipe.modules[0]
    assert stage.compiled is not None
    attn = [n for n in stage.gm.graph.nodes if "scaled_dot_product" in str(n.target)]
    assert attn and all(len(n.args) < 4 or n.args[3] is None for n in attn)   # no mask reaches attention
    ref_model, ref_bf = make_with_batches("bert", 0)
    ref_losses, _ = accumulated_reference(ref_model, unmasked(ref_bf), STEPS, BATCH, 1, LR)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-5)
    _close(rm.state_dict(), ref_model.state_dict(), rtol=1e-4, atol=1e-5)
    rm_gpt, _, _ = _rannc("gpt2", 1, steps=1, compile="true")
    assert rm_gpt._fast and not rm_gpt.plan.bidirectional_attention


def test_eval_forward_returns_logits():
    model, bf = make_with_batches("gpt2", 0)
    rm = rannc_hf.RanncModule(model, None, config=rannc_hf.RanncConfig(num_stages=1, num_microbatches=2,
                                                                       precision="fp32"))
    rm.build(bf(BATCH, 0))
    rm.eval()
    b = bf(3, 0)                                          # 3 rows, 2 microbatches: padded, cut back
    out = rm.eval_forward(**b)
    ref = model(**b)
    assert isinstance(out, dict) and out["logits"].shape == ref.logits.shape
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_recompute_full_runs_segmented_stage_and_matches(family):
    """recompute='full' needs the stage graph (checkpointed segments), so the fast path steps aside; the
    training is still the single-process one."""
    rm, opt, losses = _rannc(family, 2, recompute="full")
    assert not rm._fast and rm._primary is not None
    stage = rm._primary.pipe.modules[0]
    assert stage.recompute == "full" and len(stage.segments()) > 1
    ref_losses, ref_sd = _reference(family, 2)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    _close(rm.state_dict(), ref_sd)


def test_gpu_memory_cap_is_enforced_on_cuda(monkeypatch):
    """config gpu_memory caps the CUDA caching allocator (so a plan for a smaller GPU also runs as one);
    no cap on CPU or when the cap is the device's size or more. torch.cuda is stubbed: no GPU needed."""
    from types import SimpleNamespace

    from rannc_hf.runtime.building import apply_memory_cap

    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=100 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "stub")
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    cuda0 = torch.device("cuda", 0)
    assert apply_memory_cap(24 * 2**30, cuda0) == 0.24 and calls == [(0.24, cuda0)]
    assert apply_memory_cap(None, cuda0) is None
    assert apply_memory_cap(200 * 2**30, cuda0) is None
    assert apply_memory_cap(24 * 2**30, torch.device("cpu")) is None
    assert len(calls) == 1


@pytest.mark.parametrize("mode,train_backend,eval_backend", [("auto", "inductor", None), ("true", "inductor", "inductor"),
                                                             ("false", None, None)])
def test_compile_auto_leaves_eval_graphs_eager(monkeypatch, mode, train_backend, eval_backend):
    """``compile: auto`` compiles training graphs on CUDA with bf16 but not evaluation graphs (a few eval batches
    do not repay a compile); ``true`` compiles both. Checked on the backend choice, as CUDA is not here."""
    monkeypatch.delenv("RANNC_HF_COMPILE_BACKEND", raising=False)
    rm = rannc_hf.RanncModule(torch.nn.Linear(2, 2), config=rannc_hf.RanncConfig(precision="bf16", compile=mode))
    rm.device = torch.device("cuda", 0)                    # as on a GPU rank; nothing runs on it here
    assert rm._compile_backend(train=True) == train_backend
    assert rm._compile_backend(train=False) == eval_backend


@pytest.mark.parametrize("fam", ["gpt2", "bert"])
def test_compile_auto_as_the_runtime_decides_it_on_a_gpu(fam):
    """``compile: auto`` on a CUDA device with bf16 compiles decoders and encoders alike (an encoder through its
    captured graph); on CPU never. The device is faked: only the decision is under test."""
    model, bf = make_with_batches(fam, 0)
    rm = rannc_hf.RanncModule(model, None, config=rannc_hf.RanncConfig(num_stages=1, num_microbatches=1,
                                                                       precision="bf16"), example_batch=bf(BATCH, 0))
    assert rm.built and rm.plan.bidirectional_attention is (fam == "bert")
    assert not rm.compile_enabled and not rm._compiled_encoder()   # on this CPU: never
    rm.device = torch.device("cuda")
    assert rm.compile_enabled and rm._compile_backend(train=True) is not None
    assert rm._compiled_encoder() is (fam == "bert")
