"""Planner tests: every zoo family plans; plans are well-formed, fit, round-trip; baselines; errors."""

import json
import math

import pytest
import torch

import rannc_hf
from rannc_hf import Cluster, RanncConfig
from rannc_hf.capture import capture
from rannc_hf.errors import ConfigError, PlanDoesNotFitError
from rannc_hf.planner import Plan
from rannc_hf.planner.coarsen import coarsen
from rannc_hf.planner.simulate import simulate
from rannc_hf.zoo import FAMILIES, make

_GRAPHS = {}


def graph(family, bs=8):
    key = (family, bs)
    if key not in _GRAPHS:
        _GRAPHS[key] = capture(*make(family, batch_size=bs))
    return _GRAPHS[key]


def check_plan(p: Plan, g, cap=None):
    # contiguous, every op exactly once, cuts only at valid positions
    assert p.stages[0].op_range[0] == 0
    assert p.stages[-1].op_range[1] == len(g.ops) - 1
    for a, b in zip(p.stages, p.stages[1:]):
        assert b.op_range[0] == a.op_range[1] + 1
        assert g.valid_cuts[a.op_range[1]], f"cut after op {a.op_range[1]} is not valid"
    covered = sum(s.op_range[1] - s.op_range[0] + 1 for s in p.stages)
    assert covered == len(g.ops)
    # memory cap (per rank: interleaved ranks hold several chunks)
    if cap is not None:
        per_rank = {}
        for s in p.stages:
            per_rank[s.index % p.num_ranks_pp] = per_rank.get(s.index % p.num_ranks_pp, 0) + s.peak_bytes
        assert max(per_rank.values()) <= cap * 1.0001
    # tied groups: every stage using a tied parameter uses it under the one canonical name
    for group in g.tied_groups:
        used_by = [s.index for s in p.stages if any(group[0] in g.ops[i].params
                                                    for i in range(s.op_range[0], s.op_range[1] + 1))]
        assert used_by, group
        for alias in group[1:]:
            assert not any(alias in op.params for op in g.ops)
    assert p.world_size == p.num_ranks_pp * p.dp_size
    assert p.predicted_step_time > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_plans_on_two_stages(family):
    g = graph(family)
    p = rannc_hf.plan(g, cluster=Cluster(num_gpus=2, device="h100", gpu_memory="80GiB"),
                      config=RanncConfig(num_stages=2), progress=False)
    assert p.num_ranks_pp == 2 and p.dp_size == 1
    check_plan(p, g, p.gpu_memory)
    assert p.graph_fingerprint == g.fingerprint()
    assert p.flops_per_step > 0 and p.tokens_per_sample >= 1


def test_flops_per_step_counts_every_microbatch():
    """A step's FLOPs are the same whether the plan splits the batch into micro-batches or not, also when the
    runtime's graph is captured at micro-batch 1 (no batch dimension left to scale by)."""
    model, batch = make("gpt2", batch_size=8)
    cl = Cluster(num_gpus=1, device="h200")
    one = rannc_hf.plan(model, batch, cluster=cl, config=RanncConfig(num_microbatches=1), progress=False)
    eight = rannc_hf.plan(model, batch, cluster=cl, config=RanncConfig(num_microbatches=8), progress=False)
    assert eight.microbatch_size == 1
    assert eight.flops_per_step == pytest.approx(one.flops_per_step, rel=0.02)


def test_module_entry_point_and_json_roundtrip(tmp_path):
    model, batch = make("gpt2", batch_size=8)
    p = rannc_hf.plan(model, batch, cluster=Cluster(num_gpus=4, device="h200"),
                      config=RanncConfig(num_stages=2, num_microbatches=2), progress=False)
    assert p.batch_size == 8 and p.dp_size == 2 and p.microbatch_size == 2
    # the fingerprint is that of the graph the runtime captures (at microbatch size)
    g_mb = capture(model, {k: v[:2] for k, v in batch.items()})
    p.check_graph(g_mb)
    check_plan(p, g_mb)
    path = tmp_path / "plan.json"
    p.save(path)
    q = Plan.load(path)
    assert json.loads(json.dumps(q.to_dict())) == json.loads(json.dumps(p.to_dict()))
    assert q.stages[1].op_range == p.stages[1].op_range
    png = p.plot(tmp_path / "plan.png")
    assert open(png, "rb").read(4) == b"\x89PNG"


def test_memory_cap_respected_and_recompute_used():
    g = graph("gpt2", 8)
    free = rannc_hf.plan(g, cluster=Cluster(num_gpus=2, device="h100", gpu_memory="80GiB"),
                         config=RanncConfig(num_stages=2, schedule="gpipe", num_microbatches=8), progress=False)
    need = max(s.peak_bytes for s in free.stages)
    cap = int(need * 0.8)
    p = rannc_hf.plan(g, cluster=Cluster(num_gpus=2, device="h100"),
                      config=RanncConfig(num_stages=2, schedule="gpipe", num_microbatches=8, gpu_memory=cap,
                                         mem_margin=0.0), progress=False)
    check_plan(p, g, cap)


def test_impossible_cap_names_minimum():
    g = graph("llama", 8)
    with pytest.raises(PlanDoesNotFitError) as ei:
        rannc_hf.plan(g, cluster=Cluster(num_gpus=2, device="h100"),
                      config=RanncConfig(gpu_memory="64KiB", offload="none"), progress=False)
    msg = str(ei.value)
    assert "needs at least" in msg and "per GPU" in msg


def test_partitioners_and_auto_never_worse():
    g = graph("gpt2", 8)
    cl = Cluster(num_gpus=4, device="h100", gpu_memory="80GiB")
    times = {}
    for part in ("auto", "even", "params"):
        p = rannc_hf.plan(g, cluster=cl, config=RanncConfig(partitioner=part, num_stages=4), progress=False)
        check_plan(p, g)
        assert p.partitioner == part
        times[part] = p.predicted_step_time
    assert times["auto"] <= min(times["even"], times["params"]) * (1 + 1e-9)


def test_fixed_config_values_respected():
    g = graph("bert", 8)
    p = rannc_hf.plan(g, cluster=Cluster(num_gpus=4, device="a100"),
                      config=RanncConfig(num_stages=2, num_microbatches=4, schedule="gpipe", recompute="full"),
                      progress=False)
    assert (p.num_ranks_pp, p.dp_size, p.num_microbatches, p.schedule) == (2, 2, 4, "gpipe")
    assert all(s.recompute == "full" for s in p.stages)


def test_interleaved_schedule():
    g = graph("llama", 8)
    p = rannc_hf.plan(g, cluster=Cluster(num_gpus=2, device="h100"),
                      config=RanncConfig(num_stages=2, schedule="interleaved-1f1b", num_microbatches=4), progress=False)
    assert p.schedule == "interleaved-1f1b" and p.virtual_stages >= 2
    assert p.num_stages == 2 * p.virtual_stages and p.world_size == 2
    check_plan(p, g)


def test_unknown_config_key():
    with pytest.raises(ConfigError, match="num_stages"):
        RanncConfig.from_dict({"num_stage": 2})


def test_coarsen_respects_valid_cuts():
    g = graph("t5", 8)
    blocks = coarsen(g, max_blocks=10)
    assert len(blocks) <= 10 and blocks[0][0] == 0 and blocks[-1][1] == len(g.ops) - 1
    for (a, b), (c, d) in zip(blocks, blocks[1:]):
        assert c == b + 1 and g.valid_cuts[b]


def test_simulator_matches_closed_form():
    r = simulate([1.0] * 4, [2.0] * 4, 8, "gpipe")
    assert math.isclose(r.step_time, (8 + 4 - 1) * 3.0)
    r1 = simulate([1.0] * 4, [2.0] * 4, 8, "1f1b")
    assert math.isclose(r1.step_time, r.step_time)
    tail = simulate([1.0] * 2, [2.0] * 2, 4, "1f1b", tail=[5.0, 0.0])
    assert tail.step_time == tail.pipeline_time + 5.0


def test_large_meta_model_plans_fast():
    import time
    import torch
    import transformers as tf

    cfg = tf.GPT2Config(n_embd=1024, n_layer=8, n_head=16, n_positions=1024, vocab_size=50257)
    with torch.device("meta"):
        model = tf.GPT2LMHeadModel(cfg)
    ids = torch.zeros(64, 1024, dtype=torch.long)
    t = time.time()
    p = rannc_hf.plan(model, {"input_ids": ids, "labels": ids}, cluster=Cluster(num_gpus=16, gpu_memory="16GiB",
                      device="h100"), progress=False)
    assert time.time() - t < 60
    assert p.world_size == 16 and max(s.peak_bytes for s in p.stages) <= p.gpu_memory


def test_recompute_segments_thin_uniform_cuts():
    """64 equal blocks with equally cheap cuts everywhere: keeping every cut holds 63 checkpoints, keeping none
    one 64-block segment; every 8th cut (the square-root rule) peaks at 7 checkpoints + an 8-block segment."""
    import numpy as np

    from rannc_hf.planner.recompute import choose_boundaries

    seg = choose_boundaries(np.ones(63), np.ones(64))
    assert seg.peak(1) == 15 and len(seg.boundaries) == 7 and seg.max_segment_bytes == 8
    # a stage whose cheap cuts are rare keeps them all (thinning never makes the peak worse)
    assert choose_boundaries(np.array([1.0, 6, 1, 6, 1]), np.full(6, 4.0)).boundaries == [0, 2, 4]


def test_rank_layout_priced_both_ways_and_saved(tmp_path):
    """Across nodes the planner prices both rank layouts: replicas of a stage on one node (all-reduce on
    NVLink, stage boundaries over the network) or a replica's stages on one node; the plan records it."""
    from rannc_hf.planner.costs import CostModel
    from rannc_hf.planner.search import Searcher

    g = graph("gpt2", 8)
    cl = Cluster(num_gpus=16, gpus_per_node=8, device="h100", gpu_memory="80GiB")
    s = Searcher(CostModel.build(g, "h100", "bf16"), cl, RanncConfig(), global_batch=64)
    intra, inter = s.profile.intra_node_bw, s.profile.inter_node_bw
    assert s._layouts(2, 8) == (False, True) and s._layouts(2, 4) == (False,) and s._layouts(1, 16) == (False,)
    assert s._dp_bw(2, 8, dp_inner=True) == intra and s._dp_bw(2, 8) == inter / 2
    assert s._p2p_bw(0, 2, 8, dp_inner=True) == inter / 8 and s._p2p_bw(0, 2, 8) == intra
    p = rannc_hf.plan(g, cluster=cl, config=RanncConfig(num_stages=2), progress=False, global_batch=64)
    check_plan(p, g)
    assert p.dp_size == 8
    # a network far slower than NVLink: the gradient all-reduce (every parameter) must stay on the node,
    # and the stage boundaries (a few KB per micro-batch) cross it
    from rannc_hf.profile.devices import get_profile

    slow = get_profile("h100").to_dict()
    slow.update(name="slow-net", inter_node_bw=1e6)
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    q = rannc_hf.plan(g, cluster=Cluster(num_gpus=16, gpus_per_node=8, device=str(tmp_path / "slow.json"),
                                         gpu_memory="80GiB"), config=RanncConfig(num_stages=2), progress=False,
                      global_batch=64)
    assert q.dp_size == 8 and q.dp_inner is True
    assert "replicas on neighbouring ranks" in q.summary()
    p.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json").dp_inner == p.dp_inner
    d = json.load(open(tmp_path / "plan.json"))
    d.pop("dp_inner")
    assert Plan.from_dict(d).dp_inner is False        # plans saved before the field load as the old layout


def test_gpu_step_share_counted_in_whole_layers():
    """The engine steps whole layers on the GPU, so the planner prices the GPU-stepped share in whole layers."""
    from rannc_hf.planner.costs import CostModel
    from rannc_hf.planner.search import Searcher

    model, _ = make("gpt2", batch_size=8)
    s = Searcher(CostModel.build(graph("gpt2"), "h200", "bf16"), Cluster(num_gpus=1, device="h200"),
                 RanncConfig(offload="optimizer"), global_batch=8)
    layers = s._layers_in(0, s.N - 1)
    assert layers == model.config.n_layer
    n = 1e9
    per = n / layers
    room = (1.5 * 8 * per + 8 * per) / 0.8          # state of 1.5 layers plus one layer in transit, at 80%
    assert s._gpu_step_fraction("optimizer", n, layers, room) == pytest.approx(1 / layers)
    assert s._gpu_step_fraction("params", n, layers, room) == 0.0


def test_split_goes_where_few_bytes_cross():
    """Splitting a chunk to reach the stage count cuts where few bytes cross (not through a wide tensor such as
    a large head's logits), and leaves no half without parameters when another place exists."""
    from rannc_hf.planner.search import Searcher

    f, b = [1.0] * 6, [0.0] * 6
    cross = [1.0, 1.0, 100.0, 1.0, 1.0, 0.0]          # the time midpoint (after block 2) carries 100 bytes
    out = Searcher._split_cheap([(0, 5)], 2, f, b, cross)
    assert len(out) == 2 and out[0][1] != 2 and out[0][0] == 0 and out[1][1] == 5
    out = Searcher._split_cheap([(0, 5)], 2, f, b, [1.0, 100.0, 100.0, 100.0, 1.0, 0.0], has_params=[True] * 5 + [False])
    assert out == [(0, 0), (1, 5)]                     # not (0..4, 5): block 5 alone has no parameters


def test_large_vocab_across_nodes_beats_param_balance():
    """A 250k-vocabulary decoder on 64 GPUs (8 stages x 8 replicas, stages on different nodes): the auto plan beats
    equal-parameter stages, the params baseline scored at its own best shape. It beat them by 1.87x until the
    twelfth session priced eager autocast's weight casts (12 bytes a parameter, every micro-batch, as the runtime
    runs them): 1.07x since, the README's 1.2x planning target missed here (see its plan-quality table)."""
    import torch
    import transformers as tf

    ids = torch.zeros(512, 1024, dtype=torch.long)    # benchmarks/plan_quality.py's large-vocabulary model
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                                                   num_attention_heads=16, num_key_value_heads=16, vocab_size=250_000,
                                                   max_position_embeddings=1024, tie_word_embeddings=False))
    model.config.use_cache = False
    cl = Cluster(num_gpus=64, gpus_per_node=8, gpu_memory="80GB", device="h100")
    batch = {"input_ids": ids, "labels": ids}
    p = rannc_hf.plan(model, batch, cluster=cl, config=RanncConfig(num_stages=8), progress=False)
    only = rannc_hf.plan(model, batch, cluster=cl, config=RanncConfig(num_stages=8, partitioner="params"),
                         progress=False)
    assert p.baselines["params"] <= only.predicted_step_time * (1 + 1e-9)
    assert p.predicted_step_time <= min(p.baselines.values()) * (1 + 1e-9)
    assert p.predicted_step_time * 1.05 <= p.baselines["params"]


def test_rest_group_placed_where_the_cost_model_is_cheaper(monkeypatch):
    """With room for the rest group's 16 bytes per parameter the planner prices it on the host and on the GPU (which
    leaves fewer GPU-stepped layers) and keeps the cheaper; without room, or on a CPU profile, the host."""
    from rannc_hf.planner.costs import CostModel
    from rannc_hf.planner.search import Searcher

    monkeypatch.delenv("RANNC_HF_OFFLOAD_GPU_STEP_REST", raising=False)
    s = Searcher(CostModel.build(graph("gpt2"), "h200", "bf16"), Cluster(num_gpus=1, device="h200"),
                 RanncConfig(offload="all"), global_batch=8)
    n, rest = 2.65e9, 1.3e8
    args = ("all", 0.13, 0.36, 1, 32, True, 2)                      # mode, F, Bw, M, blocks, recompute, bf16

    def priced(headroom):   # (host, GPU) step times as the runtime would run each
        return tuple(s._offload_cost(n, *args[:6], 2, headroom - (rest * 16 if g else 0.0), rest, 32, False, g, False).step_time
                     for g in (False, True))

    for headroom in (30e9, 3e9, 6e9):   # everything fits; the rest or a few layers; the rest and some layers
        host, gpu = priced(headroom)
        assert s._optimizer_time(n, *args, headroom=headroom, rest=rest, layers=32)[2] == (gpu < host)
    assert priced(30e9)[1] < priced(30e9)[0]                         # nothing to give up: the GPU wins
    assert s._optimizer_time(n, *args, headroom=rest * 16 / 0.8 - 1, rest=rest, layers=32)[2] is False   # no room
    cpu = Searcher(CostModel.build(graph("gpt2"), "cpu", "fp32"), Cluster(num_gpus=1, device="cpu"),
                   RanncConfig(offload="all"), global_batch=8)
    assert cpu._optimizer_time(n, *args, headroom=30e9, rest=rest, layers=32)[2] is False


def test_rest_on_gpu_choice_survives_a_saved_plan(tmp_path):
    """The plan records where each stage's rest group steps; a saved plan keeps it, shows it in its summary, and a
    plan saved before the field existed loads with the rest on the host."""
    p = rannc_hf.plan(graph("gpt2"), cluster=Cluster(num_gpus=1, device="cpu"), config=RanncConfig(), progress=False)
    p.stages[0].gpu_step_rest = True
    p.save(tmp_path / "plan.json")
    q = Plan.load(tmp_path / "plan.json")
    assert q.stages[0].gpu_step_rest is True and "(rest on GPU)" in q.summary()
    d = json.load(open(tmp_path / "plan.json"))
    for s in d["stages"]:
        s.pop("gpu_step_rest")
    assert Plan.from_dict(d).stages[0].gpu_step_rest is False


def test_stages_priced_as_they_run():
    """The offload engine computes with bf16 working weights and a stage without recompute runs compiled on GPUs
    (``compile: auto``), so the planner prices each (offload, recompute) choice with the matching cost table; a
    stage whose micro-batch gradients are summed on the GPU counts the sums in its peak, and the runtime's
    headroom (from which it decides the sums by the same rule) leaves them out again."""
    from types import SimpleNamespace

    from rannc_hf.planner.costs import CostModel
    from rannc_hf.planner.search import Searcher
    from rannc_hf.runtime.offload_stage import _gpu_headroom

    g = graph("gpt2")
    h200 = Searcher(CostModel.build(g, "h200", "bf16"), Cluster(num_gpus=1, device="h200"), RanncConfig(), global_batch=8)
    assert h200._variant_key("optimizer", False) == (True, True) and h200._variant_key("all", True) == (True, False)
    assert h200._variant_key("none", False) == (False, True) and h200._variant_key("none", True) == (False, False)
    eager = Searcher(h200.cm, Cluster(num_gpus=1, device="h200"), RanncConfig(compile="false"), global_batch=8)
    assert eager._variant_key("optimizer", False) == (True, False)
    cpu = Searcher(CostModel.build(g, "cpu", "bf16"), Cluster(num_gpus=1, device="cpu"), RanncConfig(), global_batch=8)
    assert cpu._variant_key("optimizer", False) == (False, False)
    assert h200.cm.variant(True, True).at(2).saved.sum() < h200.cm.at(2).saved.sum()

    cfg = RanncConfig(num_stages=1, offload="optimizer", recompute="none", num_microbatches=4, gpu_step_blocks=0)
    p = rannc_hf.plan(g, cluster=Cluster(num_gpus=1, gpu_memory="80GB", device="h200"), config=cfg, progress=False)
    st = p.stages[0]
    assert st.memory["grad_sum"] == 4 * st.num_params and st.peak_bytes == st.memory["total"]
    assert "optimizer (grads summed on GPU)" in p.summary()
    parts = sum(v for k, v in st.memory.items() if k not in ("total", "host"))
    assert st.peak_bytes == parts
    module = SimpleNamespace(plan=p, device=torch.device("cuda"), config=RanncConfig(gpu_memory="80GB"),
                             _primary=SimpleNamespace(pipe=SimpleNamespace(modules=[SimpleNamespace(
                                 spec=SimpleNamespace(index=0))])))
    free = 80e9 * (1 - module.config.mem_margin) - (st.peak_bytes - st.memory["grad_sum"])
    assert _gpu_headroom(module) == pytest.approx(free)
    tight = rannc_hf.plan(g, cluster=Cluster(num_gpus=1, gpu_memory="80GB", device="h200"), progress=False,
                          config=RanncConfig(num_stages=1, offload="optimizer", recompute="none", num_microbatches=4,
                                             gpu_memory=int((st.peak_bytes - st.memory["grad_sum"] / 2) / 0.9)))
    assert "grad_sum" not in tight.stages[0].memory   # no room: summed on the host, nothing counted


def test_offload_priced_as_the_runtime_steps_it_on_shared_hosts(monkeypatch):
    """Ranks of one node step their CPU-side optimizer state at once, each at its share of the host's rate; and
    blocks step inside backward only on ranks without weights tied to other ranks (GPT-2's embedding over two
    stages: StageOffload.before_run), so step_in_backward gains nothing there but does on one stage."""
    from rannc_hf.planner.costs import CostModel
    from rannc_hf.planner.search import Searcher

    cm = CostModel.build(graph("gpt2"), "h200", "bf16")
    one = Searcher(cm, Cluster(num_gpus=1, device="h200"), RanncConfig(offload="optimizer"), global_batch=8)
    two = Searcher(cm, Cluster(num_gpus=2, device="h200"), RanncConfig(offload="optimizer"), global_batch=8)
    four = Searcher(cm, Cluster(num_gpus=4, gpus_per_node=2, device="h200"), RanncConfig(offload="optimizer"),
                    global_batch=8)
    assert (one.host_share, two.host_share, four.host_share) == (1.0, 0.5, 0.5)
    args = (2.65e9, "optimizer", 0.13, 0.36, 1, 32, True, 2, 0.0, 1.3e8, 32, False, False, False)
    assert two._offload_cost(*args).step_time > one._offload_cost(*args).step_time

    model, batch = make("gpt2", batch_size=8)

    def predicted(stages, sib):
        cfg = RanncConfig(num_stages=stages, offload="optimizer", step_in_backward=sib, num_microbatches=1,
                          recompute="none", compile="false")
        return rannc_hf.plan(model, batch, cluster=Cluster(num_gpus=stages, device="h200"), config=cfg,
                             progress=False).predicted_step_time

    assert predicted(2, True) == pytest.approx(predicted(2, False))
    assert predicted(1, True) < predicted(1, False)
    monkeypatch.setattr(Searcher, "_tied_holders", lambda self, chunks, S: {})   # as if nothing were tied
    assert predicted(2, True) < predicted(2, False)


def test_compile_auto_compiles_encoders_through_their_captured_graph():
    """``compile: auto`` compiles on GPUs with bf16, encoders included (they run their captured graph compiled, not
    their own forward); the planner prices their stages compiled, as decoders', and says so in the plan."""
    from rannc_hf.config import compiles
    from rannc_hf.planner.costs import CostModel
    from rannc_hf.planner.search import Searcher

    assert compiles("auto", "bf16", True) and not compiles("auto", "bf16", False)
    assert not compiles("auto", "fp32", True)
    assert compiles("true", "fp32", False) and not compiles("false", "bf16", True)
    assert graph("bert").has_bidirectional_attention() and not graph("gpt2").has_bidirectional_attention()
    keys = {}
    for fam in ("gpt2", "bert"):
        s = Searcher(CostModel.build(graph(fam), "h200", "bf16"), Cluster(num_gpus=1, device="h200"),
                     RanncConfig(compile="auto"), global_batch=8)
        keys[fam] = (s._variant_key("none", False), s._variant_key("none", True))
    assert keys == {"gpt2": ((False, True), (False, False)), "bert": ((False, True), (False, False))}
    model, batch = make("bert", batch_size=8)
    p = rannc_hf.plan(model, batch, cluster=Cluster(num_gpus=1, device="h200"), progress=False)
    assert p.bidirectional_attention and Plan.from_dict(p.to_dict()).bidirectional_attention
    assert any("compiled encoder" in n for n in p.notes) and "captured graph" in p.summary()
    cpu = rannc_hf.plan(model, batch, cluster=Cluster(num_gpus=1, device="cpu"), progress=False)
    assert not any("compiled encoder" in n for n in cpu.notes)


def test_attention_backends_export_may_name_are_recognised():
    """Captured with CUDA tensors, export may name the backend op (flash, efficient, cuDNN) instead of the
    composite: those are attention too, for the causal flag and for ``compile: auto``'s encoder rule."""
    import copy
    import dataclasses

    renamed = "aten._scaled_dot_product_efficient_attention.default"
    for fam, bidirectional in (("bert", True), ("gpt2", False)):
        g = copy.copy(graph(fam))
        g.ops = [dataclasses.replace(op, target=renamed) if op.target == "aten.scaled_dot_product_attention.default"
                 else op for op in g.ops]
        assert any(op.target == renamed for op in g.ops)
        assert g.has_bidirectional_attention() is bidirectional
