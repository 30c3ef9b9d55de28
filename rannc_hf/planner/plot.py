"""Draw a plan: per-stage memory as stacked bars and the simulated pipeline timeline (PNG).

    >>> plan.plot("plan.png")        # doctest: +SKIP

``plan.plot(path)`` calls :func:`plot_plan`.
"""

from __future__ import annotations

import os


def plot_plan(plan, path: str | os.PathLike) -> str:
    """Write a two-panel PNG for ``plan`` and return its path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .simulate import simulate

    path = os.fspath(path)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    parts = ["params", "grads", "optimizer", "activations", "buffers"]
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]
    xs = list(range(plan.num_stages))
    bottom = [0.0] * len(xs)
    for part, color in zip(parts, colors):
        vals = [s.memory.get(part, 0) / 2**30 for s in plan.stages]
        ax1.bar(xs, vals, bottom=bottom, color=color, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    if plan.gpu_memory:
        ax1.axhline(plan.gpu_memory / 2**30 / max(1, plan.virtual_stages), color="k", ls="--", lw=1, label="cap")
    ax1.set_xlabel("stage")
    ax1.set_ylabel("GiB per GPU")
    ax1.set_title("memory per stage")
    ax1.legend(fontsize=7)

    fwd = [s.fwd_ms for s in plan.stages]
    bwd = [s.bwd_ms for s in plan.stages]
    p2p = plan.stage_p2p_ms or [0.0] * len(fwd)
    tail = plan.rank_tail_ms or None
    sim = simulate(fwd, bwd, plan.num_microbatches, plan.schedule, p2p, plan.virtual_stages, tail, keep_timeline=True)
    cmap = plt.get_cmap("tab20")
    # one broken_barh per (rank, F/B): a 64-stage, 1024-microbatch interleaved plan has ~260k boxes, which
    # took more than 10 minutes as one barh call each
    spans: dict[tuple[int, str], tuple[list, list]] = {}
    last_end: dict[int, float] = {}
    for (r, start, end, kind, m, c) in sim.timeline:
        xr, cols = spans.setdefault((r, kind), ([], []))
        xr.append((start, end - start))
        cols.append(cmap(m % 20))
        last_end[r] = max(last_end.get(r, 0.0), end)
    lw = 0.3 if len(sim.timeline) < 5000 else 0.0
    for (r, kind), (xr, cols) in spans.items():
        ax2.broken_barh(xr, (r - 0.4, 0.8), facecolors=cols, alpha=1.0 if kind == "F" else 0.55,
                        edgecolor="k", linewidth=lw)
    if tail:
        for r, t in enumerate(tail):
            if r in last_end and t > 0:
                ax2.barh(r, t, left=last_end[r], color="#999999", hatch="//", edgecolor="k", lw=0.3)
    from matplotlib.ticker import MaxNLocator

    ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.invert_yaxis()
    ax2.set_xlabel("ms (F solid, B light, grey: all-reduce + optimizer)")
    ax2.set_ylabel("pipeline rank")
    ax2.set_title(f"{plan.schedule}, {plan.num_microbatches} microbatches: step {sim.step_time:.1f} ms, "
                  f"bubble {sim.bubble:.0%}")
    fig.suptitle(f"{plan.model_class}: {plan.num_ranks_pp} stages x {plan.dp_size} replicas", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
