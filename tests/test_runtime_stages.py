"""Stage builder: split graphs run sequentially in one process give the unsplit model's loss and gradients."""

from __future__ import annotations

import random

import pytest
import torch

from rannc_hf.capture import capture
from rannc_hf.runtime.planning import decide_layout, default_microbatches, fallback_cuts
from rannc_hf.runtime.stages import build_stages, meta_args, run_sequential, stage_bounds, stage_specs
from rannc_hf.config import RanncConfig
from rannc_hf.errors import PlanMismatchError
from rannc_hf.zoo import FAMILIES, loss_of, make

TRIALS = 8


@pytest.fixture(scope="module")
def captured():
    out = {}
    for fam in FAMILIES:
        model, batch = make(fam, batch_size=2)
        out[fam] = (model, batch, capture(model, batch))
    return out


def _grads(model):
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("family", FAMILIES)
def test_random_valid_cuts_match_unsplit(captured, family):
    model, batch, g = captured[family]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.zero_grad()
    ref = loss_of(model(**batch))
    ref.backward()
    ref_grads = _grads(model)
    valid = [i for i, ok in enumerate(g.valid_cuts) if ok]
    rng = random.Random(family)
    trials = [[valid[0]], [valid[-1]], fallback_cuts(g, 4)]
    trials += [sorted(rng.sample(valid, rng.randint(1, min(6, len(valid))))) for _ in range(TRIALS)]
    for cuts in trials:
        model.load_state_dict(state)
        model.zero_grad()
        stages = build_stages(g, cuts)
        loss = run_sequential(stages, batch)
        loss.backward()
        assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-6 + 1e-6 * abs(float(ref.detach())), cuts
        for (name, p), r in zip(model.named_parameters(), ref_grads):
            if r is None:
                assert p.grad is None or not p.grad.any(), (cuts, name)
                continue
            torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-7, msg=f"{family} cuts {cuts} {name}")
    model.load_state_dict(state)


@pytest.mark.parametrize("family", FAMILIES)
def test_stage_interfaces(captured, family):
    _, _, g = captured[family]
    cuts = fallback_cuts(g, 3)
    specs = stage_specs(g, cuts)
    assert [s.op_range for s in specs] == stage_bounds(g, cuts)
    assert specs[0].inputs == [i.name for i in g.inputs]
    assert specs[-1].outputs == [g.loss]
    for a, b in zip(specs, specs[1:]):
        assert a.outputs == b.inputs                      # what one stage sends is what the next receives
    for s in specs:
        for t in meta_args(g, s.inputs):
            assert t.device.type == "meta"
            assert t.requires_grad == t.is_floating_point()
    # parameters are the model's own objects
    stages = build_stages(g, cuts)
    own = {id(p) for p in g.module.parameters()}
    assert all(id(p) in own for st in stages for p in st.parameters())


def test_boundary_outputs_are_contiguous(captured):
    _, batch, g = captured["t5"]
    stages = build_stages(g, fallback_cuts(g, 4))
    from rannc_hf.runtime.stages import batch_inputs

    out = batch_inputs(g, batch)
    for st in stages[:-1]:
        out = st(*out)
        assert all(t.is_contiguous() for t in out)


def test_invalid_cut_rejected(captured):
    _, _, g = captured["gpt2"]
    bad = [i for i, ok in enumerate(g.valid_cuts) if not ok and i < len(g.ops) - 1]
    with pytest.raises(ValueError, match="not a valid cut"):
        build_stages(g, [bad[0]])


def test_fallback_cuts_balance_and_layout(captured):
    _, _, g = captured["gpt2"]
    cuts = fallback_cuts(g, 4)
    assert len(cuts) == 3 and cuts == sorted(cuts) and all(g.valid_cuts[c] for c in cuts)
    with pytest.raises(PlanMismatchError):
        fallback_cuts(captured["forkjoin"][2], 1000)
    assert default_microbatches(8, 2) == 4 and default_microbatches(6, 4) == 6 and default_microbatches(7, 2) == 1
    lay = decide_layout(None, None, RanncConfig(num_stages=2, precision="fp32"), world_size=4, batch_size=16)
    assert (lay.num_stages, lay.dp_size, lay.num_microbatches, lay.schedule) == (2, 2, 4, "1f1b")
    with pytest.raises(PlanMismatchError, match="3 were launched"):
        decide_layout(None, None, RanncConfig(num_stages=2, dp_size=2), world_size=3, batch_size=16)


def test_recompute_and_bf16_stage_run(captured):
    model, batch, g = captured["gpt2"]
    model.zero_grad()
    ref = loss_of(model(**batch))
    ref.backward()
    ref_grads = _grads(model)
    model.zero_grad()
    stages = build_stages(g, fallback_cuts(g, 2), recompute="full")
    loss = run_sequential(stages, batch)
    loss.backward()
    assert abs(float(loss) - float(ref)) < 1e-6
    for p, r in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-7)
    model.zero_grad()
    stages = build_stages(g, fallback_cuts(g, 2), precision="bf16")
    with torch.no_grad():
        loss = run_sequential(stages, batch)
    assert loss.dtype == torch.float32 and abs(float(loss) - float(ref)) < 0.1


def test_stage_built_for_another_device_keeps_no_capture_device():
    """A model captured on the host and run on a GPU: every device baked into the graph (keyword or positional,
    e.g. HF's ``attention_mask.to(device, torch.bool)``) must name the target. The meta device stands in for
    the GPU here: a leftover CPU tensor meeting meta ones fails the run."""
    import copy

    import transformers as tf

    from rannc_hf.capture import capture
    from rannc_hf.runtime.stages import batch_inputs, build_stages

    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, vocab_size=64, use_cache=False,
                        bos_token_id=0, eos_token_id=0)
    model = tf.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 64, (2, 32))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    g = capture(model, batch)
    assert "device(type='cpu')" in g.module.code          # the capture did bake the host device in
    meta = torch.device("meta")
    stage = build_stages(g, [], model=copy.deepcopy(model).to(meta), device=meta)[0]
    assert "cpu" not in stage.gm.code
    loss = stage.gm(*[t.to(meta) for t in batch_inputs(g, batch)])
    assert loss.device == meta and loss.shape == ()


class _LiveBytes:
    """Bytes of live tensors that own storage, and their peak, while the mode is on (a CPU stand-in for
    ``torch.cuda.max_memory_allocated``: autograd's saved tensors keep their tensors alive)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                import weakref

                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else [out]:
                    if isinstance(t, torch.Tensor) and t._base is None:
                        n = t.untyped_storage().nbytes()
                        outer.live += n
                        outer.peak = max(outer.peak, outer.live)
                        weakref.finalize(t, outer._free, n)
                return out

        self.mode, self.live, self.peak = Mode(), 0, 0

    def _free(self, n):
        self.live -= n


def test_segmented_recompute_keeps_checkpoints_not_activations():
    """recompute='full' checkpoints the stage in segments cut where little crosses (the planner's rule):
    same gradients, and a backward peak far below the whole-stage checkpoint's (which recomputes everything
    at once, so saves nothing on a single microbatch)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_embd=64, n_layer=6, n_head=4, n_positions=64, vocab_size=64, use_cache=False,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = tf.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 64, (4, 64))
    batch = {"input_ids": ids, "labels": ids}
    g = capture(model, batch)
    from rannc_hf.runtime.stages import batch_inputs

    peaks, grads = {}, {}
    for name, rc, whole in [("none", "none", False), ("whole", "full", True), ("segments", "full", False)]:
        stage = build_stages(g, [], model=model, recompute=rc)[0]
        if whole:
            stage.segment_starts = set()
        model.zero_grad()
        probe = _LiveBytes()
        with probe.mode:
            stage(*batch_inputs(g, batch)).backward()
        peaks[name] = probe.peak
        grads[name] = [p.grad.clone() for p in model.parameters()]
        if name == "segments":
            assert len(stage.segments()) > 6          # at least one segment per layer
    for name in ("whole", "segments"):
        for a, b in zip(grads[name], grads["none"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert peaks["whole"] > 0.6 * peaks["none"]
    assert peaks["segments"] < 0.4 * peaks["whole"]


def _tiny_gpt2_captured(n_layer: int):
    """(model, batch, captured graph) of a seeded 32-wide GPT-2 without dropout, batch 2 x 16."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_embd=32, n_layer=n_layer, n_head=4, n_positions=16, vocab_size=64, use_cache=False,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = tf.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 64, (2, 16))
    batch = {"input_ids": ids, "labels": ids}
    return model, batch, capture(model, batch)


def test_segments_fed_by_gradients_checkpoint_reentrant(monkeypatch):
    """Segments with an input that requires grad use the reentrant checkpoint (no per-tensor Python hooks; the
    H200's eager BERT step was bound by them); the first ones, fed token ids only, cannot (its parameters would get no
    gradient) and stays non-reentrant. Gradients equal the run without recompute exactly."""
    import torch.utils.checkpoint as ckpt

    from rannc_hf.runtime.stages import batch_inputs

    model, batch, g = _tiny_gpt2_captured(n_layer=4)
    grads = {}
    for rc in ("none", "full"):
        stage = build_stages(g, [], model=model, recompute=rc)[0]
        model.zero_grad()
        calls = []
        real = ckpt.checkpoint

        def recording(fn, *args, use_reentrant=None, **kw):
            calls.append(use_reentrant)
            return real(fn, *args, use_reentrant=use_reentrant, **kw)

        monkeypatch.setattr(ckpt, "checkpoint", recording)
        stage(*batch_inputs(g, batch)).backward()
        monkeypatch.setattr(ckpt, "checkpoint", real)
        grads[rc] = [p.grad.clone() for p in model.parameters()]
        if rc == "full":
            assert len(calls) == len(stage.segments()) > 2
            # the segments before the first layer read only ids, positions and masks; every layer's is reentrant
            assert calls[0] is False and all(calls[-model.config.n_layer:])
    for a, b in zip(grads["full"], grads["none"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reentrant_segments_under_a_callers_autocast_region_train_every_weight():
    """Inside a caller's autocast region spanning forward and backward (RanncModule runs the backward inside its
    forward), a reentrant segment's forward casts weights without autograd: its recomputation must not reuse such
    a cast (its weights would get no gradient). bf16 on CPU: every gradient equals the run without recompute."""
    from rannc_hf.runtime.stages import batch_inputs

    model, batch, g = _tiny_gpt2_captured(n_layer=3)
    grads = {}
    for rc in ("none", "full"):
        stage = build_stages(g, [], model=model, recompute=rc, precision="bf16")[0]
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            stage(*batch_inputs(g, batch)).backward()
        grads[rc] = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads["full"])
    for a, b in zip(grads["full"], grads["none"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_plan_records_recompute_segments_and_runtime_uses_them(tmp_path):
    """The planner prices recompute with the segments it records in the plan; the stage checkpoints exactly
    those; the plan's JSON keeps them."""
    import rannc_hf
    from rannc_hf.planner import Plan

    model, batch = make("gpt2", batch_size=4)
    p = rannc_hf.plan(model, batch, cluster=rannc_hf.Cluster(num_gpus=2, device="cpu"),
                      config=rannc_hf.RanncConfig(num_stages=2, num_microbatches=2, recompute="full",
                                                  precision="fp32"), progress=False)
    assert all(s.recompute == "full" for s in p.stages) and any(s.recompute_starts for s in p.stages)
    p.save(tmp_path / "p.json")
    q = Plan.load(tmp_path / "p.json")
    assert [s.recompute_starts for s in q.stages] == [s.recompute_starts for s in p.stages]
    g = capture(model, {k: v[:2] for k, v in batch.items()})
    cuts = [s.op_range[1] for s in p.stages[:-1]]
    stages = build_stages(g, cuts, model=model, recompute="full", recompute_starts=[s.recompute_starts for s in p.stages])
    for st, sp in zip(stages, p.stages):
        assert st.segment_starts == {g.ops[i].name for i in sp.recompute_starts}
        assert len(st.segments()) == len(sp.recompute_starts) + 1
