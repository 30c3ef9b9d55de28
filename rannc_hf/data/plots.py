"""Loss-curve plots for the recipes (matplotlib, Agg backend: works on headless machines).

    from rannc_hf.data.plots import plot_loss_curve
    history = [{"step": 1, "loss": 8.3}, {"step": 2, "loss": 7.9, "eval_loss": 8.0}, ...]
    plot_loss_curve(history, "out/loss.png", title="tiny GPT, 2 stages")

``history`` is a list of dicts (as in ``Trainer.state.log_history``) or a dict of lists
(``{"step": [...], "loss": [...]}``). Training loss is drawn raw and smoothed; ``eval_loss``
points are drawn when present.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Optional, Sequence, Union

__all__ = ["plot_loss_curve", "smooth"]

History = Union[Sequence[Mapping[str, float]], Mapping[str, Sequence[float]]]


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Debiased exponential moving average (the TensorBoard smoothing).

    >>> [round(v, 3) for v in smooth([1.0, 1.0, 1.0])]
    [1.0, 1.0, 1.0]
    """
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def _series(history: History, key: str, step_key: str) -> tuple[list[float], list[float]]:
    if isinstance(history, Mapping):
        ys = list(history.get(key, []))
        xs = list(history.get(step_key, range(1, len(ys) + 1)))
        pairs = list(zip(xs, ys))
    else:
        pairs = [(r.get(step_key, i + 1), r[key]) for i, r in enumerate(history) if key in r]
    pairs = [(float(x), float(y)) for x, y in pairs if y is not None and math.isfinite(float(y))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_loss_curve(history: History, path: Union[str, os.PathLike], title: Optional[str] = None,
                    loss_key: str = "loss", eval_key: str = "eval_loss", step_key: str = "step",
                    smoothing: float = 0.9, log_y: bool = False) -> str:
    """Write a PNG of the training (and validation) loss against the step; returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    xs, ys = _series(history, loss_key, step_key)
    exs, eys = _series(history, eval_key, step_key)
    if not ys and not eys:
        raise ValueError(f"history has no {loss_key!r} or {eval_key!r} values to plot")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    try:
        if ys:
            ax.plot(xs, ys, color="tab:blue", alpha=0.3, linewidth=1, label=f"train {loss_key}")
            if len(ys) > 5 and smoothing > 0:
                ax.plot(xs, smooth(ys, smoothing), color="tab:blue", linewidth=2, label="train (smoothed)")
        if eys:
            ax.plot(exs, eys, "o-", color="tab:orange", linewidth=1.5, markersize=4, label="validation")
        ax.set_xlabel(step_key)
        ax.set_ylabel("loss")
        if log_y:
            ax.set_yscale("log")
        if title:
            ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
