"""Graph analysis after export: batch dimensions, aliasing, in-place writes and valid cut positions.

    >>> from rannc_hf.capture import capture
    >>> from rannc_hf.zoo import make
    >>> g = capture(*make("cnn", batch_size=4))
    >>> g.valid_cuts[-1]          # nothing to cut after the last op
    False

Why this matters: ``torch.export`` keeps in-place ops (T5's ``_shift_right``, Mixtral's
``index_put_``, BatchNorm's running statistics). A stage boundary between a view and a later
in-place write to its storage would silently train a different model, so such cuts are invalid.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from .graph import Graph

# ops that update buffers in place without declaring it in their schema
_UNANNOTATED_BUFFER_WRITERS = ("batch_norm", "_native_batch_norm_legit")


def _schema(node: fx.Node):
    return getattr(node.target, "_schema", None)


def analyse(graph: Graph, gm: fx.GraphModule, input_names: set[str]) -> None:
    """Fill ``batch_dim``, ``alias_of`` and ``writes`` of every op and ``graph.valid_cuts``."""
    nodes = {n.name: n for n in gm.graph.nodes}
    getattr_target = {n.name: str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    B = graph.batch_size
    root: dict[str, str] = {name: name for name in input_names}
    batchy: dict[str, bool] = {name: True for name in input_names}

    def root_of(arg) -> str | None:
        if isinstance(arg, fx.Node):
            if arg.name in getattr_target:
                return "param:" + getattr_target[arg.name]
            return root.get(arg.name, arg.name)
        return None

    for op in graph.ops:
        node = nodes[op.name]
        schema = _schema(node)
        root[op.name] = op.name
        # --- aliasing (views) and in-place writes, from the op schema
        if node.target is operator.getitem:
            src = node.args[0]
            src_op = graph.op(src.name) if isinstance(src, fx.Node) and src.name in graph._index else None
            if src_op is not None and src_op.alias_of is not None:
                root[op.name] = root[src.name]
        elif schema is not None:
            arg_values = _bind(schema, node)
            ret_sets = {str(s) for r in schema.returns if r.alias_info is not None for s in r.alias_info.before_set}
            for arg, value in arg_values:
                ai = arg.alias_info
                if ai is None:
                    continue
                r = root_of(value)
                if r is None:
                    continue
                if ai.is_write:
                    op.writes.append(r)
                if any(str(s) in ret_sets for s in ai.before_set) and op.alias_of is None:
                    op.alias_of = r
                    root[op.name] = r
            if any(w in str(node.target) for w in _UNANNOTATED_BUFFER_WRITERS):
                for value in node.all_input_nodes:
                    if value.name in getattr_target and "running" in getattr_target[value.name]:
                        op.writes.append("param:" + getattr_target[value.name])
            op.writes = sorted(set(op.writes))
        # --- batch dimension
        is_batchy = any(batchy.get(n.name, False) for n in node.all_input_nodes)
        batchy[op.name] = is_batchy
        if is_batchy and B > 1:
            for t in op.outputs:
                dims = [d for d, s in enumerate(t.shape) if s == B] or [d for d, s in enumerate(t.shape) if s and s % B == 0]
                t.batch_dim = dims[0] if dims else None

    graph.valid_cuts = _valid_cuts(graph, root)


def _bind(schema, node: fx.Node):
    """Pair schema arguments with the node's actual values (positional then keyword)."""
    out = []
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out.append((arg, node.args[i]))
        elif arg.name in node.kwargs:
            out.append((arg, node.kwargs[arg.name]))
    for arg, value in list(out):
        if isinstance(value, (list, tuple)):  # Tensor(a!)[] arguments
            out.remove((arg, value))
            out.extend((arg, v) for v in value)
    return out


def _valid_cuts(graph: Graph, root: dict[str, str]) -> list[bool]:
    n = len(graph.ops)
    last = graph.last_use()
    last_write: dict[str, int] = {}
    first_write_user: dict[str, int] = {}
    for op in graph.ops:
        for w in op.writes:
            last_write[w] = op.index
    # a written parameter/buffer must stay with every op that touches it (one stage owns its state)
    forbidden = [False] * n
    for w in last_write:
        if w.startswith("param:"):
            users = graph.params.get(w[6:])
            idx = users.users if users else []
            if idx:
                lo, hi = min(idx), max(idx)
                for i in range(lo, hi):
                    forbidden[i] = True
    del first_write_user

    tuple_vals = {op.name for op in graph.ops if op.is_tuple or not op.outputs}
    ends: dict[int, list[str]] = {}
    for v, e in last.items():
        ends.setdefault(e, []).append(v)
    live: set[str] = {i.name for i in graph.inputs if last.get(i.name, -2) >= 0}
    valid = []
    for op in graph.ops:
        i = op.index
        if last.get(op.name, -2) > i:
            live.add(op.name)
        for v in ends.get(i, ()):
            live.discard(v)
        ok = i < n - 1 and not forbidden[i]
        if ok:
            roots = set()
            for v in live:
                if v in tuple_vals:
                    ok = False
                    break
                r = root.get(v, v)
                if r in roots or last_write.get(r, -1) > i:
                    ok = False
                    break
                roots.add(r)
        valid.append(ok)
    return valid
