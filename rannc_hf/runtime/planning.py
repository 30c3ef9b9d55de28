"""Where the runtime gets its Plan: a saved plan, the automatic planner, or a simple fallback.

    from rannc_hf.runtime.planning import decide_layout, fallback_cuts
    layout = decide_layout(model, global_batch, config, world_size=4, batch_size=16)
    layout.num_stages, layout.dp_size, layout.num_microbatches       # before capture
    cuts = fallback_cuts(graph, layout.num_stages)                   # balanced by ops + params

:func:`decide_layout` is the **single place** that calls the automatic planner
(``rannc_hf.planner.plan``) when it is installed; without it (or when it fails) the runtime uses
``config.num_stages`` / ``config.dp_size`` / ``config.num_microbatches`` and balances stages with
:func:`fallback_cuts`. Every decision is a deterministic function of (model, batch shape, config,
world size), so all ranks decide the same without talking to each other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..capture.graph import Graph
from ..config import RanncConfig
from ..errors import PlanDoesNotFitError, PlanMismatchError

log = logging.getLogger(__name__)


@dataclass
class Layout:
    num_stages: int            # total stages (pipeline ranks x virtual stages)
    dp_size: int
    num_microbatches: int
    schedule: str              # gpipe | 1f1b | interleaved-1f1b
    virtual_stages: int = 1
    plan: Any = None           # a Plan from the planner / file, if any


def _divisors_up_to(n: int, k: int) -> list[int]:
    return [d for d in range(1, min(n, k) + 1) if n % d == 0]


def default_microbatches(per_replica_batch: int, pp_size: int) -> int:
    """2 x stages microbatches when the batch allows it (small bubble), else the largest divisor."""
    want = 2 * pp_size if pp_size > 1 else 1
    divs = _divisors_up_to(per_replica_batch, want)
    return max(divs) if divs else 1


def resolve_schedule(name: str, num_microbatches: int, pp_size: int) -> str:
    if name == "auto":
        return "1f1b" if num_microbatches >= pp_size > 1 else "gpipe"
    return name


def automatic_planner():
    """``rannc_hf.planner.plan`` if the automatic planner has landed, else None."""
    try:
        from .. import planner
    except ImportError:
        return None
    return getattr(planner, "plan", None)


def decide_layout(model, global_batch, config: RanncConfig, *, world_size: int, batch_size: int,
                  plan=None, batch_is_local: bool = False) -> Layout:
    """Stages, replicas, microbatches and schedule for ``world_size`` ranks and a per-step batch of
    ``batch_size`` samples (all replicas; one replica's if ``batch_is_local``). ``plan``: a Plan given
    by the user or loaded from a file."""
    if plan is None:
        auto = automatic_planner()
        if auto is not None:
            try:
                from ..config import Cluster

                plan = auto(model, global_batch, cluster=Cluster(num_gpus=world_size), config=config, progress=False)
                plan = _respecting_config(plan, config, world_size)
            except PlanDoesNotFitError:
                m = config.num_microbatches
                if not (m and batch_size % m):
                    raise  # a memory-blind fallback would only run out of memory later
                plan = None  # not memory: the batch cannot be split as asked, which the runtime reports clearly
            except Exception as e:  # noqa: BLE001 - the fallback below always works
                log.warning("rannc_hf: automatic planner failed (%s); using the balanced fallback", e)
                plan = None
    if plan is not None:
        plan.check_world(world_size)
        pp = plan.num_ranks_pp
        return Layout(plan.num_stages, plan.dp_size, plan.num_microbatches,
                      resolve_schedule(plan.schedule, plan.num_microbatches, pp), plan.virtual_stages, plan)
    # ---- fallback: the config, else all ranks as pipeline stages
    virtual = 2 if config.schedule == "interleaved-1f1b" else 1
    if config.num_stages is not None:   # num_stages counts pipeline ranks; interleaving adds chunks per rank
        pp = config.num_stages
        dp = config.dp_size or max(1, world_size // pp)
    elif config.dp_size is not None:
        dp = config.dp_size
        pp = max(1, world_size // dp)
    else:
        pp, dp = world_size, 1
    if pp * dp != world_size:
        raise PlanMismatchError(f"config asks for {pp} pipeline ranks x {dp} replicas = {pp * dp} processes, "
                                f"but {world_size} were launched; fix num_stages/dp_size or the launch command")
    per_replica = batch_size if batch_is_local else max(1, batch_size // dp)
    m = config.num_microbatches or default_microbatches(per_replica, pp * virtual)
    return Layout(pp * virtual, dp, m, resolve_schedule(config.schedule, m, pp), virtual, None)


def _respecting_config(plan, config: RanncConfig, world_size: int):
    """The planner's plan if it honours the fixed config values and the world size, else None (fallback)."""
    pp = plan.num_ranks_pp
    ok = plan.world_size == world_size
    ok &= config.num_stages is None or plan.num_ranks_pp == config.num_stages   # pipeline ranks
    ok &= config.dp_size is None or plan.dp_size == config.dp_size
    ok &= config.num_microbatches is None or plan.num_microbatches == config.num_microbatches
    ok &= config.schedule == "auto" or plan.schedule == config.schedule
    ok &= plan.virtual_stages == 1 or plan.schedule == "interleaved-1f1b"
    if not ok:
        log.warning("rannc_hf: the planner's plan (%d stages x %d replicas, %d microbatches, %s) does not match the "
                    "config/world (%d ranks); using the balanced fallback", plan.num_stages, plan.dp_size,
                    plan.num_microbatches, plan.schedule, world_size)
        return None
    del pp
    return plan


def fallback_cuts(graph: Graph, num_stages: int) -> list[int]:
    """``num_stages - 1`` valid cuts that balance (op count + parameter count) halves between stages."""
    if num_stages <= 1:
        return []
    n = len(graph.ops)
    valid = [i for i, ok in enumerate(graph.valid_cuts) if ok]
    if len(valid) < num_stages - 1:
        raise PlanMismatchError(f"{graph.model_class} has only {len(valid)} valid cut positions; cannot make "
                                f"{num_stages} stages. Use fewer stages.")
    # weight of each op: half by op count, half by the parameters it first reads
    seen: set[str] = set()
    pw = [0.0] * n
    for op in graph.ops:
        for p in op.params:
            info = graph.params.get(p)
            if info is not None and not info.is_buffer and p not in seen:
                seen.add(p)
                pw[op.index] += info.numel
    total_p = sum(pw) or 1.0
    w = [0.5 / n + 0.5 * x / total_p for x in pw]
    cum, acc = [], 0.0
    for x in w:
        acc += x
        cum.append(acc)
    cuts: list[int] = []
    for k in range(1, num_stages):
        target = k / num_stages
        lo = cuts[-1] + 1 if cuts else 0
        remaining = num_stages - 1 - k           # cuts still needed after this one
        cands = [c for c in valid if c >= lo and sum(1 for v in valid if v > c) >= remaining]
        if not cands:
            raise PlanMismatchError(f"cannot place {num_stages} stages on {graph.model_class}")
        cuts.append(min(cands, key=lambda c: (abs(cum[c] - target), c)))
    return cuts


def cuts_for(graph: Graph, layout: Layout) -> list[int]:
    """The cuts of ``layout.plan`` if they fit ``graph``, else balanced fallback cuts."""
    plan = layout.plan
    if plan is not None and plan.num_stages == layout.num_stages:
        cuts = plan.cuts
        if plan.num_ops == len(graph.ops) and all(0 <= c < len(graph.ops) - 1 and graph.valid_cuts[c] for c in cuts):
            return list(cuts)
        log.warning("rannc_hf: the plan's cuts do not fit the captured graph; using balanced cuts")
    return fallback_cuts(graph, layout.num_stages)
