"""Split a huge output projection (a large-vocabulary LM head) into vocabulary chunks the planner can spread
over pipeline stages.

    >>> import torch, rannc_hf
    >>> from rannc_hf.capture import capture
    >>> from rannc_hf.zoo import make
    >>> model, batch = make("llama", batch_size=2)        # vocab 128: split only because of the low threshold
    >>> g = capture(model, batch, split_min_out_features=128)
    >>> sum(op.target == "aten.slice.Tensor" and op.params == ["lm_head.weight"] for op in g.ops)
    4

A 250k-vocabulary head is one matmul worth about ten transformer layers of a 2k-wide model: whichever
stage holds it bounds the step, however the rest is cut. :func:`split_large_linears` rewrites
``linear(x, W)`` (``W`` a parameter with at least ``min_out_features`` rows) into
``cat([linear(x, W[a:b]) for each chunk], -1)``: the same values, now several ops. A stage holding a chunk
holds ``W`` (the runtime treats it like a tied weight: gradients summed over the stages that hold it, priced
by the planner), and the partial logits travel to the stage of the ``cat``.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

DEFAULT_MIN_OUT_FEATURES = 131_072   #: heads at least this wide are split (Llama-3 128k, Gemma 256k, ...)
MAX_CHUNKS = 8
CHUNK_ROWS = DEFAULT_MIN_OUT_FEATURES // 4   #: about this many output features per chunk (a head at the threshold: 4)


def num_chunks(out_features: int, chunk_rows: int = CHUNK_ROWS) -> int:
    """How many chunks a head of ``out_features`` rows becomes.

        >>> num_chunks(250_000), num_chunks(131_072), num_chunks(40_000)
        (8, 4, 2)
    """
    return max(1, min(MAX_CHUNKS, math.ceil(out_features / chunk_rows)))


def _param_of(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.nn.Parameter) else None


def _meta_like(val, last_dim: int):
    """A meta tensor shaped like ``val`` with its last dimension set to ``last_dim`` (for shape analysis)."""
    return torch.empty((*val.shape[:-1], last_dim), dtype=val.dtype, device="meta")


def split_large_linears(gm: fx.GraphModule, min_out_features: int = DEFAULT_MIN_OUT_FEATURES,
                        chunk_rows: int | None = None) -> int:
    """Rewrite every ``aten.linear`` whose weight parameter has ``>= min_out_features`` rows into vocabulary
    chunks of about ``chunk_rows`` rows (default: a quarter of ``min_out_features``; at most ``MAX_CHUNKS``; see
    the module docstring). Returns how many ops were split; ``gm`` is recompiled when any was."""
    chunk_rows = chunk_rows or max(1, min_out_features // 4)
    split = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        weight = _param_of(gm, w)
        val = node.meta.get("val")
        if weight is None or weight.dim() != 2 or not isinstance(val, torch.Tensor):
            continue
        rows = int(weight.shape[0])
        if rows < min_out_features:
            continue
        n = num_chunks(rows, chunk_rows)
        if n < 2:
            continue
        edges = [round(i * rows / n) for i in range(n + 1)]
        parts = []
        with gm.graph.inserting_before(node):
            for a, b in zip(edges[:-1], edges[1:]):
                ws = gm.graph.call_function(torch.ops.aten.slice.Tensor, (w, 0, a, b))
                ws.meta.update({k: v for k, v in node.meta.items() if k != "val"})
                ws.meta["val"] = torch.empty((b - a, weight.shape[1]), dtype=weight.dtype, device="meta")
                args = [x, ws]
                if bias is not None:
                    bs = gm.graph.call_function(torch.ops.aten.slice.Tensor, (bias, 0, a, b))
                    bs.meta.update({k: v for k, v in node.meta.items() if k != "val"})
                    bs.meta["val"] = torch.empty((b - a,), dtype=weight.dtype, device="meta")
                    args.append(bs)
                z = gm.graph.call_function(torch.ops.aten.linear.default, tuple(args))
                z.meta.update({k: v for k, v in node.meta.items() if k != "val"})
                z.meta["val"] = _meta_like(val, b - a)
                parts.append(z)
            cat = gm.graph.call_function(torch.ops.aten.cat.default, (parts, -1))
            cat.meta.update(node.meta)
        node.replace_all_uses_with(cat)
        gm.graph.erase_node(node)
        split += 1
    if split:
        gm.graph.lint()
        gm.recompile()
    return split
