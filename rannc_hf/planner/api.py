"""``rannc_hf.plan(model, example_batch, cluster=..., config=...) -> Plan``: the automatic planner.

    >>> import rannc_hf
    >>> from rannc_hf.zoo import make
    >>> model, batch = make("gpt2", batch_size=8)
    >>> p = rannc_hf.plan(model, batch, cluster=rannc_hf.Cluster(num_gpus=4, gpu_memory="80GiB", device="h200"),
    ...                   progress=False)
    >>> p.world_size, p.stages[0].op_range[0], p.stages[-1].op_range[1] == p.num_ops - 1
    (4, 0, True)

The example batch is the **global** batch (all replicas, all microbatches). The model is captured
once at that size (meta-device models cost no memory) and batch-carrying costs are rescaled to each
candidate microbatch size. Fixed ``num_stages`` / ``num_microbatches`` / ``schedule`` / ``dp_size`` /
``recompute`` / ``offload`` in the config are respected; ``"auto"``/``None`` are searched. The memory
cap per GPU is ``config.gpu_memory``, else ``cluster.gpu_memory``, else the device profile's memory
(the local GPU's for ``device="auto"``), minus ``config.mem_margin``. When nothing fits,
:class:`~rannc_hf.errors.PlanDoesNotFitError` names the smallest memory and GPU count that would.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from ..capture.split_head import DEFAULT_MIN_OUT_FEATURES
from ..config import Cluster, RanncConfig, compiles
from ..errors import ConfigError, PlanDoesNotFitError
from ..units import format_bytes
from .coarsen import describe
from .costs import CostModel
from .plan import Plan, StagePlan
from .search import OFFLOAD_ORDER, Candidate, Searcher

log = logging.getLogger(__name__)


def plan(model_or_graph: Any, example_batch: Any = None, cluster: Optional[Cluster] = None,
         config: Optional[RanncConfig] = None, progress: bool = True, costs: str = "auto",
         max_blocks: int = 256, global_batch: Optional[int] = None) -> Plan:
    """Plan stages x replicas x microbatches for a model (or a captured Graph) on a cluster.

    Args:
        model_or_graph: an ``nn.Module`` (real or on the meta device) or a :class:`~rannc_hf.capture.Graph`.
        example_batch: the global batch (tensor, tuple or dict of kwargs); not needed for a Graph.
        cluster: GPUs, GPUs per node, memory and the device cost profile (default: this machine).
        config: :class:`RanncConfig`; fixed values are respected, ``None``/``"auto"`` are searched.
        progress: show a tqdm progress bar while searching.
        costs: ``"analytic"`` (device profile), ``"measured"`` (run blocks on this machine under the
            config's precision, cached on disk), or ``"auto"``: analytic. The analytic H200 profile predicts
            measured step times within 15% (docs/offload.md, "Cost model"); block timings taken node by node
            did not (GPT-2 2.7B on two H200s: 3.67 s planned for 0.39 s measured, timed in fp32).
        max_blocks: coarsening target (blocks the partition works on).
        global_batch: for a Graph captured at a smaller (proxy) batch: the global batch to plan for.

    A model with a huge output projection (vocabulary >= 128k) on several GPUs is planned twice: whole, and
    with that head captured as vocabulary chunks that may sit on different stages
    (:mod:`rannc_hf.capture.split_head`); the plan records the choice (``split_min_out_features``) and the
    runtime captures the model the same way.
    """
    t0 = time.perf_counter()
    config = config or RanncConfig()
    cluster = cluster or _local_cluster()
    args = (cluster, config, progress, costs, max_blocks, global_batch)
    err, split = None, None
    try:
        whole = _plan_one(model_or_graph, example_batch, *args, split=None)
    except PlanDoesNotFitError as e:
        whole, err = None, e
    p = whole
    try_split = cluster.num_gpus > 1 and config.num_stages != 1 and config.split_head != "false"
    if try_split and not _is_graph(model_or_graph) and (
            whole is None or _has_large_linear(whole._graph, DEFAULT_MIN_OUT_FEATURES)):
        # a huge head (large vocabulary) bounds whichever stage holds it: also plan it split into chunks,
        # and take that only when clearly better (the chunks cost a concatenation and carry partial logits)
        try:
            split = _plan_one(model_or_graph, example_batch, *args, split=DEFAULT_MIN_OUT_FEATURES)
        except PlanDoesNotFitError:
            split = None
        if split is not None and not split._graph.split_min_out_features:
            split = None
        if split is not None and (whole is None or config.split_head == "true"
                                  or split.predicted_step_time < whole.predicted_step_time * 0.99):
            split.notes.append(f"the LM head is split into vocabulary chunks across stages "
                               f"({whole.predicted_step_time * 1e3:.1f} ms/step whole)" if whole is not None else
                               "the LM head is split into vocabulary chunks across stages (nothing fits it whole)")
            p = split
        elif split is not None:
            p.notes.append(f"LM head split into vocabulary chunks: {split.predicted_step_time * 1e3:.1f} ms/step "
                           f"(not better)")
    if p is None:
        raise err
    for other in (q for q in (whole, split) if q is not None and q is not p):
        for name, t in other.baselines.items():   # a baseline partitioner may do better on the other capture
            p.baselines[name] = min(t, p.baselines.get(name, t))
    if config.partitioner == "auto":
        for name in ("even", "params"):
            if name in p.baselines and p.predicted_step_time > 0:
                p.notes.append(f"{name} partitioner: {p.baselines[name] * 1e3:.1f} ms/step "
                               f"({p.baselines[name] / p.predicted_step_time:.2f}x the auto plan)")
            else:
                p.notes.append(f"{name} partitioner: no plan fits")
    del p._graph
    p.planning_time_s = time.perf_counter() - t0
    return p


def _has_large_linear(graph, min_rows: int) -> bool:
    for op in graph.ops:
        if op.target == "aten.linear.default" and op.params:
            shape = graph.params[op.params[0]].shape
            if len(shape) == 2 and shape[0] >= min_rows:
                return True
    return False


def _plan_one(model_or_graph: Any, example_batch: Any, cluster: Cluster, config: RanncConfig, progress: bool,
              costs: str, max_blocks: int, global_batch: Optional[int], split: Optional[int]) -> Plan:
    """One planning pass over one capture of the model (``split``: see :func:`_as_graph`); the plan keeps its
    graph as ``_graph`` for the caller."""
    graph, B = _as_graph(model_or_graph, example_batch, split=split)
    global_batch = int(global_batch or B)
    cm = CostModel.build(graph, cluster.device, config.precision, max_blocks=max_blocks)
    cm_proxy = cm
    source = "analytic"
    if _want_measured(costs):
        from ..profile.measure import measure_blocks
        # the graph was captured at a proxy batch: measure it at that batch
        cm.measured = measure_blocks(graph, _slice_batch(example_batch, graph.batch_size), cm.blocks,
                                     model=model_or_graph, cache_dir=config.profile_cache, precision=config.precision)
        cm._cache.clear()
        source = "measured"
    mem = config.gpu_memory_bytes or cluster.gpu_memory_bytes or cm.profile.memory
    cap = float(mem) * (1.0 - config.mem_margin)
    partitioners = ("auto", "even", "params") if config.partitioner == "auto" else (config.partitioner,)

    best, searcher = _search(cm, cluster, config, cap, partitioners, progress, global_batch)
    if config.partitioner not in best:
        raise _does_not_fit(cm, cluster, config, cap, mem, global_batch)
    chosen = best[config.partitioner]
    proxy_best = dict(best)
    graphs: dict[int, Any] = {}

    def graph_at(mb: int):
        if mb not in graphs:
            graphs[mb], _ = _as_graph(model_or_graph, _slice_batch(example_batch, mb), proxy=False, split=split)
        return graphs[mb]

    mb = global_batch // (chosen.dp * chosen.M)
    if mb != graph.batch_size and not _is_graph(model_or_graph):
        # the runtime captures at the microbatch size: make op ranges and fingerprint refer to that graph
        g_mb = graph_at(mb)
        if len(g_mb.ops) == len(graph.ops) and g_mb.valid_cuts == graph.valid_cuts:
            graph = g_mb
        else:  # the op sequence changed (batch 1 specialises): re-plan that graph with the chosen shape
            fixed = RanncConfig(**{**config.to_dict(), "num_stages": chosen.S, "dp_size": chosen.dp,
                                   "num_microbatches": chosen.M, "schedule": chosen.schedule})
            cm2 = CostModel.build(g_mb, cluster.device, config.precision, max_blocks=max_blocks)
            # every partitioner again: auto is the best of all of them on this graph too
            best2, searcher = _search(cm2, cluster, fixed, cap, partitioners, False, global_batch,
                                      virtual=chosen.v)
            if config.partitioner in best2:   # the baselines too are this graph's
                graph, cm, chosen, best = g_mb, cm2, best2[config.partitioner], best2
    searcher._simulate(chosen)
    p = _to_plan(chosen, cm, graph, cluster, config, cap, global_batch)
    for name, cand in best.items():
        if name != "auto":
            p.baselines[name] = cand.score
    for name, cand in proxy_best.items():
        # a baseline is also scored at its own best shape, on the graph its own plan would be built from (not
        # only at the auto plan's shape): the comparison is with the best that partitioner does
        if name != "auto" and name != config.partitioner:
            t = _score_on_own_graph(cand, cm_proxy, graph_at, model_or_graph, cluster, config, cap, name,
                                    global_batch, max_blocks)
            p.baselines[name] = min(t, p.baselines.get(name, t))
    p.cost_source = source
    p.split_min_out_features = graph.split_min_out_features
    p.bidirectional_attention = graph.has_bidirectional_attention()
    if p.bidirectional_attention and compiles(config.compile, config.precision, cm.profile.name != "cpu"):
        p.notes.append("compiled encoder: runs its captured graph (constant all-true attention masks dropped), not "
                       "its own forward, which under torch.compile builds the mask eager attention skips")
    p._graph = graph
    return p


def _score_on_own_graph(cand: Candidate, cm: CostModel, graph_at, model_or_graph: Any, cluster: Cluster,
                        config: RanncConfig, cap: float, name: str, global_batch: int, max_blocks: int) -> float:
    """The step time partitioner ``name``'s own plan would predict for its best candidate ``cand`` (found on the
    proxy capture ``cm``): re-planned at that shape on the graph captured at its microbatch size when that
    graph's op sequence differs (as :func:`_plan_one` does for the chosen plan)."""
    mb = global_batch // (cand.dp * cand.M)
    if mb == cm.graph.batch_size or _is_graph(model_or_graph):
        return cand.score
    g_mb = graph_at(mb)
    if len(g_mb.ops) == len(cm.graph.ops) and g_mb.valid_cuts == cm.graph.valid_cuts:
        return cand.score
    fixed = RanncConfig(**{**config.to_dict(), "num_stages": cand.S, "dp_size": cand.dp,
                           "num_microbatches": cand.M, "schedule": cand.schedule, "partitioner": name})
    cm2 = CostModel.build(g_mb, cluster.device, config.precision, max_blocks=max_blocks)
    best2, _ = _search(cm2, cluster, fixed, cap, (name,), False, global_batch, virtual=cand.v)
    return best2[name].score if name in best2 else cand.score


def _search(cm: CostModel, cluster: Cluster, config: RanncConfig, cap: float, partitioners: tuple[str, ...],
            progress: bool, global_batch: int, virtual: Optional[int] = None):
    searcher = Searcher(cm, cluster, config, gpu_memory=int(cap), progress=progress, global_batch=global_batch,
                        virtual=virtual)
    best = searcher.run(partitioners)
    if config.partitioner not in best and config.offload == "auto":
        searcher = Searcher(cm, cluster, config, gpu_memory=int(cap), progress=progress, offload_modes=OFFLOAD_ORDER,
                            global_batch=global_batch, virtual=virtual)
        best = searcher.run(partitioners)
    return best, searcher


def _is_graph(obj: Any) -> bool:
    from ..capture import Graph
    return isinstance(obj, Graph)


def proxy_batch_size(batch_size: int, limit: int = 2) -> int:
    """The batch size planning captures at: the batch itself when small, else its largest divisor <= ``limit``
    (at least 2, so capture still sees which values carry the batch). Capture time grows with the
    batch on some models (HF mask construction), so the default proxy is 2."""
    if batch_size <= limit:
        return batch_size
    for d in range(limit, 1, -1):
        if batch_size % d == 0:
            return d
    return batch_size


def _slice_batch(batch: Any, n: int) -> Any:
    import torch
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, (tuple, list)):
        return type(batch)(x[:n] if isinstance(x, torch.Tensor) else x for x in batch)
    return {k: (v[:n] if isinstance(v, torch.Tensor) else v) for k, v in dict(batch).items()}


def _local_cluster() -> Cluster:
    try:
        import torch
        n = torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        n = 0
    return Cluster(num_gpus=max(1, n), device="auto")


def _as_graph(model_or_graph: Any, example_batch: Any, proxy: bool = True, split: Optional[int] = None):
    """(graph, global batch size). Modules are captured at a small proxy batch; costs are rescaled.
    ``split``: capture linears at least this wide as vocabulary chunks (:mod:`rannc_hf.capture.split_head`)."""
    from ..capture import Graph, batch_size_of, capture, normalize_batch

    if isinstance(model_or_graph, Graph):
        return model_or_graph, model_or_graph.batch_size
    if example_batch is None:
        from ..errors import CaptureError
        raise CaptureError("plan(model, example_batch): an example batch is needed to capture the model "
                           "(the global batch: a tensor, a tuple or a dict of keyword arguments)")
    args, kwargs = normalize_batch(example_batch)
    B = batch_size_of(args, kwargs)
    P = proxy_batch_size(B) if proxy else B
    return capture(model_or_graph, _slice_batch(example_batch, P) if P != B else example_batch,
                   split_min_out_features=split), B


def _want_measured(costs: str) -> bool:
    if costs not in ("auto", "analytic", "measured"):
        raise ConfigError(f"costs={costs!r}: expected 'auto', 'analytic' or 'measured'")
    return costs == "measured"


def _tokens_per_sample(graph) -> int:
    for inp in graph.inputs:
        m = inp.meta
        if m is not None and "int" in m.dtype and len(m.shape) >= 2:
            return int(m.shape[1])
    return 1


def _to_plan(c: Candidate, cm: CostModel, graph, cluster: Cluster, config: RanncConfig, cap: float,
             global_batch: int) -> Plan:
    stages = []
    rc_name = "selective" if config.recompute == "selective" else "full"
    for i, (lo, hi) in enumerate(c.chunks):
        a, b = cm.op_range(lo, hi)
        n_par, _, _ = cm.stage_params(lo, hi)
        starts = [cm.blocks[j][1] + 1 for j in c.segments[i]] if c.recompute[i] and i < len(c.segments) else []
        stages.append(StagePlan(index=i, op_range=(a, b), modules=describe(graph, a, b), num_params=int(n_par),
                                param_bytes=int(n_par * 4), memory=dict(c.memory[i]), fwd_ms=c.fwd[i] * 1e3,
                                bwd_ms=c.bwd[i] * 1e3, recompute=rc_name if c.recompute[i] else "none",
                                recompute_starts=starts, offload=c.offload[i], replicas=c.dp,
                                gpu_step_rest=bool(c.rest_on_gpu[i]) if i < len(c.rest_on_gpu) else False))
    t = cm.table
    # one micro-batch's FLOPs times the micro-batches of a step: a graph captured at batch 1 has no batch
    # dimension to scale by (export specialises it), so scaling it straight to the global batch undercounts
    sc = t.scale(max(1, global_batch // (c.dp * c.M)))
    flops = float(((t.flops + t.bwd_flops) * sc).sum())
    flops += sum(float((t.flops * sc)[cm.op_range(lo, hi)[0]:cm.op_range(lo, hi)[1] + 1].sum())
                 for (lo, hi), rc in zip(c.chunks, c.recompute) if rc)
    flops *= c.dp * c.M
    p = Plan(stages=stages, num_microbatches=c.M, batch_size=global_batch, dp_size=c.dp, schedule=c.schedule,
             virtual_stages=c.v, partitioner=config.partitioner, predicted_step_time=c.score,
             predicted_bubble=c.sim.bubble if c.sim else 0.0, gpu_memory=int(cap), device=cm.profile.name,
             model_class=graph.model_class, graph_fingerprint=graph.fingerprint(), num_ops=len(graph.ops),
             tokens_per_sample=_tokens_per_sample(graph), flops_per_step=flops,
             stage_p2p_ms=[x * 1e3 for x in c.p2p], rank_tail_ms=[x * 1e3 for x in c.tail], dp_inner=c.dp_inner)
    if c.partitioner != config.partitioner:
        p.notes.append(f"the best auto candidate came from the {c.partitioner} partition")
    if c.v > 1:
        p.notes.append(f"interleaved: {c.v} chunks per rank; stage i runs on pipeline rank i % {c.S}")
    if any(o != "none" for o in c.offload):
        p.notes.append("offload chosen because the model does not fit the GPUs otherwise")
    host = sum(m.get("host", 0) for m in c.memory)
    if host and cluster.host_memory_bytes and host * c.dp > cluster.host_memory_bytes * cluster.num_nodes:
        p.notes.append(f"offload needs {format_bytes(host * c.dp)} of host memory in total")
    return p


def _does_not_fit(cm: CostModel, cluster: Cluster, config: RanncConfig, cap: float, mem: float,
                  global_batch: int) -> PlanDoesNotFitError:
    """Binary-search the smallest per-GPU memory, and double the GPU count, until something fits."""
    modes = OFFLOAD_ORDER if config.offload == "auto" else None
    s = Searcher(cm, cluster, config, gpu_memory=int(cap), offload_modes=modes, global_batch=global_batch)
    margin = 1.0 - config.mem_margin
    lo, hi = cap, cap * 2
    while not s.feasible_with(hi) and hi < cap * 2**20:
        lo, hi = hi, hi * 2
    need_mem = None
    if s.feasible_with(hi):
        for _ in range(30):
            mid = (lo + hi) / 2
            if s.feasible_with(mid):
                hi = mid
            else:
                lo = mid
            if hi - lo < 0.01 * hi:
                break
        need_mem = hi / margin
    need_gpus = None
    if config.num_stages is None and config.dp_size is None:
        g = cluster.num_gpus * 2
        while g <= cluster.num_gpus * 4096 and need_gpus is None:
            cl = Cluster(num_gpus=g, gpus_per_node=cluster.gpus_per_node, gpu_memory=int(mem),
                         host_memory=cluster.host_memory, device=cluster.device)
            # enough GPUs means enough pipeline stages; replicas need a batch that divides, so test dp = 1
            cfg = RanncConfig(**{**config.to_dict(), "dp_size": 1, "num_stages": None})
            if g <= cm.num_blocks and Searcher(cm, cl, cfg, gpu_memory=int(cap), offload_modes=modes,
                                                        global_batch=global_batch).feasible_with(cap):
                need_gpus = g
            g *= 2
    what = [f"{cm.graph.model_class} ({cm.graph.num_params / 1e6:,.1f}M parameters) does not fit "
            f"{cluster.num_gpus} GPU(s) of {format_bytes(mem)} (cap {format_bytes(cap)} after "
            f"mem_margin={config.mem_margin}) with any partition, schedule, recompute or offload setting allowed."]
    if need_mem is not None:
        what.append(f"It needs at least {format_bytes(need_mem)} per GPU with {cluster.num_gpus} GPU(s)")
    if need_gpus is not None:
        what.append(f"or at least {need_gpus} GPUs of {format_bytes(mem)}")
    if need_mem is None and need_gpus is None:
        what.append("No memory size or GPU count tried fits; a single block is larger than any GPU.")
    what.append("Fix: more/larger GPUs (--gpus / --gpu-memory), a smaller batch, recompute='auto' or offload='auto'.")
    return PlanDoesNotFitError(" ".join(what[:1]) + "\n" + " ".join(what[1:-1]) + ".\n" + what[-1])
