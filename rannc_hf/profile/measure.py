"""Measured costs: run a captured graph's blocks on the local device and time them (cached on disk).

    >>> from rannc_hf.capture import capture
    >>> from rannc_hf.zoo import make
    >>> from rannc_hf.planner.coarsen import coarsen
    >>> model, batch = make("forkjoin", batch_size=4)
    >>> g = capture(model, batch)
    >>> fwd, bwd = measure_blocks(g, batch, coarsen(g, 8), model=model, iters=2)   # seconds per block
    >>> len(fwd) == len(coarsen(g, 8)) and bool(fwd.sum() > 0)
    True

Forward times are measured per block by running the captured fx graph node by node (an
``torch.fx.Interpreter``) on the model's device and summing each block's node times (median of
``iters`` runs after a warm-up). The backward of the whole graph is timed once and split across
blocks in proportion to the analytic backward estimate. Results are cached as JSON under
``cache_dir`` (``config.profile_cache``, default ``~/.cache/rannc_hf/profiles``), keyed by graph
fingerprint + device + input shapes + block boundaries.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from typing import Any, Optional

import numpy as np
import torch
import torch.fx as fx

from .analytic import op_cost_table, op_times
from .devices import get_profile


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "rannc_hf", "profiles")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def cache_key(graph, blocks: list[tuple[int, int]], device_name: str) -> str:
    shapes = [(i.key, i.meta.shape if i.meta else None) for i in graph.inputs]
    raw = json.dumps([graph.fingerprint(), device_name, shapes, blocks], default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer(fx.Interpreter):
    def __init__(self, gm, op_index: dict[str, int], device: torch.device):
        super().__init__(gm)
        self.op_index = op_index
        self.device = device
        self.times = np.zeros(len(op_index))

    def run_node(self, n):
        idx = self.op_index.get(n.name)
        if idx is None:
            return super().run_node(n)
        _sync(self.device)
        t = time.perf_counter()
        out = super().run_node(n)
        _sync(self.device)
        self.times[idx] += time.perf_counter() - t
        return out


def loss_of(output: Any) -> Any:
    """The scalar loss of a captured module's output (a tensor, a ModelOutput, a dict or a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "loss"):
        return output.loss
    if isinstance(output, dict):
        return output.get("loss")
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    return None


def placeholder_values(graph, gm, args: tuple, kwargs: dict, device) -> list:
    """Values for every placeholder of the captured module, in order: the batch's tensors by their
    input key, and the constants export baked in (``use_cache=False``) from the placeholder's meta."""
    by_key = {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}
    key_of = {i.name: i.key for i in graph.inputs}
    values = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        if node.name in key_of:
            v = by_key[key_of[node.name]]
            values.append(v.to(device) if isinstance(v, torch.Tensor) else v)
        else:
            values.append(node.meta.get("val"))
    return values


def measure_blocks(graph, example_batch: Any, blocks: list[tuple[int, int]], model: Optional[torch.nn.Module] = None,
                   iters: int = 3, cache_dir: Optional[str] = None,
                   precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """(forward seconds, backward seconds) per block at the graph's capture batch; on a GPU with ``precision``
    bf16/fp16 under ``torch.autocast``, as the stages run (fp32 GEMMs run several times slower)."""
    if graph.module is None:
        raise ValueError("measure_blocks needs a freshly captured graph (graph.module is None)")
    params = list(graph.module.parameters())
    if any(p.is_meta for p in params):
        raise ValueError("cannot measure a model on the meta device; use analytic costs")
    device = params[0].device if params else torch.device("cpu")
    name = _device_name(device)
    cache_dir = cache_dir or default_cache_dir()
    amp = precision in ("bf16", "fp16") and device.type == "cuda"
    key = cache_key(graph, blocks, name + (f"-{precision}" if amp else ""))
    path = os.path.join(cache_dir, f"{key}.json")
    if os.path.exists(path):
        with open(path) as f:
            d = json.load(f)
        return np.array(d["fwd"]), np.array(d["bwd"])

    from ..capture import normalize_batch
    args, kwargs = normalize_batch(example_batch)
    gm = graph.module
    tensors = placeholder_values(graph, gm, args, kwargs, device)
    op_index = {op.name: op.index for op in graph.ops}
    fwd_runs, bwd_runs = [], []
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    for it in range(iters + 1):
        timer = _Timer(gm, op_index, device)
        with torch.autocast(device.type, dtype=dtype) if amp else contextlib.nullcontext():
            out = timer.run(*tensors)
            loss = loss_of(out)
        _sync(device)
        t = time.perf_counter()
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            loss.backward()
        _sync(device)
        bwd_total = time.perf_counter() - t
        for p in params:
            p.grad = None
        if it > 0:  # first run warms up
            fwd_runs.append(timer.times)
            bwd_runs.append(bwd_total)
    op_fwd = np.median(np.stack(fwd_runs), axis=0)
    starts = np.array([a for a, _ in blocks])
    fwd = np.add.reduceat(op_fwd, starts)
    # split the measured backward like the analytic estimate
    table = op_cost_table(graph, "fp32")
    _, ab = op_times(table, get_profile("cpu" if device.type == "cpu" else "auto"))
    share = np.add.reduceat(ab, starts)
    share = share / share.sum() if share.sum() > 0 else np.full(len(blocks), 1.0 / len(blocks))
    bwd = share * float(np.median(bwd_runs))
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"device": name, "fingerprint": graph.fingerprint(), "fwd": fwd.tolist(), "bwd": bwd.tolist()}, f)
    os.replace(tmp, path)
    return fwd, bwd
