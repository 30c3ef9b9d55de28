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
``cat([linear(x, W[a:b]) for each chunk], -1)``: the same values, now several ops. :func:`loss_only` then
drops the model's other outputs (the runtime returns only the loss when training) and has
:func:`chunk_cross_entropy` compute the cross-entropy from running per-token statistics (max, sum of
exponentials, target logit) updated after each chunk, so no [batch, seq, vocab] tensor is ever built and
only [tokens]-sized values cross stages. A stage holding a chunk holds ``W`` (the runtime treats it like a
tied weight: gradients summed over the stages that hold it, priced by the planner).
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

_aten = torch.ops.aten
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


def _meta(gm: fx.GraphModule, a):
    """``a`` (a node or a constant) as a meta tensor, for computing the meta value of a new node."""
    if not isinstance(a, fx.Node):
        return [_meta(gm, x) for x in a] if isinstance(a, (list, tuple)) else a
    v = _param_of(gm, a) if a.op == "get_attr" else a.meta["val"]
    return torch.empty(v.shape, dtype=v.dtype, device="meta")


def _call(gm: fx.GraphModule, like: fx.Node, target, *args) -> fx.Node:
    """A new call node with ``like``'s metadata (module path, source line) and a meta value computed by running
    ``target`` on meta inputs (shape analysis reads it)."""
    node = gm.graph.call_function(target, args)
    node.meta.update({k: v for k, v in like.meta.items() if k != "val"})
    node.meta["val"] = target(*[_meta(gm, a) for a in args])
    return node


def split_large_linears(gm: fx.GraphModule, min_out_features: int = DEFAULT_MIN_OUT_FEATURES,
                        chunk_rows: int | None = None) -> list[fx.Node]:
    """Rewrite every ``aten.linear`` whose weight parameter has ``>= min_out_features`` rows into vocabulary
    chunks of about ``chunk_rows`` rows (default: a quarter of ``min_out_features``; at most ``MAX_CHUNKS``; see
    the module docstring). Returns the ``cat`` nodes that replace the split ops; ``gm`` is recompiled when
    there are any."""
    chunk_rows = chunk_rows or max(1, min_out_features // 4)
    cats: list[fx.Node] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _aten.linear.default:
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
                args = [x, _call(gm, node, _aten.slice.Tensor, w, 0, a, b)]
                if bias is not None:
                    args.append(_call(gm, node, _aten.slice.Tensor, bias, 0, a, b))
                parts.append(_call(gm, node, _aten.linear.default, *args))
            cat = _call(gm, node, _aten.cat.default, parts, -1)
        node.replace_all_uses_with(cat)
        gm.graph.erase_node(node)
        cats.append(cat)
    if cats:
        gm.graph.lint()
        gm.recompile()
    return cats


# ---------------------------------------------------------------------------------------------- chunked loss
def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def loss_only(gm: fx.GraphModule, cats: list[fx.Node], loss_leaf: int) -> int:
    """Training graphs of a split head: every model output but the loss (``loss_leaf``) becomes ``None`` (the
    runtime returns only the loss when training), then each head's loss is computed from chunk statistics
    (:func:`chunk_cross_entropy`). Returns how many heads were rewritten; ``gm`` is recompiled."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = out.args[0]
    if isinstance(leaves, (tuple, list)):
        out.args = (type(leaves)(v if i == loss_leaf else None for i, v in enumerate(leaves)),)
    n = sum(chunk_cross_entropy(gm, c) for c in cats)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return n


def chunk_cross_entropy(gm: fx.GraphModule, cat: fx.Node) -> bool:
    """Replace ``cat(z_1..z_c) [-> float] -> view(-1, V) -> cross_entropy`` by per-chunk log-sum-exp statistics
    (running max, sum of exponentials, target logit: [tokens] each), so stages holding head chunks pass only
    those on, never the logits. Mean or sum reduction, ``ignore_index``, no class weights or label smoothing.
    Returns False (graph untouched) when the pattern is not there."""
    parts = list(cat.args[0])
    node, to_float = _single_user(cat), None
    if node is not None and node.target is _aten.to.dtype and node.args[1:2] == (torch.float32,):
        to_float, node = node, _single_user(node)
    if node is None or node.target not in (_aten.view.default, _aten.reshape.default):
        return False
    view, ce = node, _single_user(node)
    if ce is None or ce.target is not _aten.cross_entropy_loss.default or ce.args[0] is not view:
        return False
    target = ce.args[1]
    weight, reduction, ignore, smoothing = (list(ce.args[2:]) + [None, 1, -100, 0.0][len(ce.args) - 2:])[:4]
    if weight is not None or reduction not in (1, 2) or smoothing not in (0, 0.0) or not isinstance(target, fx.Node):
        return False
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    first = min((p.args[1] for p in parts), key=lambda n: order[n])   # the first chunk's weight slice
    # the labels (pad/shift/view of an input) are computed after the logits: move them before the first chunk
    todo, seen = [target], set()
    while todo:
        n = todo.pop()
        if n in seen or not isinstance(n, fx.Node) or order[n] < order[first]:
            continue
        if n in parts or n is cat:
            return False
        seen.add(n)
        todo.extend(n.all_input_nodes)
    for n in sorted(seen, key=order.get):
        first.prepend(n)
    edges, a = [], 0
    for z in parts:
        edges.append(a)
        a += int(z.meta["val"].shape[-1])
    M = S = T = None
    for z, lo in zip(parts, edges):
        width = int(z.meta["val"].shape[-1])
        last = z

        def after(fn, *args):   # each new op right after the previous one: the chunk's statistics follow it
            nonlocal last
            with g.inserting_after(last):
                last = _call(gm, z, fn, *args)
            return last

        zf = after(_aten.to.dtype, z, torch.float32) if to_float is not None else z
        z2 = after(_aten.view.default, zf, [-1, width])
        m = after(_aten.amax.default, z2, [1])
        e = after(_aten.exp.default, after(_aten.sub.Tensor, z2, after(_aten.unsqueeze.default, m, 1)))
        s = after(_aten.sum.dim_IntList, e, [1])
        local = after(_aten.sub.Tensor, target, lo)
        inside = after(_aten.logical_and.default, after(_aten.ge.Scalar, local, 0), after(_aten.lt.Scalar, local, width))
        idx = after(_aten.unsqueeze.default, after(_aten.clamp.default, local, 0, width - 1), 1)
        picked = after(_aten.squeeze.dim, after(_aten.gather.default, z2, 1, idx), 1)
        t = after(_aten.mul.Tensor, picked, after(_aten.to.dtype, inside, torch.float32))
        if M is None:
            M, S, T = m, s, t
        else:
            M2 = after(_aten.maximum.default, M, m)
            S = after(_aten.add.Tensor, after(_aten.mul.Tensor, S, after(_aten.exp.default, after(_aten.sub.Tensor, M, M2))),
                      after(_aten.mul.Tensor, s, after(_aten.exp.default, after(_aten.sub.Tensor, m, M2))))
            T = after(_aten.add.Tensor, T, t)
            M = M2
    # loss = mean (or sum) over the tokens that count of log(S) + M - T
    with g.inserting_before(ce):
        lse = _call(gm, ce, _aten.add.Tensor, _call(gm, ce, _aten.log.default, S), M)
        per = _call(gm, ce, _aten.sub.Tensor, lse, T)
        valid = _call(gm, ce, _aten.to.dtype, _call(gm, ce, _aten.ne.Scalar, target, ignore), torch.float32)
        total = _call(gm, ce, _aten.sum.default, _call(gm, ce, _aten.mul.Tensor, per, valid))
        loss = total if reduction == 2 else _call(gm, ce, _aten.div.Tensor, total, _call(gm, ce, _aten.sum.default, valid))
    ce.replace_all_uses_with(loss)
    for n in (ce, view, to_float, cat):
        if n is not None and not n.users:
            g.erase_node(n)
    return True
