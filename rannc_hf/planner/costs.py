"""Block-level costs the search reads: per-block time, activations, parameters and boundary bytes.

    >>> from rannc_hf.capture import capture
    >>> from rannc_hf.zoo import make
    >>> from rannc_hf.planner.costs import CostModel
    >>> g = capture(*make("llama", batch_size=8))
    >>> cm = CostModel.build(g, device="h200", precision="bf16", max_blocks=32)
    >>> arr = cm.at(2)                  # a microbatch of 2 samples
    >>> len(arr.fwd) == cm.num_blocks, bool(arr.fwd.sum() > 0)
    (True, True)

Costs come from :mod:`rannc_hf.profile.analytic` (or measured per-block times, see
:mod:`rannc_hf.profile.measure`) at the capture batch and are rescaled to any microbatch size:
batch-carrying values scale linearly, weights and masks do not.
"""

from __future__ import annotations

import re

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..profile.analytic import OpCostTable, host_times, is_batchy, op_cost_table, op_times, out_bytes, saved_bytes
from ..profile.devices import DeviceProfile, get_profile
from .coarsen import coarsen


@dataclass
class BlockArrays:
    """Costs of every block at one microbatch size (seconds / bytes)."""

    fwd: np.ndarray
    bwd: np.ndarray
    saved: np.ndarray       #: activation bytes kept for backward
    peak_out: np.ndarray    #: largest single op output (transient working memory)
    cross: np.ndarray       #: bytes crossing the cut after each block (0 after the last)
    #: host seconds of the blocks' eager forward and backward (zeros when compiled): a stage's micro-batch takes
    #: at least their sum (see :func:`~rannc_hf.profile.analytic.host_times`)
    host_fwd: Optional[np.ndarray] = None
    host_bwd: Optional[np.ndarray] = None


class CostModel:
    """Costs of a graph's block chain on a device profile, rescalable to any microbatch size."""

    def __init__(self, graph, blocks: list[tuple[int, int]], table: OpCostTable, profile: DeviceProfile,
                 precision: str = "bf16", measured: Optional[tuple[np.ndarray, np.ndarray]] = None,
                 compiled: bool = False):
        self.graph = graph
        self.compiled = compiled    #: priced as ``torch.compile`` runs it (no eager host floor)
        self.blocks = blocks
        self.table = table
        self.profile = profile
        self.precision = precision
        self.measured = measured  # (fwd, bwd) seconds per block at the capture batch
        self.num_blocks = len(blocks)
        self.block_of_op = np.zeros(len(graph.ops), dtype=np.int64)
        for j, (a, b) in enumerate(blocks):
            self.block_of_op[a:b + 1] = j
        self._starts = np.array([a for a, _ in blocks], dtype=np.int64)
        # parameters: per block, trainable params first used there (search) and exact sets (final checks)
        self.block_params: list[set[str]] = [set() for _ in blocks]
        for op in graph.ops:
            j = int(self.block_of_op[op.index])
            self.block_params[j].update(op.params)
        seen: set[str] = set()
        self.params_first = np.zeros(len(blocks))
        self.buffer_first = np.zeros(len(blocks))
        for j, names in enumerate(self.block_params):
            for p in sorted(names - seen):
                info = graph.params.get(p)
                if info is None:
                    continue
                if info.is_buffer or not info.requires_grad:
                    self.buffer_first[j] += info.nbytes
                else:
                    self.params_first[j] += info.numel
            seen |= names
        self._cross_b, self._cross_f = _crossing_parts(graph)
        self._cache: dict[float, BlockArrays] = {}
        self._host: Optional[tuple[np.ndarray, np.ndarray]] = None
        self.layer_prefixes = layer_prefixes(graph.params)
        self._outside: dict[tuple[int, int], int] = {}
        self._variants: dict[tuple[bool, bool], "CostModel"] = {}

    def outside_layers(self, b0: int, b1: int, names: set[str]) -> int:
        """Trainable parameters of blocks ``b0..b1`` (``names``, from :meth:`stage_params`) outside the
        repeated layers (embeddings, heads): the offload engine's resident group, stepped on the CPU
        before the layers' steps start."""
        key = (b0, b1)
        if key not in self._outside:
            n = 0
            for p in names:
                info = self.graph.params.get(p)
                if info is None or info.is_buffer or not info.requires_grad:
                    continue
                if not any(p.startswith(pre + ".") for pre in self.layer_prefixes):
                    n += info.numel
            self._outside[key] = n
        return self._outside[key]

    @classmethod
    def build(cls, graph, device: str | DeviceProfile = "auto", precision: str = "bf16", max_blocks: int = 256,
              measured: Optional[tuple[np.ndarray, np.ndarray]] = None) -> "CostModel":
        profile = get_profile(device)
        table = op_cost_table(graph, precision)
        fwd, bwd = op_times(table, profile)
        blocks = coarsen(graph, max_blocks=max_blocks, op_cost=fwd + bwd + 1e-9)
        return cls(graph, blocks, table, profile, precision, measured)

    def variant(self, weights_in_compute_dtype: bool = False, compiled: bool = False) -> "CostModel":
        """The same blocks priced for a stage that computes with compute-dtype weights (the offload engine's bf16
        working copies) and/or runs compiled without recompute (fewer activations kept, see
        :func:`~rannc_hf.profile.analytic.op_cost_table`); ``self`` for neither. Cached."""
        key = (bool(weights_in_compute_dtype), bool(compiled))
        if key == (False, False):
            return self
        cm = self._variants.get(key)
        if cm is None or cm.measured is not self.measured:
            table = op_cost_table(self.graph, self.precision, weights_in_compute_dtype=key[0], compiled=key[1])
            cm = CostModel(self.graph, self.blocks, table, self.profile, self.precision, self.measured,
                           compiled=key[1])
            self._variants[key] = cm
        return cm

    # ---- per microbatch size ------------------------------------------------------------
    def at(self, mb: float) -> BlockArrays:
        """Block costs for a microbatch of ``mb`` samples (cached)."""
        key = float(mb)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        t = self.table
        fwd, bwd = op_times(t, self.profile, mb)
        sv = saved_bytes(t, mb)
        ob = out_bytes(t, mb)
        idx = self._starts
        f = np.add.reduceat(fwd, idx)
        b = np.add.reduceat(bwd, idx)
        if self.measured is not None:  # measured at the capture batch: keep the analytic batch scaling
            mf, mbk = self.measured
            f0, b0 = op_times(t, self.profile, t.batch_size)
            f = mf * f / np.maximum(np.add.reduceat(f0, idx), 1e-12)
            b = mbk * b / np.maximum(np.add.reduceat(b0, idx), 1e-12)
        s = np.add.reduceat(sv, idx)
        po = np.maximum.reduceat(ob, idx)
        r = float(mb) / max(1, self.graph.batch_size)
        ends = np.array([e for _, e in self.blocks], dtype=np.int64)
        cross = self._cross_b[ends] * r + self._cross_f[ends]
        cross[-1] = 0.0
        arr = BlockArrays(f, b, s, po, cross)
        if not self.compiled and self.measured is None and self.profile.host_launch_s > 0:
            arr.host_fwd, arr.host_bwd = self._host_per_block()
        self._cache[key] = arr
        return arr

    def _host_per_block(self) -> tuple[np.ndarray, np.ndarray]:
        """Per block host seconds of an eager forward and backward: the same at every micro-batch size (cached)."""
        if self._host is None:
            hf, hb = host_times(self.table, self.profile)
            self._host = (np.add.reduceat(hf, self._starts), np.add.reduceat(hb, self._starts))
        return self._host

    # ---- exact per-stage facts ----------------------------------------------------------
    def stage_params(self, b0: int, b1: int) -> tuple[int, int, set[str]]:
        """(trainable params, buffer bytes, names) used by blocks ``b0..b1`` (inclusive)."""
        names: set[str] = set()
        for j in range(b0, b1 + 1):
            names |= self.block_params[j]
        n = buf = 0
        for p in names:
            info = self.graph.params.get(p)
            if info is None:
                continue
            if info.is_buffer or not info.requires_grad:
                buf += info.nbytes
            else:
                n += info.numel
        return n, buf, names

    def op_range(self, b0: int, b1: int) -> tuple[int, int]:
        return self.blocks[b0][0], self.blocks[b1][1]


_LAYER_INDEX = re.compile(r"^(.*?)\.(\d+)\.")


def layer_prefixes(params: dict) -> set[str]:
    """Module paths of the repeated layers, from parameter names alone, as
    :func:`rannc_hf.offload.find_blocks` picks them on the module: the outermost numbered list with at
    least 2 entries holding at least 10% of the trainable parameters (``transformer.h``, ``model.layers``).

        >>> from types import SimpleNamespace as P
        >>> w = lambda n: P(numel=n, requires_grad=True, is_buffer=False)
        >>> sorted(layer_prefixes({"wte.weight": w(50), "h.0.w": w(30), "h.1.w": w(30), "head.0.w": w(1)}))
        ['h']
    """
    total = sum(i.numel for i in params.values() if i.requires_grad and not i.is_buffer) or 1
    found: dict[str, tuple[set, int]] = {}
    for name, info in params.items():
        if info.is_buffer or not info.requires_grad:
            continue
        m = _LAYER_INDEX.match(name)
        if m:
            idx, n = found.get(m.group(1), (set(), 0))
            idx.add(m.group(2))
            found[m.group(1)] = (idx, n + info.numel)
    return {pre for pre, (idx, n) in found.items() if len(idx) >= 2 and n >= 0.1 * total}


def _crossing_parts(graph) -> tuple[np.ndarray, np.ndarray]:
    """Bytes crossing the cut after each op, split into batch-carrying and fixed parts."""
    last = graph.last_use()
    n = len(graph.ops)
    delta_b = np.zeros(n + 1)
    delta_f = np.zeros(n + 1)

    def add(start: int, end: int, meta_list) -> None:
        # value live across cuts start..end-1 (defined at op `start`, last read by op `end`)
        if end <= start:
            return
        for m in meta_list:
            nb = m.nbytes
            if is_batchy(m, graph.batch_size):
                delta_b[max(start, 0)] += nb
                delta_b[min(end, n)] -= nb
            else:
                delta_f[max(start, 0)] += nb
                delta_f[min(end, n)] -= nb

    for inp in graph.inputs:
        e = last.get(inp.name, -2)
        if e >= 0 and inp.meta is not None:
            add(0, e, [inp.meta])
    for op in graph.ops:
        e = last.get(op.name, -2)
        if e > op.index:
            add(op.index, e, op.outputs)
    return np.cumsum(delta_b)[:n], np.cumsum(delta_f)[:n]
