"""Analytic per-op costs: FLOPs, bytes moved, activation bytes kept for backward, and times on a device.

    >>> from rannc_hf.capture import capture
    >>> from rannc_hf.zoo import make
    >>> from rannc_hf.profile.analytic import op_cost_table, op_times
    >>> from rannc_hf.profile.devices import get_profile
    >>> g = capture(*make("gpt2", batch_size=4))
    >>> t = op_cost_table(g, precision="bf16")
    >>> fwd, bwd = op_times(t, get_profile("h200"), batch=4)
    >>> bool(t.flops.sum() > 0 and (bwd >= 0).all() and fwd.sum() > 0)
    True

Model: ``time = max(flops / (peak * efficiency), bytes / (bandwidth * efficiency)) + launch overhead``
for every op that launches a kernel (views are free). FLOPs come from ``torch.utils.flop_counter``'s
formulas where they apply (``mm``, ``addmm``, ``bmm``, ``baddbmm``, convolutions) and from a small table
for the composite ops ``torch.export`` keeps (``linear``, ``conv2d``, ``scaled_dot_product_attention``,
``matmul``, grouped expert GEMMs); other ops count one FLOP per output element. Backward costs 2x the
forward FLOPs of matmul-like ops (input and weight gradients, each only when needed), 2.5x for fused
attention, 2x the bytes for memory-bound ops. Dtypes follow autocast: matmul-like outputs are in the
compute precision (bf16/fp16), the autocast fp32 list (norms, softmax, losses, pow, exp, ...) stays
fp32, the rest follows type promotion. Costs are for the capture batch; :func:`op_times` rescales the
batch-carrying part (values with a ``batch_dim``) to any microbatch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..capture.graph import ATTENTION_OPS, op_base_name
from .devices import DeviceProfile

# kinds
FREE, MEMORY, GEMM, ATTENTION = 0, 1, 2, 3

_VIEW_OPS = {
    "view", "reshape", "_unsafe_view", "transpose", "t", "permute", "unsqueeze", "squeeze", "expand", "expand_as",
    "slice", "select", "alias", "split", "split_with_sizes", "chunk", "unbind", "detach", "view_as", "unflatten",
    "flatten", "narrow", "movedim", "as_strided", "_assert_tensor_metadata", "_assert_scalar", "getitem",
    "lift_fresh_copy", "sym_size", "sym_numel", "contiguous_noop", "numpy_T", "dropout_noop",
}
_GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "conv1d", "conv2d", "conv3d", "convolution",
             "_convolution", "conv_transpose1d", "conv_transpose2d", "einsum", "grouped_mm", "grouped_mm_fallback",
             "_grouped_mm", "addbmm", "mv", "dot", "bilinear"}
_ATTN_OPS = set(ATTENTION_OPS)
_FP32_OPS = {"layer_norm", "native_layer_norm", "group_norm", "softmax", "_softmax", "log_softmax", "_log_softmax",
             "cross_entropy_loss", "nll_loss", "nll_loss_nd", "mse_loss", "binary_cross_entropy_with_logits", "pow",
             "exp", "log", "rsqrt", "sum", "mean", "norm", "linalg_vector_norm", "cumsum", "prod", "sqrt",
             "rms_norm", "kl_div", "smooth_l1_loss", "l1_loss"}
# ops whose output autograd keeps (the rest keep some of their inputs, handled via consumers)
_SAVES_OUTPUT = {"tanh", "sigmoid", "softmax", "_softmax", "log_softmax", "_log_softmax", "exp", "rsqrt", "relu",
                 "sqrt", "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "elu", "hardtanh"}
#: compiled (inductor): the share of an eager pointwise op's memory traffic left once fused. Fitted on plain GPT-2
#: 1.3B, micro-batch 16, H200 (DESIGN.md section 7): eager 37.5k tokens/s, priced 425 ms fwd + bwd (236 GEMM and
#: attention, 189 the rest); compiled 59.7k tokens/s, 264 ms without its optimizer step: 236 + 189 x 0.15.
COMPILED_POINTWISE_TRAFFIC = 0.15
#: a gradient's cast back from the compute dtype to fp32 (autocast's casts, in backward) runs PyTorch's unrolled,
#: non-vectorized conversion kernel: ~2.0 TB/s on the H200 for 4M-8M elements (BERT-large, twelfth session's
#: profile) against ~3.9 for the vectorized down-cast of the forward
UP_CONVERT_SLOWDOWN = 1.9
# compiled (inductor): pointwise activations whose kept output is recomputed in backward instead
_POINTWISE_SAVES = {"tanh", "sigmoid", "exp", "rsqrt", "relu", "sqrt", "elu", "hardtanh"}
# compiled: non-GEMM ops whose inputs stay kept (not recomputable cheaply from elsewhere)
_COMPILED_KEEPS = {"layer_norm", "native_layer_norm", "group_norm", "rms_norm", "batch_norm", "_native_batch_norm_legit",
                   "_native_batch_norm_legit_no_training", "softmax", "_softmax", "log_softmax", "_log_softmax",
                   "cross_entropy_loss", "nll_loss", "nll_loss_nd", "mse_loss", "binary_cross_entropy_with_logits",
                   "kl_div", "smooth_l1_loss", "l1_loss", "embedding", "gather", "index", "index_select",
                   "max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "adaptive_avg_pool2d", "scatter",
                   "scatter_add", "index_add", "topk", "sort", "cumsum"}
# ops whose backward needs none of their inputs
_NEEDS_NO_INPUT = {"add", "sub", "neg", "clone", "contiguous", "to", "_to_copy", "cat", "copy_", "pad",
                   "constant_pad_nd", "sum", "mean", "dropout", "tanh", "sigmoid", "softmax", "_softmax", "relu",
                   "log_softmax", "_log_softmax", "exp", "rsqrt", "sqrt", "expand", "repeat", "stack", "add_",
                   "index_select", "masked_fill", "masked_fill_", "where",
                   "fill_", "zero_", "getitem", "view", "reshape", "transpose", "permute", "unsqueeze", "squeeze",
                   "slice", "select", "alias", "split", "chunk", "detach", "flatten", "unflatten", "narrow"}
_CREATION = {"arange", "zeros", "ones", "full", "empty", "new_ones", "new_zeros", "new_empty", "new_full",
             "zeros_like", "ones_like", "full_like", "empty_like", "rand", "randn", "randint", "tensor",
             "scalar_tensor", "empty_strided", "rand_like", "randn_like"}


base_name = op_base_name


@dataclass
class OpCostTable:
    """Per-op costs of a graph at its capture batch size (numpy arrays, one entry per op)."""

    kind: np.ndarray          #: FREE / MEMORY / GEMM / ATTENTION
    flops: np.ndarray         #: forward FLOPs
    bwd_flops: np.ndarray     #: backward FLOPs (0 off the gradient path)
    bytes_b: np.ndarray       #: forward bytes moved that scale with the batch
    bytes_f: np.ndarray       #: forward bytes moved that do not (weights, masks)
    bwd_bytes_b: np.ndarray
    bwd_bytes_f: np.ndarray
    saved_b: np.ndarray       #: activation bytes kept for backward (batch part)
    saved_f: np.ndarray       #: activation bytes kept for backward (fixed part)
    out_b: np.ndarray         #: output bytes in the compute dtype (batch part; fixed outputs in out_f)
    out_f: np.ndarray
    batchy: np.ndarray        #: the op's output carries the batch dimension
    needs_grad: np.ndarray    #: the op is on the gradient path
    batch_size: int
    precision: str
    #: eager autocast: bytes (at the capture batch) of the casts to the compute dtype a GEMM or attention op
    #: launches for its fp32 activations (read 4 + write 2 a value; the same again for their gradients in backward).
    cast_b: Optional[np.ndarray] = None
    #: eager autocast: bytes and kernels of the casts of an op's fp32 parameters to the compute dtype, once per
    #: micro-batch and parameter (read 4 + write 2 an element; autocast caches a parameter's cast within one
    #: forward, so a tied weight is cast once), and the same for the gradients of those that train. BERT-large's
    #: profile on the H200 (twelfth session) counted these kernels, one per weight and bias, every micro-batch
    wcast_f: Optional[np.ndarray] = None
    wcast_n: Optional[np.ndarray] = None
    wcast_bwd_f: Optional[np.ndarray] = None
    wcast_bwd_n: Optional[np.ndarray] = None
    #: backward bytes of kernels of their own beside an op's gradient: summing the gradients of a value several
    #: ops read (charged to its producer) and reducing a GEMM's output gradient into its bias gradient
    extra_bwd_b: Optional[np.ndarray] = None
    extra_bwd_f: Optional[np.ndarray] = None
    #: attention ops' query head dimension (0 for other ops or when unknown): narrow heads run slower
    #: (``DeviceProfile.attention_head_dim``)
    head_dim: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.kind)

    def scale(self, batch: float) -> np.ndarray:
        """Per-op factor that maps capture-batch costs to a microbatch of ``batch`` samples."""
        r = float(batch) / max(1, self.batch_size)
        return np.where(self.batchy, r, 1.0)


def is_batchy(meta, batch_size: int) -> bool:
    """A value carries the batch if capture marked a ``batch_dim``, or its leading dim equals the batch
    (masks built from ``arange`` lose the mark but still grow with the batch)."""
    if meta.batch_dim is not None:
        return True
    return batch_size > 1 and len(meta.shape) > 0 and int(meta.shape[0]) == batch_size


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _is_float(dtype: str) -> bool:
    return "float" in dtype or "bfloat" in dtype or "complex" in dtype


def op_cost_table(graph, precision: str = "bf16", weights_in_compute_dtype: bool = False,
                  compiled: bool = False) -> OpCostTable:
    """Analytic per-op costs for ``graph`` (a captured :class:`~rannc_hf.capture.Graph`).

    ``weights_in_compute_dtype``: the stage computes with weights already in the compute dtype (the offload
    engine's bf16 working copies) instead of autocast casting fp32 weights: an op fed by weights and low-precision
    values makes a low-precision result (the residual stream of a transformer stays in bf16, not fp32), and
    weights are read in the compute dtype.

    ``compiled``: the stage runs through ``torch.compile`` without activation recompute. Inductor fuses pointwise
    ops (their traffic priced at :data:`COMPILED_POINTWISE_TRAFFIC`) and recomputes them in backward instead of
    keeping their results, so only the inputs of the ops it cannot recompute cheaply are kept: GEMMs and attention
    (in the compute dtype, the casts fused into their producers), norms, softmax, losses, embeddings and gathers.
    GPT-2 2.7B on the H200 (bf16 weights, no recompute, 1 and 2 samples): 2.85 GiB a sample measured, 2.5 counted
    this way, 6.4 counted eagerly; the plans' peaks 17.3 and 19.8 GiB against 18.2 and 21.0 measured."""
    n = len(graph.ops)
    low_size = 4 if precision == "fp32" else 2
    w_size = low_size if weights_in_compute_dtype else 4
    nodes = {}
    if graph.module is not None:
        nodes = {nd.name: nd for nd in graph.module.graph.nodes}

    kind = np.zeros(n, dtype=np.int8)
    flops = np.zeros(n)
    bwd_flops = np.zeros(n)
    bytes_b = np.zeros(n)
    bytes_f = np.zeros(n)
    bwd_b = np.zeros(n)
    bwd_f = np.zeros(n)
    saved_b = np.zeros(n)
    saved_f = np.zeros(n)
    out_b = np.zeros(n)
    out_f = np.zeros(n)
    batchy = np.zeros(n, dtype=bool)
    needs_grad = np.zeros(n, dtype=bool)
    head_dim = np.zeros(n)
    cast_b = np.zeros(n)
    casts = precision != "fp32" and not compiled   # inductor fuses the casts into the producers
    wcast = [np.zeros(n) for _ in range(4)]          # fwd bytes, fwd kernels, bwd bytes, bwd kernels
    weight_casts = casts and not weights_in_compute_dtype
    cast_params: set[str] = set()

    # value name -> (itemsize, batchy, numel, producer index) ; graph inputs have producer -1
    vinfo: dict[str, tuple[int, bool, int, int]] = {}
    for inp in graph.inputs:
        if inp.meta is not None:
            size = 4 if _is_float(inp.meta.dtype) else _dtype_bytes(inp.meta.dtype)
            vinfo[inp.name] = (size, is_batchy(inp.meta, graph.batch_size), inp.meta.numel, -1)
    grad_val: dict[str, bool] = {}
    marks: set[str] = set()
    root_of: dict[str, str] = {}
    params = graph.params

    for op in graph.ops:
        i = op.index
        name = base_name(op.target)
        if name in _VIEW_OPS or (name in ("to", "_to_copy", "contiguous", "clone") and _same_dtype_copy(op, vinfo, graph)):
            k = FREE
        elif name == "dropout" and _dropout_p(nodes.get(op.name)) == 0.0:
            k = FREE    # aten::dropout returns its input when p is 0 or not training: no kernel
        elif name in _ATTN_OPS:
            k = ATTENTION
        elif name in _GEMM_OPS:
            k = GEMM
        else:
            k = MEMORY
        kind[i] = k
        is_b = any(is_batchy(t, graph.batch_size) for t in op.outputs)
        batchy[i] = is_b
        in_vals = [v for v in op.inputs if v in vinfo]
        p_req = any(params[p].requires_grad and not params[p].is_buffer for p in op.params if p in params)
        in_grad = any(grad_val.get(v, False) for v in op.inputs)
        float_out = any(_is_float(t.dtype) for t in op.outputs)
        ng = (p_req or in_grad) and float_out and name not in _CREATION
        needs_grad[i] = ng
        grad_val[op.name] = ng
        root_of[op.name] = root_of.get(op.alias_of, op.alias_of) if op.alias_of else op.name
        if k == FREE and name == "dropout" and op.inputs:   # returns its input: the same storage
            root_of[op.name] = root_of.get(op.inputs[0], op.inputs[0])

        # output dtype under autocast
        if precision == "fp32":
            out_size = 4
        elif k in (GEMM, ATTENTION):
            out_size = low_size
        elif name in _FP32_OPS:
            out_size = 4
        else:
            fl_in = [vinfo[v][0] for v in in_vals if vinfo[v][0] in (2, 4) and _val_is_float(v, graph, vinfo)]
            fl_in += [w_size for p in op.params if p in params and _is_float(params[p].dtype)]
            out_size = max(fl_in) if fl_in else low_size
        out_numel = sum(t.numel for t in op.outputs)
        o_bytes = 0
        for t in op.outputs:
            o_bytes += t.numel * (out_size if _is_float(t.dtype) else _dtype_bytes(t.dtype))
        if is_b:
            out_b[i] = o_bytes
        else:
            out_f[i] = o_bytes
        vinfo[op.name] = (out_size if float_out else (_dtype_bytes(op.outputs[0].dtype) if op.outputs else 0),
                          is_b, out_numel, i)
        if k == FREE:
            continue

        # bytes moved: inputs + params + outputs
        ib = ifx = 0.0
        for v in in_vals:
            size, vb, numel, _ = vinfo[v]
            if vb:
                ib += size * numel
            else:
                ifx += size * numel
        pbytes = sum(params[p].numel * w_size if weights_in_compute_dtype and _is_float(params[p].dtype)
                     else params[p].nbytes for p in op.params if p in params)
        ifx += pbytes
        if is_b:
            ib += o_bytes
        else:
            ifx += o_bytes
        bytes_b[i], bytes_f[i] = ib, ifx

        if casts and k in (GEMM, ATTENTION):   # autocast casts an fp32 activation at each use
            for v in in_vals:
                size, vb, numel, _ = vinfo[v]
                if size == 4 and vb and _val_is_float(v, graph, vinfo):
                    cast_b[i] += 6.0 * numel
        if weight_casts and k in (GEMM, ATTENTION):
            for pn in op.params:
                pi = params.get(pn)
                if pi is None or pn in cast_params or not (_is_float(pi.dtype) and _dtype_bytes(pi.dtype) == 4):
                    continue
                cast_params.add(pn)
                wcast[0][i] += 6.0 * pi.numel
                wcast[1][i] += 1
                if pi.requires_grad and not pi.is_buffer:
                    wcast[2][i] += 6.0 * pi.numel
                    wcast[3][i] += 1

        # FLOPs
        f = _flops(op, name, k, nodes.get(op.name), graph, out_numel)
        flops[i] = f
        if k == ATTENTION:
            q_meta = graph.value_meta(op.inputs[0]) if op.inputs else None
            q_shapes = _shapes(nodes[op.name], graph) if op.name in nodes else [q_meta.shape] if q_meta else []
            head_dim[i] = q_shapes[0][-1] if q_shapes and q_shapes[0] else 0
        if ng:
            if k == GEMM:
                w_grad = 1.0 if p_req or any(grad_val.get(v, False) for v in op.inputs[1:]) else 0.0
                x_grad = 1.0 if (op.inputs and grad_val.get(op.inputs[0], False)) else 0.0
                bwd_flops[i] = f * max(1.0, w_grad + x_grad)
            elif k == ATTENTION:
                bwd_flops[i] = 2.5 * f
            else:
                bwd_flops[i] = f
            bwd_b[i] = 2.0 * ib
            bwd_f[i] = 2.0 * ifx if k != GEMM else ifx + pbytes
            if name == "embedding":
                bwd_f[i] = sum(params[p].numel * 4 for p in op.params if p in params)
                bwd_b[i] = 2.0 * (o_bytes if is_b else 0)
        pointwise = compiled and k == MEMORY and name not in _COMPILED_KEEPS
        if pointwise:   # fused into its neighbours' kernels: most of its traffic never reaches memory
            bytes_b[i] *= COMPILED_POINTWISE_TRAFFIC
            bytes_f[i] *= COMPILED_POINTWISE_TRAFFIC
            bwd_b[i] *= COMPILED_POINTWISE_TRAFFIC
            bwd_f[i] *= COMPILED_POINTWISE_TRAFFIC
        # activations kept for backward: the op's own output ...
        if ng and name in _SAVES_OUTPUT and not (compiled and name in _POINTWISE_SAVES):
            _add_saved(saved_b, saved_f, i, o_bytes, is_b)
        if ng and name == "cross_entropy_loss" and in_vals:  # keeps log_softmax(logits) in fp32
            size, vb, numel, _ = vinfo[in_vals[0]]
            _add_saved(saved_b, saved_f, i, 4 * numel, vb)
        if ng and name == "dropout" and (_dropout_p(nodes.get(op.name)) or 0.0) > 0:
            _add_saved(saved_b, saved_f, i, out_numel, is_b)  # bool mask
        # ... and the inputs its backward reads (charged to the producing op's storage root)
        scalar_arith = name in ("mul", "div", "mul_", "div_") and len(set(in_vals)) + len(op.params) < 2
        reads = name not in _NEEDS_NO_INPUT or (compiled and k == ATTENTION)
        if ng and reads and not scalar_arith and not pointwise:
            cast = low_size if compiled and k in (GEMM, ATTENTION) else None
            for v in set(in_vals):
                if not _val_is_float(v, graph, vinfo) and name not in ("embedding", "gather", "index"):
                    continue
                size, vb, numel, _ = vinfo[v]
                if casts and k in (GEMM, ATTENTION) and size == 4 and vb:
                    # eager autocast: this op keeps its own low-precision cast of the fp32 value, not the value
                    # (BERT's Q, K and V each keep one of the layer norm's output)
                    _add_saved(saved_b, saved_f, i, low_size * numel, vb)
                    continue
                r = root_of.get(v, v)
                _mark_saved(r, vinfo, saved_b, saved_f, marks, cast)
    extra_b, extra_f = _extra_backward_bytes(graph, kind, needs_grad, vinfo, grad_val, low_size, compiled)
    return OpCostTable(kind, flops, bwd_flops, bytes_b, bytes_f, bwd_b, bwd_f, saved_b, saved_f, out_b, out_f,
                       batchy, needs_grad, graph.batch_size, precision, cast_b, *wcast, extra_b, extra_f, head_dim)


def _extra_backward_bytes(graph, kind, needs_grad, vinfo, grad_val, low_size: int,
                          compiled: bool) -> tuple[np.ndarray, np.ndarray]:
    """Backward bytes of the kernels autograd adds beside the ops' own gradients (batch part, fixed part): a value
    read by ``u`` ops on the gradient path gets ``u - 1`` gradient sums (read two, write one), charged to its
    producer; a GEMM with a bias reduces its output gradient (read once). Inductor fuses both when compiled."""
    n = len(graph.ops)
    eb, ef = np.zeros(n), np.zeros(n)
    if compiled:
        return eb, ef
    uses: dict[str, int] = {}
    for op in graph.ops:
        if not needs_grad[op.index]:
            continue
        for v in set(op.inputs):
            if grad_val.get(v, False):
                uses[v] = uses.get(v, 0) + 1
        if kind[op.index] == GEMM and any(len(graph.params[p].shape) == 1 and graph.params[p].requires_grad
                                          for p in op.params if p in graph.params):
            nb = sum(t.numel for t in op.outputs) * low_size
            if any(is_batchy(t, graph.batch_size) for t in op.outputs):
                eb[op.index] += nb
            else:
                ef[op.index] += nb
    for v, u in uses.items():
        if u < 2 or v not in vinfo:
            continue
        size, vb, numel, producer = vinfo[v]
        if producer < 0:
            continue
        if vb:
            eb[producer] += 3.0 * (u - 1) * numel * size
        else:
            ef[producer] += 3.0 * (u - 1) * numel * size
    return eb, ef


def _dropout_p(node) -> Optional[float]:
    """``aten.dropout(x, p, train)``'s effective probability: 0 when not training; None without the fx node."""
    if node is None or len(node.args) < 2 or not isinstance(node.args[1], (int, float)):
        return None
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    return float(node.args[1]) if train is not False else 0.0


def _add_saved(sb: np.ndarray, sf: np.ndarray, i: int, nbytes: float, is_batchy: bool) -> None:
    if is_batchy:
        sb[i] += nbytes
    else:
        sf[i] += nbytes


def _mark_saved(root: str, vinfo: dict, sb: np.ndarray, sf: np.ndarray, marks: set,
                size_cap: Optional[int] = None) -> None:
    """Charge a saved value to its producer once (a value read by many backward ops is kept once); ``size_cap``:
    kept at most this many bytes per element (a compiled GEMM keeps its input's low-precision cast)."""
    info = vinfo.get(root)
    if info is None:
        return
    size, vb, numel, idx = info
    if size_cap is not None:
        size = min(size, size_cap)
    if idx < 0:  # graph inputs are kept by the runtime anyway; charge nothing
        return
    if root in marks:
        return
    marks.add(root)
    _add_saved(sb, sf, idx, size * numel, vb)


def _val_is_float(v: str, graph, vinfo) -> bool:
    meta = graph.value_meta(v) if v in vinfo else None
    return meta is not None and _is_float(meta.dtype)


def _same_dtype_copy(op, vinfo, graph) -> bool:
    if not op.inputs or not op.outputs:
        return True
    meta = graph.value_meta(op.inputs[0])
    return meta is not None and meta.dtype == op.outputs[0].dtype and base_name(op.target) in ("to", "_to_copy")


def _dtype_bytes(dtype: str) -> int:
    from ..capture.graph import dtype_bytes
    return dtype_bytes(dtype)


def _shapes(node, graph) -> list[tuple]:
    """Shapes of the tensor arguments of an fx node, in argument order (parameters included)."""
    out = []

    def visit(a):
        if isinstance(a, (list, tuple)):
            for x in a:
                visit(x)
            return
        if not hasattr(a, "op"):
            return
        if a.op == "get_attr":
            p = graph.params.get(str(a.target))
            if p is None:
                val = a.meta.get("val")
                if val is not None and hasattr(val, "shape"):
                    out.append(tuple(val.shape))
                return
            out.append(tuple(p.shape))
            return
        val = a.meta.get("val")
        if val is not None and hasattr(val, "shape"):
            out.append(tuple(int(s) for s in val.shape))

    for a in node.args:
        visit(a)
    for a in node.kwargs.values():
        visit(a)
    return out


def _flops(op, name: str, kind: int, node, graph, out_numel: int) -> float:
    if kind not in (GEMM, ATTENTION):
        return float(out_numel)
    shapes = _shapes(node, graph) if node is not None else []
    if not shapes:  # graph without its fx module: fall back to input metas + params
        shapes = [graph.value_meta(v).shape for v in op.inputs if graph.value_meta(v) is not None]
        shapes += [graph.params[p].shape for p in op.params if p in graph.params]
    if not shapes or not op.outputs:
        return float(out_numel)
    out_shape = op.outputs[0].shape
    try:
        if kind == ATTENTION:
            q, k = shapes[0], shapes[1]
            # q: [..., Lq, E], k: [..., Lk, E], v: [..., Lk, Ev]
            ev = shapes[2][-1] if len(shapes) > 2 else q[-1]
            batch = _numel(q[:-2])
            full = 2.0 * batch * q[-2] * k[-2] * (q[-1] + ev)
            # a causal kernel skips the blocks above the diagonal: half the work of a square score matrix
            return full * 0.5 if op.causal and q[-2] == k[-2] else full
        if name == "linear":
            w = shapes[1]
            return 2.0 * _numel(out_shape) * w[-1]
        if name in ("conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
                    "conv_transpose2d"):
            w = shapes[1]
            if "transpose" in name:
                return 2.0 * _numel(shapes[0]) * _numel(w[1:])
            return 2.0 * _numel(out_shape) * _numel(w[1:])
        if name in ("addmm", "baddbmm", "addbmm"):
            return 2.0 * _numel(out_shape) * shapes[1][-1]
        if name in ("grouped_mm", "grouped_mm_fallback", "_grouped_mm"):
            return 2.0 * _numel(out_shape) * shapes[0][-1]
        if name in ("mm", "bmm", "matmul", "mv", "dot"):
            return 2.0 * _numel(out_shape) * shapes[0][-1]
        if name == "einsum":
            return 2.0 * max(_numel(s) for s in shapes) * max(out_shape[-1] if out_shape else 1, 1)
    except (IndexError, TypeError):
        pass
    return 2.0 * float(out_numel) * (shapes[0][-1] if shapes and shapes[0] else 1)


def op_times(table: OpCostTable, profile: DeviceProfile, batch: Optional[float] = None,
             gemm_half_flops: float = 5e8) -> tuple[np.ndarray, np.ndarray]:
    """Forward and backward seconds of every op at a microbatch of ``batch`` samples (default: capture batch).

    GEMM efficiency falls for small problems as ``flops / (flops + gemm_half_flops)`` (scaled to the device).
    """
    s = table.scale(table.batch_size if batch is None else batch)
    peak = profile.peak_flops(table.precision) * profile.gemm_efficiency
    bw = profile.mem_bw * profile.bw_efficiency
    half = gemm_half_flops * peak / 790e12  # a GEMM of this many FLOPs runs at half the peak on the device
    fl = table.flops * s
    bfl = table.bwd_flops * s
    attn_rate = peak * profile.attention_efficiency
    if profile.attention_head_dim and table.head_dim is not None:
        narrow = np.where(table.head_dim > 0, np.minimum(1.0, table.head_dim / profile.attention_head_dim), 1.0)
        attn_rate = attn_rate * narrow
    rate = np.where(table.kind == ATTENTION, attn_rate, peak)
    is_mm = (table.kind == GEMM) | (table.kind == ATTENTION)
    eff_f = np.where(is_mm, fl / (fl + half + 1e-30), 1.0)
    eff_b = np.where(is_mm, bfl / (bfl + half + 1e-30), 1.0)
    byt = table.bytes_b * s + table.bytes_f
    bbyt = table.bwd_bytes_b * s + table.bwd_bytes_f
    comp_f = np.where(is_mm, fl / (rate * np.maximum(eff_f, 1e-6)), 0.0)
    comp_b = np.where(is_mm, bfl / (rate * np.maximum(eff_b, 1e-6)), 0.0)
    live = table.kind != FREE
    fwd = np.where(live, np.maximum(comp_f, byt / bw) + profile.op_overhead, 0.0)
    bwd = np.where(live & table.needs_grad, np.maximum(comp_b, bbyt / bw) + 2 * profile.op_overhead, 0.0)
    if table.cast_b is not None:   # separate cast kernels: their time adds to the GEMM's
        cast = table.cast_b * s / bw
        fwd = fwd + cast
        bwd = bwd + np.where(table.needs_grad, cast * UP_CONVERT_SLOWDOWN, 0.0)
    if table.wcast_f is not None:
        fwd = fwd + table.wcast_f / bw + table.wcast_n * profile.op_overhead
        bwd = bwd + table.wcast_bwd_f * UP_CONVERT_SLOWDOWN / bw + table.wcast_bwd_n * profile.op_overhead
    if table.extra_bwd_b is not None:
        bwd = bwd + (table.extra_bwd_b * s + table.extra_bwd_f) / bw
    return fwd, bwd


def host_times(table: OpCostTable, profile: DeviceProfile) -> tuple[np.ndarray, np.ndarray]:
    """Host seconds every op costs an eager micro-batch's forward and backward (Python, dispatcher, autograd,
    autocast, launch: ``profile.host_launch_s`` per kernel; an autocast cast is one more each way). Independent of
    the micro-batch size: a stage whose kernels are shorter than this waits on the host, not the GPU."""
    live = table.kind != FREE
    casts = (table.cast_b > 0) if table.cast_b is not None else np.zeros(len(live), dtype=bool)
    unit = float(profile.host_launch_s)
    fwd = np.where(live, unit * (1.0 + casts), 0.0)
    bwd = np.where(live & table.needs_grad, unit * (1.0 + casts), 0.0)
    return fwd, bwd


def saved_bytes(table: OpCostTable, batch: Optional[float] = None) -> np.ndarray:
    """Activation bytes every op keeps for backward at a microbatch of ``batch`` samples."""
    s = table.scale(table.batch_size if batch is None else batch)
    return table.saved_b * s + table.saved_f


def out_bytes(table: OpCostTable, batch: Optional[float] = None) -> np.ndarray:
    s = table.scale(table.batch_size if batch is None else batch)
    return table.out_b * s + table.out_f
