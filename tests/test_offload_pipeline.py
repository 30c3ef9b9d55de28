"""Offload inside pipeline stages == training without offload (fp32, AdamW, 4 microbatches, clip 1.0).

The 2-rank gloo worker (tests/offload_dist_worker.py) starts once and loops over GPT-2, BERT and the CNN x
{optimizer on both stages, params on stage 0, all on stage 1, all on both}; references are single-process
gradient accumulation over the same 4 chunks. Single-process RanncModule with offload is checked here too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import rannc_hf
from rannc_hf.errors import OffloadError
from rannc_hf.runtime.stages import _fence_kinds
from dist_helpers import accumulated_reference, run_steps
from rannc_hf.zoo import loss_of, make_with_batches

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "offload_dist_worker.py")
BATCH, STEPS, LR, M = 8, 3, 1e-3, 4
RTOL, ATOL = 1e-5, 1e-6
CASES = ["opt_both", "params_s0", "all_s1", "all_both"]
EXPECT = {"opt_both": ["optimizer", "optimizer"], "params_s0": ["params", "none"], "all_s1": ["none", "all"],
          "all_both": ["all", "all"]}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("offload_pp"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER, d]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise AssertionError(f"offload workers failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return d


_REFS: dict = {}
_GRAPHS: dict = {}


def graph_for(fam: str, mb: int):
    """One capture per family and microbatch size (a structurally identical model trains on it)."""
    if (fam, mb) not in _GRAPHS:
        from rannc_hf.capture import capture

        model, bf = make_with_batches(fam, 0)
        _GRAPHS[(fam, mb)] = capture(model, bf(mb, 0))
    return _GRAPHS[(fam, mb)]


def reference(fam: str):
    if fam in _REFS:
        return _REFS[fam]
    model, bf = make_with_batches(fam, 0)
    losses, norms = accumulated_reference(model, bf, STEPS, BATCH, M, LR)
    _REFS[fam] = (losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()})
    return _REFS[fam]


def _info(out: str, name: str) -> list[dict]:
    ranks = json.load(open(os.path.join(out, name + ".json")))["ranks"]
    for r, i in enumerate(ranks):
        assert i["ok"], f"{name} rank {r}: {i.get('error')}\n{i.get('trace')}"
    return ranks


def _close_sd(got: dict, ref: dict) -> None:
    for k, r in ref.items():
        if r.is_floating_point():
            torch.testing.assert_close(got[k], r, rtol=RTOL, atol=ATOL, msg=k)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family", ["gpt2", "bert", "cnn"])
def test_pipeline_offload_matches_plain_training(out, family, case):
    name = f"{family}_{case}"
    ranks = _info(out, name)
    losses, norms, sd = reference(family)
    info = ranks[0]
    torch.testing.assert_close(torch.tensor(info["losses"]), torch.tensor(losses), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.tensor(info["norms"]), torch.tensor(norms), rtol=RTOL, atol=ATOL)
    _close_sd(load_file(os.path.join(out, name + ".safetensors")), sd)
    # the per-stage choice was honoured: an engine exactly where the plan asked, with blocks that moved
    assert info["stage_offload"] == EXPECT[case]
    for r, i in enumerate(ranks):
        want = EXPECT[case][r]
        assert i["mode"] == want
        if want != "none":
            assert i["blocks"] >= 1
        if want in ("params", "all"):
            assert i["fetches"] > 0 and i["resident_peak_blocks"] <= 3


@pytest.mark.parametrize("mode", ["optimizer", "all"])
def test_offloaded_stage_with_two_replicas_matches_plain_training(out, mode):
    """One stage offloaded on each of 2 data-parallel replicas (2 microbatches each): the same training as one
    process accumulating over the 4 chunks."""
    ranks = _info(out, f"gpt2_dp2_{mode}")
    losses, norms, sd = reference("gpt2")
    for i in ranks:
        assert i["mode"] == mode and i["blocks"] >= 1
        torch.testing.assert_close(torch.tensor(i["losses"]), torch.tensor(losses), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(torch.tensor(i["norms"]), torch.tensor(norms), rtol=RTOL, atol=ATOL)
    _close_sd(load_file(os.path.join(out, f"gpt2_dp2_{mode}.safetensors")), sd)


def test_interleaved_stages_with_offload_match_plain_training(out):
    """Interleaved 1F1B, 4 stages on 2 ranks with different offload modes (one engine per rank runs the
    stronger mode of its two stages): the same training as one process."""
    ranks = _info(out, "gpt2_interleaved_all")
    losses, norms, sd = reference("gpt2")
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(losses), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.tensor(ranks[0]["norms"]), torch.tensor(norms), rtol=RTOL, atol=ATOL)
    _close_sd(load_file(os.path.join(out, "gpt2_interleaved_all.safetensors")), sd)
    assert [i["mode"] for i in ranks] == ["all", "all"]      # rank 0: stages 0 (all) + 2 (optimizer) -> all
    assert all(i["blocks"] >= 1 for i in ranks)


def test_step_in_backward_in_pipeline_stages_and_replicas(out):
    """step_in_backward at pp=2 (the CNN, stages in all and optimizer mode): each rank's blocks step inside its
    backward; with two data-parallel replicas (GPT-2) the gradients are averaged first, and GPT-2's embedding is
    tied across its two stages (its gradients are summed over them on the device, the rest stay on the host), so
    the runtime steps after backward there. All train as one process without clipping."""
    for fam, name in (("cnn", "cnn_sib_pp2"), ("gpt2", "gpt2_sib_dp2"), ("gpt2", "gpt2_sib_pp2")):
        model, bf = make_with_batches(fam, 0)
        losses, _ = accumulated_reference(model, bf, STEPS, BATCH, M, LR, clip=None)
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ranks = _info(out, name)
        torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(losses), rtol=RTOL, atol=ATOL)
        _close_sd(load_file(os.path.join(out, name + ".safetensors")), sd)
    pp2, dp2, tied = _info(out, "cnn_sib_pp2"), _info(out, "gpt2_sib_dp2"), _info(out, "gpt2_sib_pp2")
    assert all(i["early_block_steps"] == i["blocks"] * STEPS and i["blocks"] >= 1 for i in pp2)
    assert all(i["early_block_steps"] == 0 for i in dp2 + tied)


def test_bf16_pipeline_offload_tracks_bf16_without(out):
    """bf16 compute with offload (bf16 working copies of fp32 masters) trains like bf16 autocast without
    offload, up to bf16 rounding of the weights outside matmuls; masters stay fp32."""
    got, ref = _info(out, "gpt2_bf16_opt_both"), _info(out, "gpt2_bf16_none")
    assert [i["mode"] for i in got] == ["optimizer", "optimizer"] and [i["mode"] for i in ref] == ["none", "none"]
    torch.testing.assert_close(torch.tensor(got[0]["losses"]), torch.tensor(ref[0]["losses"]), rtol=1e-2, atol=1e-2)
    a = load_file(os.path.join(out, "gpt2_bf16_opt_both.safetensors"))
    b = load_file(os.path.join(out, "gpt2_bf16_none.safetensors"))
    for k, v in b.items():
        if v.is_floating_point():
            assert a[k].dtype == torch.float32
            torch.testing.assert_close(a[k], v, rtol=0, atol=5e-3, msg=k)


def test_pipeline_offload_optimizer_state_matches(out):
    """optimizer_state_dict() of an offloaded pipeline (host state, gathered) == the non-offloaded one."""
    _info(out, "gpt2_all_both")
    _info(out, "gpt2_none")
    a = load_file(os.path.join(out, "gpt2_all_both.safetensors"))
    b = load_file(os.path.join(out, "gpt2_none.safetensors"))
    keys = [k for k in b if k.startswith("optim::")]
    assert keys and set(keys) == {k for k in a if k.startswith("optim::")}
    for k in keys:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=k)


def _rannc(fam: str, mode: str, steps: int = STEPS):
    model, bf = make_with_batches(fam, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    rm = rannc_hf.RanncModule(model, opt, config=rannc_hf.RanncConfig(num_stages=1, num_microbatches=M,
                                                                      precision="fp32", offload=mode),
                              graph=graph_for(fam, BATCH // M))
    losses = []
    for step in range(steps):
        loss = loss_of(rm(**bf(BATCH, step)))
        loss.backward()
        rm.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return rm, opt, losses


@pytest.mark.parametrize("family,mode", [("gpt2", "all"), ("cnn", "params"), ("bert", "optimizer")])
def test_single_stage_offload_matches_plain(family, mode):
    rm, opt, losses = _rannc(family, mode)
    ref_losses, _, ref_sd = reference(family)
    assert rm._offload is not None and rm._offload.mode == mode
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)
    _close_sd(rm.state_dict(), ref_sd)
    # checkpoint round trip: model + optimizer state into a fresh offloaded wrapper, one more step each
    sd, osd = rm.state_dict(), rm.optimizer_state_dict()
    model2, bf = make_with_batches(family, 1)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=LR)
    rm2 = rannc_hf.RanncModule(model2, opt2, config=rannc_hf.RanncConfig(num_stages=1, num_microbatches=M,
                                                                        precision="fp32", offload=mode),
                               example_batch=bf(BATCH, 0), graph=graph_for(family, BATCH // M))
    rm2.load_state_dict(sd)
    rm2.load_optimizer_state_dict(osd)
    for m, o in ((rm, opt), (rm2, opt2)):
        loss_of(m(**bf(BATCH, STEPS))).backward()
        m.clip_grad_norm_(1.0)
        o.step()
        o.zero_grad()
    _close_sd(rm2.state_dict(), rm.state_dict())


@pytest.mark.parametrize("device_accumulate", ["0", "1"])
def test_offload_gradient_accumulation_across_calls(monkeypatch, device_accumulate):
    """Two forward/backward calls (second loss scaled) before one step: same as without offload, with each
    call's micro-batches summed on the host or (forced here on the CPU) in the engine's device buffer."""
    monkeypatch.setenv("RANNC_HF_OFFLOAD_DEVICE_ACCUMULATE", device_accumulate)
    res = []
    for mode in ("none", "all"):
        model, bf = make_with_batches("gpt2", 0)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        rm = rannc_hf.RanncModule(model, opt, config=rannc_hf.RanncConfig(num_stages=1, num_microbatches=2,
                                                                          precision="fp32", offload=mode),
                                  graph=graph_for("gpt2", 2))
        for step in range(2):
            loss_of(rm(**bf(4, 2 * step))).backward()
            (loss_of(rm(**bf(4, 2 * step + 1))) * 0.5).backward()
            norm = rm.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad()
        res.append((float(norm), rm.state_dict()))
    torch.testing.assert_close(torch.tensor(res[1][0]), torch.tensor(res[0][0]), rtol=RTOL, atol=ATOL)
    _close_sd(res[1][1], res[0][1])


def test_offloaded_step_accepts_accelerates_none_closure():
    """Accelerate's optimizer wrapper calls ``step(None)``: that is a plain step; a real closure is refused."""
    res = []
    for mode, call in (("none", lambda o: o.step()), ("optimizer", lambda o: o.step(None)),
                       ("all", lambda o: o.step(closure=None))):
        model, bf = make_with_batches("gpt2", 0)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        rm = rannc_hf.RanncModule(model, opt, config=rannc_hf.RanncConfig(num_stages=1, num_microbatches=2,
                                                                          precision="fp32", offload=mode),
                                  graph=graph_for("gpt2", 2))
        loss_of(rm(**bf(4, 0))).backward()
        if mode != "none":
            with pytest.raises(OffloadError, match="takes no closure"):
                opt.step(lambda: 0.0)
        call(opt)
        opt.zero_grad()
        res.append(rm.state_dict())
    _close_sd(res[1], res[0])
    _close_sd(res[2], res[0])


@pytest.mark.parametrize("m", [1, 2])
def test_offloaded_call_leaves_gradients_in_host_buffers(monkeypatch, m):
    """A training call (forward + backward) never waits for the engine's background worker nor copies the
    gradients to the device and back (on the GPU that serialised the async step: 7 s/step for GPT 1.3B instead
    of ~0.5). Same training as without offload."""
    res = []
    for mode in ("none", "all"):
        model, bf = make_with_batches("gpt2", 0)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        rm = rannc_hf.RanncModule(model, opt, config=rannc_hf.RanncConfig(num_stages=1, num_microbatches=m,
                                                                          precision="fp32", offload=mode),
                                  graph=graph_for("gpt2", 4 // m))
        calls = []
        rm.build(bf(4, 0))
        if mode == "all":
            eng = rm._offload.engine
            for name in ("synchronize", "grad_of", "set_grad_"):
                orig = getattr(eng, name)
                monkeypatch.setattr(eng, name, lambda *a, _o=orig, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
        for step in range(2):
            calls.clear()
            loss_of(rm(**bf(4, step))).backward()
            if mode == "all":
                assert calls == [], f"step {step}: the training call waited or copied gradients: {calls}"
            rm.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad()
        res.append(rm.state_dict())
    _close_sd(res[1], res[0])


def test_offload_refuses_when_host_memory_is_short(monkeypatch):
    from rannc_hf.offload import store

    monkeypatch.setattr(store, "available_host_memory", lambda: 1000)
    model, bf = make_with_batches("gpt2", 0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    rm = rannc_hf.RanncModule(model, opt, config=rannc_hf.RanncConfig(num_stages=1, num_microbatches=2,
                                                                      precision="fp32", offload="all"),
                              graph=graph_for("gpt2", 2))
    with pytest.raises(OffloadError, match=r"needs .* of host memory .* available"):
        rm(**bf(4, 0))


def test_gpu_step_blocks_auto_from_plan_headroom(monkeypatch):
    """gpu_step_blocks='auto' keeps as many leading blocks' optimizer state on the GPU as the plan's memory
    headroom allows (the hybrid step that doubled offload throughput on the H200); an integer is taken as
    given; CPU devices, the params mode and plans without memory figures get none. torch.cuda is stubbed."""
    from types import SimpleNamespace

    import rannc_hf
    from rannc_hf.errors import ConfigError
    from rannc_hf.runtime.offload_stage import (_device_accumulate, _gpu_headroom, _gpu_step_blocks,
                                                choose_gpu_step_blocks, engine_mode_for)

    assert choose_gpu_step_blocks([100] * 10, 5000) == 4
    assert choose_gpu_step_blocks([100] * 10, 10**9) == 10
    assert choose_gpu_step_blocks([100] * 10, -1.0) == 0
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=10 * 2**30))
    monkeypatch.delenv("RANNC_HF_OFFLOAD_DEVICE_ACCUMULATE", raising=False)
    blocks = [[torch.nn.Parameter(torch.zeros(2**25))] for _ in range(8)]          # 32 Mi params: 256 MiB state
    stage = SimpleNamespace(memory={"total": 6 * 2**30}, peak_bytes=6 * 2**30)

    def module(device="cuda", microbatches=1, **cfg):
        return SimpleNamespace(device=torch.device(device), config=rannc_hf.RanncConfig(**cfg),
                               plan=SimpleNamespace(stages=[stage]),
                               layout=SimpleNamespace(num_microbatches=microbatches),
                               _primary=SimpleNamespace(pipe=SimpleNamespace(modules=[SimpleNamespace(
                                   spec=SimpleNamespace(index=0))])))

    def blocks_for(mode, m):
        return _gpu_step_blocks(m, blocks, mode, _gpu_headroom(m))

    # cap 10 GiB x 0.9 - 6 GiB planned = 3 GiB headroom; x 0.8 - 256 MiB transient = 2.15 GiB: all 8 blocks (2 GiB)
    assert blocks_for("optimizer", module()) == 8
    assert blocks_for("all", module(gpu_memory="8GiB")) == 2   # (7.2 - 6) x 0.8 - 0.25 GiB = 0.71
    assert blocks_for("optimizer", module(gpu_step_blocks=2)) == 2
    assert blocks_for("optimizer", module(gpu_step_blocks=99)) == 8
    assert blocks_for("optimizer", module("cpu")) == 0
    assert blocks_for("params", module()) == 0
    # micro-batch gradients summed on the GPU when the fp32 buffer fits in 0.8 x headroom (1 GiB of 2.4 here)
    n = 8 * 2**25
    assert _device_accumulate(module(microbatches=4), n, _gpu_headroom(module())) is True
    assert _device_accumulate(module(microbatches=1), n, _gpu_headroom(module())) is False
    assert _device_accumulate(module(microbatches=4, gpu_memory="7GiB"), n, _gpu_headroom(module(gpu_memory="7GiB"))) is False
    assert _device_accumulate(module("cpu", microbatches=4), n, None) is False
    # a plan's params mode (state on the GPU) runs on CUDA through the async pipeline, every block device-stepped
    assert engine_mode_for("params", True, 8, 0) == ("all", 8)
    assert engine_mode_for("params", False, 8, 0) == ("params", 0)
    assert engine_mode_for("optimizer", True, 8, 3) == ("optimizer", 3)
    for bad in ("many", -1):
        with pytest.raises(ConfigError, match="gpu_step_blocks"):
            rannc_hf.RanncConfig(gpu_step_blocks=bad)
        with pytest.raises(ConfigError, match="stream_step_blocks"):
            rannc_hf.RanncConfig(stream_step_blocks=bad)
    # streamed blocks come from the CPU-side ones: the configured count (default 0), capped; the environment
    # overrides it; auto balances the CPU against the link by the (stubbed) H200 profile; none on a CPU device
    from rannc_hf.runtime.offload_stage import _stream_step_blocks
    monkeypatch.delenv("RANNC_HF_OFFLOAD_STREAM_STEP", raising=False)
    opt_of = {"optimizer": torch.optim.AdamW([p for ps in blocks for p in ps])}
    streamed = (lambda m, k: _stream_step_blocks(SimpleNamespace(**vars(m), **opt_of), blocks, "all", k, False))
    assert streamed(module(), 2) == 0
    assert streamed(module(stream_step_blocks=3), 2) == 3 and streamed(module(stream_step_blocks=99), 2) == 6
    assert streamed(module("cpu", stream_step_blocks=3), 2) == 0
    monkeypatch.setenv("RANNC_HF_OFFLOAD_STREAM_STEP", "1")
    assert streamed(module(stream_step_blocks=3), 2) == 1
    monkeypatch.setenv("RANNC_HF_OFFLOAD_STREAM_STEP", "x")
    with pytest.raises(ConfigError, match="RANNC_HF_OFFLOAD_STREAM_STEP"):
        streamed(module(), 2)
    monkeypatch.delenv("RANNC_HF_OFFLOAD_STREAM_STEP")
    import rannc_hf.profile.devices as devices
    monkeypatch.setattr(devices, "local_device_name", lambda: "h200")
    assert 0 < streamed(module(stream_step_blocks="auto"), 2) < 6


def _train_gpt2(**cfg):
    """GPT-2 through one offloaded stage, M micro-batches, STEPS AdamW steps with clipping (the batches and
    optimizer of :func:`reference`): (RanncModule, losses, gradient norms)."""
    model, bf = make_with_batches("gpt2", 0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    rm = rannc_hf.RanncModule(model, opt, config=rannc_hf.RanncConfig(num_stages=1, num_microbatches=M,
                                                                      precision="fp32", **cfg))
    losses, norms = run_steps(rm, opt, bf, STEPS, BATCH)
    return rm, losses, norms


def _assert_like_plain(rm, losses, norms) -> None:
    """Losses, gradient norms and final weights equal single-process GPT-2 training (:func:`reference`)."""
    ref_losses, ref_norms, ref_sd = reference("gpt2")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=RTOL, atol=ATOL)
    _close_sd(rm.state_dict(), ref_sd)


@pytest.mark.parametrize("mode", ["optimizer", "all"])
def test_offload_with_segment_recompute_matches_plain(mode):
    """Offload fences inside checkpointed segments (what a plan for a big model on one GPU asks for): the
    recomputed forward re-enters blocks during backward and the training is still the one-process one."""
    rm, losses, norms = _train_gpt2(offload=mode, recompute="full")
    assert rm._offload is not None and rm._offload.mode == mode
    assert len(rm._primary.pipe.modules[0].segments()) > 1
    _assert_like_plain(rm, losses, norms)


def _two_offloaded_steps(**cfg):
    """GPT-2, one stage, optimizer offload, 2 micro-batches, two AdamW steps: (RanncModule, losses)."""
    model, bf = make_with_batches("gpt2", 0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    rm = rannc_hf.RanncModule(model, opt, config=rannc_hf.RanncConfig(
        num_stages=1, num_microbatches=2, precision="fp32", offload="optimizer", **cfg))
    losses = []
    for step in range(2):
        loss = loss_of(rm(**bf(BATCH // 2, step)))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return rm, losses


def test_compiled_segments_with_offload_fences(monkeypatch):
    """compile + segment recompute + offload fences together (the GPU recipe's combination), on the CPU with
    the aot_eager backend: segments holding a fence stay eager (compiled, they drifted on the H200), the
    others are compiled, and the losses are the eager ones."""
    monkeypatch.setenv("RANNC_HF_COMPILE_BACKEND", "aot_eager")
    losses = {}
    for comp in ("false", "true"):
        rm, losses[comp] = _two_offloaded_steps(recompute="full", compile=comp)
        stage = rm._primary.pipe.modules[0]
        assert (stage._compile_args is not None) == (comp == "true") and len(stage.segments()) > 1
        kinds = [(_fence_kinds(sg)[0], isinstance(sg.gm, torch.fx.GraphModule)) for sg in stage.segments()]
        assert any(f for f, _ in kinds) and any(not f for f, _ in kinds)
        assert all(eager for f, eager in kinds if f)                       # fenced: never compiled
        assert all(eager == (comp == "false") for f, eager in kinds if not f)
    torch.testing.assert_close(torch.tensor(losses["true"]), torch.tensor(losses["false"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["params", "all"])
def test_compiled_fenced_segments_train_like_plain(monkeypatch, mode):
    """``RANNC_HF_COMPILE_FENCED_SEGMENTS=1`` path on the CPU (aot_eager): checkpointed segments holding offload
    fences compiled, blocks released in forward and fetched again for the recompute (prefetch 1), 4 micro-batches,
    clipping: the training is the one-process one, step for step. The H200 drift of this path (bf16, inductor)
    does not show here; ``benchmarks/drift/repro_fenced_compile.py`` is the wider CPU check."""
    import rannc_hf.runtime.stages as stages

    monkeypatch.setenv("RANNC_HF_COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(stages, "_COMPILE_FENCED", True)
    rm, losses, norms = _train_gpt2(offload=mode, recompute="full", compile="true", prefetch_blocks=1)
    stage = rm._primary.pipe.modules[0]
    kinds = [(_fence_kinds(sg)[0], isinstance(sg.gm, torch.fx.GraphModule)) for sg in stage.segments()]
    assert any(f for f, _ in kinds) and all(not eager for _, eager in kinds)   # fenced segments compiled too
    assert rm._offload.engine.stats()["releases"] > 0
    _assert_like_plain(rm, losses, norms)


@pytest.mark.parametrize("guarded", [True, False])
@pytest.mark.parametrize("comp", ["false", "true"])
def test_segment_starting_inside_a_block_waits_for_its_weights(monkeypatch, comp, guarded):
    """A checkpointed segment that starts inside an offloaded block (its ``offload_enter`` in an earlier segment)
    is recomputed in backward before any fence of that block runs there: the block was only prefetched, and on
    CUDA the compute stream read its weights without waiting for the copy (the H200 drift of compiled fenced
    segments is the suspected symptom; the same race was in the eager path). With the copies emulated as
    asynchronous, the run is plain training step for step; unguarded (the old code), the gradients are NaN."""
    import rannc_hf.runtime.stages as stages
    from rannc_hf.offload.emulation import emulate_async_fetch

    monkeypatch.setenv("RANNC_HF_COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(stages, "_COMPILE_FENCED", True)
    monkeypatch.setattr(stages, "_UNGUARDED_OPEN_BLOCKS", not guarded)
    with emulate_async_fetch():
        rm, losses, norms = _train_gpt2(offload="all", recompute="full", compile=comp, prefetch_blocks=1)
    segs = rm._primary.pipe.modules[0].segments()
    assert any(sg.open_blocks for sg in segs)   # the plan cuts inside blocks
    if not guarded:
        assert not all(torch.isfinite(torch.tensor(norms)))
        return
    _assert_like_plain(rm, losses, norms)


def test_compiled_stage_is_cut_at_offload_fences(monkeypatch):
    """compile without recompute: the runs between fences are compiled one by one and the fences called
    eagerly, so dynamo meets no graph break (48 of them made GPT-2 1.3B's compile take minutes on the H200);
    the losses are the eager ones."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("RANNC_HF_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    losses = {}
    for comp in ("false", "true"):
        rm, losses[comp] = _two_offloaded_steps(recompute="none", compile=comp)
        stage = rm._primary.pipe.modules[0]
        pieces = stage.fence_pieces()
        assert len(pieces) > 4 and stage._pieces is not None
        compiled = [p for p in pieces if not isinstance(p.gm, torch.fx.GraphModule)]
        assert (len(compiled) > 0) == (comp == "true")
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    torch.testing.assert_close(torch.tensor(losses["true"]), torch.tensor(losses["false"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family,mode", [("gpt2", "optimizer"), ("bert", "all"), ("cnn", "params")])
def test_device_accumulation_matches_plain_and_sends_once(monkeypatch, family, mode):
    """Micro-batch gradients summed in the engine's device buffer (forced on the CPU): the same training, and
    one gradient per parameter leaves per step instead of one per micro-batch."""
    sent = {}
    for acc in ("0", "1"):
        monkeypatch.setenv("RANNC_HF_OFFLOAD_DEVICE_ACCUMULATE", acc)
        rm, opt, losses = _rannc(family, mode)
        eng = rm._offload.engine
        assert eng.device_accumulate == (acc == "1")
        sent[acc] = eng.stats()["d2h_bytes"]
        ref_losses, _, ref_sd = reference(family)
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)
        _close_sd(rm.state_dict(), ref_sd)
        assert all(g.dev_acc is None for g in eng.groups)   # the pass's buffers are gone after it
    assert sent["0"] == M * sent["1"] > 0


def test_device_accumulation_sends_sums_of_parameters_some_microbatch_skipped():
    """A block used by only some micro-batches of a pass: end_pass sends its partial sum."""
    from rannc_hf.offload import OffloadEngine, offload_enter, offload_exit

    torch.manual_seed(0)
    layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
    ref = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
    ref.load_state_dict(layers.state_dict())
    eng = OffloadEngine([list(l.parameters()) for l in layers], device="cpu", mode="all", prefetch_blocks=1,
                        device_accumulate=True, check_memory=False)
    xs = [torch.randn(2, 4) for _ in range(3)]
    eng.begin_pass(3)
    for k, x in enumerate(xs):
        h, r = x, x
        for i in range(3):
            if i == 1 and k == 2:
                continue
            h = offload_exit(eng.id, i, layers[i](offload_enter(eng.id, i, h)))
            r = ref[i](r)
        h.square().sum().backward()
        r.square().sum().backward()
    assert eng.stats()["d2h_bytes"] == 2 * 4 * 20   # blocks 0 and 2 sent once each (fp32), block 1 not yet
    eng.end_pass()
    assert eng.stats()["d2h_bytes"] == 3 * 4 * 20
    for p, q in zip(layers.parameters(), ref.parameters()):
        torch.testing.assert_close(eng.grad_of(p), q.grad, rtol=1e-6, atol=1e-7)
    eng.close()


def test_node_host_check_leaves_out_what_stays_on_the_gpu():
    """The runtime's per-node host check: GPU-stepped parameters keep their optimizer state on the GPU, and
    those keeping gradients there need no host gradient or staging buffer."""
    from rannc_hf.runtime.offload_stage import host_bytes

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    full = host_bytes(1000, "all", torch.bfloat16, True, opt)
    assert full == {"fp32 master weights": 4000, "fp32 gradients": 4000, "compute-dtype shadow": 2000,
                    "gradient staging": 2000, "optimizer state": 8000}
    hybrid = host_bytes(1000, "all", torch.bfloat16, True, opt, on_device=600)
    assert hybrid["optimizer state"] == 3200 and hybrid["fp32 gradients"] == 4000
    kept = host_bytes(1000, "all", torch.bfloat16, True, opt, on_device=600, kept=600)
    assert (kept["fp32 gradients"], kept["gradient staging"], kept["optimizer state"]) == (1600, 800, 3200)
    assert host_bytes(1000, "params", torch.float32, False, opt)["optimizer state"] == 0


@pytest.mark.parametrize("family,mode,microbatches", [("gpt2", "all", M), ("bert", "optimizer", 1)])
def test_step_in_backward_through_the_runtime(monkeypatch, family, mode, microbatches):
    """config step_in_backward: every offloaded block steps inside the call's backward (its micro-batches summed
    in the device buffer first); training equals plain PyTorch without clipping, and what cannot work any more
    is refused with the way out: clipping after it, a scaled loss, a second call without optimizer.step()."""
    import functools

    from rannc_hf.offload.engine import OffloadEngine
    from rannc_hf.runtime import offload_stage

    # the CPU stands in for CUDA: the async pipeline the step in backward runs on
    monkeypatch.setattr(offload_stage, "OffloadEngine", functools.partial(OffloadEngine, async_step=True))
    monkeypatch.setenv("RANNC_HF_OFFLOAD_DEVICE_ACCUMULATE", "1")
    model, bf = make_with_batches(family, 0)
    ref_losses, _ = accumulated_reference(model, bf, STEPS, BATCH, microbatches, LR, clip=None)
    ref_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model, bf = make_with_batches(family, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    cfg = rannc_hf.RanncConfig(num_stages=1, num_microbatches=microbatches, precision="fp32", offload=mode,
                               step_in_backward=True)
    rm = rannc_hf.RanncModule(model, opt, config=cfg, graph=graph_for(family, BATCH // microbatches))
    losses = []
    for step in range(STEPS):
        loss = loss_of(rm(**bf(BATCH, step)))
        loss.backward()
        if step == 0:
            with pytest.raises(OffloadError, match="already stepped during backward.*step_in_backward=False"):
                rm.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    eng = rm._offload.engine
    assert eng.stats()["early_block_steps"] == eng.num_blocks * STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)
    _close_sd(rm.state_dict(), ref_sd)
    loss = loss_of(rm(**bf(BATCH, 9)))
    with pytest.raises(OffloadError, match="gradient other than 1"):
        (loss * 0.5).backward()
    with pytest.raises(OffloadError, match="optimizer.step\\(\\) was not called"):
        rm(**bf(BATCH, 10))


def test_gpu_step_rest_follows_the_plan(monkeypatch):
    """The rest group (embeddings, heads) steps on the GPU when the plan chose it for a local stage and its master,
    gradients and AdamW state fit in the headroom (gpu_step_blocks: auto); the environment forces either way; never
    on a CPU device or without a CPU step. torch.cuda is stubbed."""
    from types import SimpleNamespace

    import rannc_hf
    from rannc_hf.runtime.offload_stage import _gpu_headroom, _gpu_step_rest

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=10 * 2**30))
    monkeypatch.delenv("RANNC_HF_OFFLOAD_GPU_STEP_REST", raising=False)
    rest = [torch.nn.Parameter(torch.zeros(2**26))]                  # 64 Mi params: 1 GiB at 16 bytes each

    def decide(mode="all", device="cuda", chosen=True, planned=6, **cfg):
        stage = SimpleNamespace(memory={"total": planned * 2**30}, peak_bytes=planned * 2**30, gpu_step_rest=chosen)
        m = SimpleNamespace(device=torch.device(device), config=rannc_hf.RanncConfig(**cfg),
                            plan=SimpleNamespace(stages=[stage]), optimizer=torch.optim.AdamW(rest),
                            _primary=SimpleNamespace(pipe=SimpleNamespace(modules=[SimpleNamespace(
                                spec=SimpleNamespace(index=0))])))
        return _gpu_step_rest(m, rest, mode, _gpu_headroom(m))

    assert decide() is True                                          # 3 GiB headroom x 0.8 holds 1 GiB
    assert decide(chosen=False) is False                             # the planner found the host cheaper
    assert decide(planned=8) is False                                # 1 GiB x 0.8 does not hold it
    assert decide(gpu_step_blocks=4) is False                        # a fixed block count: no GPU step for the rest
    assert decide(device="cpu") is False and decide(mode="params") is False
    monkeypatch.setenv("RANNC_HF_OFFLOAD_GPU_STEP_REST", "1")
    assert decide(chosen=False) is True and decide(device="cpu") is False
    monkeypatch.setenv("RANNC_HF_OFFLOAD_GPU_STEP_REST", "0")
    assert decide() is False
