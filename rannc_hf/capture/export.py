"""Capture any ``nn.Module`` + example batch as a :class:`~rannc_hf.capture.graph.Graph` via ``torch.export``.

    >>> import torch, rannc_hf
    >>> from rannc_hf.zoo import make
    >>> model, batch = make("llama", batch_size=2)
    >>> g = rannc_hf.capture(model, batch)          # or capture(model, tensor) / capture(model, (a, b))
    >>> g.loss == g.outputs[0]
    True

The batch may be a tensor, a tuple of positional tensors, or a dict of keyword arguments (what
Hugging Face models take). HF models get ``use_cache=False`` for the capture. Models on the ``meta``
device capture without allocating memory, so a 100B-parameter config plans on a laptop.

The captured fx ``GraphModule`` (``graph.module``) reads the model's own parameter objects through
``get_attr`` nodes, so stage modules built from it train the user's parameters in place.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import traceback
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import CaptureError
from .analysis import analyse
from .constant_masks import drop_constant_open_masks
from .graph import ATTENTION_OPS, Graph, InputInfo, Op, ParamInfo, TensorMeta, op_base_name
from .split_head import loss_only, split_large_linears

_SKIP_TARGETS = {"aten._assert_tensor_metadata.default", "aten._assert_scalar.default",
                 "aten.sym_constrain_range_for_size.default", "aten._assert_async.msg"}


def normalize_batch(batch: Any) -> tuple[tuple, dict]:
    """Split an example batch into ``(args, kwargs)`` for the model call."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return (), dict(batch)
    raise CaptureError(f"example batch must be a tensor, a tuple of tensors or a dict of keyword arguments; "
                       f"got {type(batch).__name__}")


def batch_size_of(args: tuple, kwargs: dict) -> int:
    """The common size of dim 0 of every tensor input; a clear error if they disagree or there is none."""
    sizes = {}
    for k, v in list(enumerate(args)) + list(kwargs.items()):
        if isinstance(v, torch.Tensor):
            if v.dim() == 0:
                raise CaptureError(f"input {k!r} is a 0-d tensor: every tensor input needs a batch dimension "
                                   f"(dim 0). Pass per-sample values with shape [batch, ...] or make it a constant.")
            sizes[str(k)] = int(v.shape[0])
    if not sizes:
        raise CaptureError("the example batch holds no tensors; pass the tensors the model takes (e.g. input_ids)")
    if len(set(sizes.values())) > 1:
        raise CaptureError(f"inputs disagree on the batch size (dim 0): {sizes}. Every tensor input must have "
                           f"the batch as its first dimension.")
    return next(iter(sizes.values()))


@contextlib.contextmanager
def hf_capture_settings(model: nn.Module):
    """Temporarily set what ``torch.export`` needs on Hugging Face models (``use_cache=False``)."""
    cfg = getattr(model, "config", None)
    saved = {}
    if cfg is not None:
        for key, value in (("use_cache", False), ("return_dict", True)):
            if hasattr(cfg, key):
                saved[key] = getattr(cfg, key)
                try:
                    setattr(cfg, key, value)
                except Exception:  # frozen or property-backed attribute
                    saved.pop(key)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(cfg, key, value)


def _user_frame(exc: BaseException) -> str:
    """The innermost frame of the exception that lies in user/model code rather than torch itself."""
    torch_dir = os.path.dirname(torch.__file__)
    lib_dir = os.path.dirname(os.__file__)
    best = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        fn = frame.filename
        if fn.startswith(torch_dir) or fn.startswith(lib_dir) or "site-packages/torch" in fn or fn.startswith("<"):
            continue
        if os.sep + "rannc_hf" + os.sep + "capture" in fn:
            continue
        best = f"{fn}:{frame.lineno}: {(frame.line or '').strip()}"
    # torch.export often records the user line in the message itself
    msg = str(exc)
    for line in msg.splitlines():
        if 'File "' in line and "torch" not in line and "_export" not in line and not best:
            best = line.strip()
    return best


def _explain(exc: BaseException) -> str:
    name = type(exc).__name__
    msg = str(exc).strip().splitlines()
    head = msg[0] if msg else name
    text = str(exc)
    if "data-dependent" in text.lower() or "GuardOnDataDependent" in name or "DataDependent" in name:
        advice = ("the model's control flow depends on tensor values (an `if` or loop on a tensor's content). "
                  "Rewrite it with torch.where / torch.cond, or move the data-dependent part outside the model.")
    elif "Unsupported" in name or "not supported" in text.lower():
        advice = "an operation torch.export cannot trace. Replace it with tensor ops or move it out of forward()."
    else:
        advice = "torch.export could not trace the model's forward()."
    return f"{name}: {head}\n  why: {advice}"


def _val_metas(val: Any) -> tuple[list[TensorMeta], bool]:
    if isinstance(val, torch.Tensor):
        return [TensorMeta(tuple(int(s) for s in val.shape), str(val.dtype))], False
    if isinstance(val, (tuple, list)):
        metas = []
        for v in val:
            if isinstance(v, torch.Tensor):
                metas.append(TensorMeta(tuple(int(s) for s in v.shape), str(v.dtype)))
        return metas, True
    return [], False


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # export prefixes names like "L__self___transformer_h_0"; newer torch gives the dotted FQN
    return path


def _is_causal_attention(node: fx.Node, model: nn.Module, module_path: str) -> bool:
    """An attention op whose mask is causal: ``is_causal=True``, or an owning module that says so. HF attention
    modules carry ``is_causal`` and pass a materialized mask under export, but run ``is_causal`` kernels eagerly."""
    pos = ATTENTION_OPS.get(op_base_name(str(node.target)))
    if node.kwargs.get("is_causal") is True or (pos is not None and len(node.args) > pos and node.args[pos] is True):
        return True
    try:
        owner = model.get_submodule(module_path) if module_path else None
    except AttributeError:   # not a dotted name of the model's modules
        return False
    return getattr(owner, "is_causal", False) is True


def _source(node: fx.Node) -> str:
    st = node.meta.get("stack_trace") or ""
    lines = [l.strip() for l in st.splitlines() if l.strip().startswith("File ")]
    if not lines:
        return ""
    last = lines[-1]  # 'File "/path/x.py", line 12, in forward'
    try:
        path = last.split('"')[1]
        lineno = last.split("line ")[1].split(",")[0]
        return f"{os.path.basename(path)}:{lineno}"
    except IndexError:
        return last


def _clean(gm: fx.GraphModule) -> None:
    """Drop export's guard call and runtime shape assertions: they are no-ops for a fixed shape."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
            if hasattr(gm, "_guards_fn"):
                delattr(gm, "_guards_fn")
        elif node.op == "call_function" and str(node.target) in _SKIP_TARGETS and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def _tied_groups(model: nn.Module) -> tuple[dict[str, str], list[list[str]]]:
    """Map every parameter/buffer alias to one name per object, and list groups with several names."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    for name, b in model.named_buffers(remove_duplicate=False):
        by_id.setdefault(id(b), []).append(name)
    alias = {}
    groups = []
    for names in by_id.values():
        for n in names:
            alias[n] = names[0]
        if len(names) > 1:
            groups.append(names)
    return alias, groups


def _output_structure(ep, out_node: fx.Node) -> tuple[list[str], list[str]]:
    """Names of the output values and their keys ("loss", "logits", "0", ...)."""
    leaves = list(out_node.args[0]) if isinstance(out_node.args[0], (tuple, list)) else [out_node.args[0]]
    names = [l.name if isinstance(l, fx.Node) else "" for l in leaves]
    keys: list[str] = []
    try:
        spec = ep.call_spec.out_spec
        ctx = spec.context
        if isinstance(ctx, (list, tuple)) and len(ctx) == len(leaves):
            keys = [str(k) for k in ctx]
    except Exception:
        keys = []
    if not keys:
        keys = [str(i) for i in range(len(leaves))]
    return names, keys


def capture(model: nn.Module, example_batch: Any, *, loss_key: str = "loss",
            split_min_out_features: Optional[int] = None) -> Graph:
    """Export ``model(**batch)`` (or ``model(*batch)``) and analyse it into a :class:`Graph`.

    ``split_min_out_features``: a ``linear`` whose weight has at least this many rows (a large-vocabulary LM
    head) is captured as vocabulary chunks the planner can put on different stages, with a chunked loss and
    only the loss as output (:mod:`.split_head`); ``None`` keeps every op whole. :func:`rannc_hf.plan` tries
    both and records its choice in the plan."""
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture() needs an nn.Module, got {type(model).__name__}")
    args, kwargs = normalize_batch(example_batch)
    bsz = batch_size_of(args, kwargs)
    kwargs = {**_hf_extra_kwargs(model, kwargs), **kwargs}
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta:
        args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    try:
        with hf_capture_settings(model), torch.no_grad():
            ep = torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with an explanation
        where = _user_frame(exc)
        raise CaptureError(
            f"could not capture {type(model).__name__}: {_explain(exc)}\n"
            f"  where: {where or 'unknown (see the chained exception)'}\n"
            f"  fix: make forward() traceable, or capture a smaller part of the model"
        ) from exc

    gm = ep.module()
    _clean(gm)
    drop_constant_open_masks(gm)   # as Hugging Face does eagerly: attention keeps its fused kernels
    if split_min_out_features:
        cats = split_large_linears(gm, split_min_out_features)
        if not cats:
            split_min_out_features = None   # nothing that wide: the graph is the plain one
        else:   # only the loss is kept, computed from per-chunk statistics (no logits cross stages)
            out = next(n for n in gm.graph.nodes if n.op == "output")
            names, keys = _output_structure(ep, out)
            if loss_key in keys:
                loss_only(gm, cats, keys.index(loss_key))
    alias, tied = _tied_groups(model)
    graph_nodes = list(gm.graph.nodes)

    # graph inputs, in placeholder order, keyed back to the user's argument names
    keys = [f"arg{i}" for i in range(len(args))] + list(kwargs)
    flat_inputs = [a for a in args] + [kwargs[k] for k in kwargs]
    placeholders = [n for n in graph_nodes if n.op == "placeholder"]
    inputs: list[InputInfo] = []
    ph_iter = iter(placeholders)
    for key, value in zip(keys, flat_inputs):
        if value is None:
            continue
        node = next(ph_iter, None)
        if node is None:
            break
        if isinstance(value, torch.Tensor):  # constants (use_cache=False, ...) are baked into the graph
            meta = TensorMeta(tuple(int(s) for s in value.shape), str(value.dtype), 0)
            inputs.append(InputInfo(node.name, key, meta))

    params: dict[str, ParamInfo] = {}
    getattr_name: dict[str, str] = {}  # get_attr node name -> canonical param name
    for node in graph_nodes:
        if node.op == "get_attr":
            target = str(node.target)
            canon = alias.get(target, target)
            getattr_name[node.name] = canon
            if canon not in params:
                obj = _fetch_attr(gm, target)
                if isinstance(obj, torch.Tensor):
                    params[canon] = ParamInfo(canon, tuple(int(s) for s in obj.shape), str(obj.dtype),
                                              is_buffer=not isinstance(obj, nn.Parameter),
                                              requires_grad=bool(getattr(obj, "requires_grad", False)))
    # the tied group lists the name the graph uses first
    used_tied = []
    for group in tied:
        canon = alias[group[0]]
        graph_name = next((str(n.target) for n in graph_nodes if n.op == "get_attr" and alias.get(str(n.target)) == canon), None)
        if graph_name is not None and graph_name != canon:
            params[graph_name] = params.pop(canon)
            params[graph_name].name = graph_name
            for k, v in getattr_name.items():
                if v == canon:
                    getattr_name[k] = graph_name
            group = [graph_name] + [n for n in group if n != graph_name]
        used_tied.append(sorted(group, key=lambda n: n != (graph_name or canon)))

    ops: list[Op] = []
    input_names = {i.name for i in inputs}
    for node in graph_nodes:
        if node.op != "call_function":
            continue
        outs, is_tuple = _val_metas(node.meta.get("val"))
        op = Op(
            index=len(ops), name=node.name, target=str(node.target),
            inputs=[n.name for n in node.all_input_nodes if n.op != "get_attr"],
            params=sorted({getattr_name[n.name] for n in node.all_input_nodes if n.op == "get_attr"}),
            outputs=outs, module=_module_path(node), source=_source(node), is_tuple=is_tuple,
        )
        op.causal = op_base_name(op.target) in ATTENTION_OPS and _is_causal_attention(node, model, op.module)
        ops.append(op)
        for p in op.params:
            params[p].users.append(op.index)

    out_node = next(n for n in graph_nodes if n.op == "output")
    out_names, out_keys = _output_structure(ep, out_node)
    loss = _find_loss(ops, inputs, out_names, out_keys, loss_key, type(model).__name__)

    graph = Graph(ops=ops, inputs=inputs, params=params, tied_groups=used_tied, loss=loss, batch_size=bsz,
                  model_class=type(model).__name__, outputs=[n for n in out_names if n],
                  output_keys=out_keys, module=gm, split_min_out_features=split_min_out_features or None)
    analyse(graph, gm, input_names)
    return graph


def _hf_extra_kwargs(model: nn.Module, kwargs: dict) -> dict:
    """Keyword arguments HF models need for export: no KV cache (its Cache objects are not pytrees)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    extra = {}
    if "use_cache" in params and getattr(getattr(model, "config", None), "use_cache", None) is not None:
        extra["use_cache"] = False
    return extra


def _fetch_attr(gm: fx.GraphModule, target: str):
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _find_loss(ops: list[Op], inputs: list[InputInfo], names: list[str], keys: list[str], loss_key: str,
               cls: str) -> str:
    metas = {op.name: op.outputs for op in ops}
    for name, key in zip(names, keys):
        if key == loss_key and name:
            return name
    for name in names:
        m = metas.get(name)
        if m and len(m) == 1 and m[0].shape == () and "float" in m[0].dtype:
            return name
    raise CaptureError(
        f"{cls}'s output has no scalar loss (outputs: {', '.join(k for k in keys) or 'none'}). rannc_hf trains "
        f"models whose forward returns the loss: pass labels (Hugging Face models), or return a scalar loss "
        f"tensor / an object with a `.loss` field, e.g. wrap the model in a module that applies your loss_fn."
    )
