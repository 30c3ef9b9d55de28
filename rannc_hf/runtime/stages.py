"""Stage modules: one ``fx.GraphModule`` per pipeline stage, cut out of the captured graph.

    >>> from rannc_hf.capture import capture
    >>> from rannc_hf.zoo import make
    >>> from rannc_hf.runtime.stages import build_stages, run_sequential
    >>> model, batch = make("gpt2", batch_size=2)
    >>> g = capture(model, batch)
    >>> cuts = [i for i, ok in enumerate(g.valid_cuts) if ok][::60][1:3]
    >>> stages = build_stages(g, cuts)                  # 3 stages; parameters are the model's own
    >>> loss = run_sequential(stages, batch)           # same value as model(**batch).loss
    >>> abs(float(loss) - float(model(**batch).loss)) < 1e-5
    True

Stage ``s`` runs ops ``op_range[0]..op_range[1]`` of ``graph.ops``. Its inputs are the values that
cross its start cut (``graph.crossing``, a fixed order: graph inputs first, then op results in
definition order); its outputs are the values crossing its end cut, each made ``.contiguous()``
(gloo refuses stride-0 and transposed tensors). Model inputs that later stages need (labels,
masks) travel through the earlier stages. The last stage returns only the scalar loss.

``get_attr`` nodes keep their original FQN targets and the stage ``GraphModule`` is rooted on the
captured module (or on a structurally identical ``model``), so a stage reads and trains the user's
own parameter objects: ``.grad`` lands on the real parameters.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from ..capture.graph import Graph
from ..config import env_flag


@dataclass
class StageSpec:
    """What one stage computes and exchanges (names are fx value names of the captured graph)."""

    index: int
    op_range: tuple[int, int]          # inclusive
    inputs: list[str]                  # values received (stage 0: graph input placeholders)
    outputs: list[str]                 # values sent on ([graph.loss] for the last stage)
    params: list[str] = field(default_factory=list)   # get_attr targets read (params, buffers, constants)
    is_first: bool = False
    is_last: bool = False


def stage_bounds(graph: Graph, cuts: Sequence[int]) -> list[tuple[int, int]]:
    """``[(lo, hi), ...]`` inclusive op ranges of the stages that end at ``cuts``."""
    cuts = sorted(int(c) for c in cuts)
    n = len(graph.ops)
    for c in cuts:
        if not 0 <= c < n - 1:
            raise ValueError(f"cut {c} is outside 0..{n - 2}")
        if graph.valid_cuts and not graph.valid_cuts[c]:
            raise ValueError(f"cut after op {c} ({graph.ops[c].name}) is not a valid cut position "
                             f"(a tuple, aliased or later-written value crosses it)")
    if len(set(cuts)) != len(cuts):
        raise ValueError(f"cuts must be distinct, got {cuts}")
    b = [-1, *cuts, n - 1]
    return [(b[i] + 1, b[i + 1]) for i in range(len(b) - 1)]


def stage_specs(graph: Graph, cuts: Sequence[int]) -> list[StageSpec]:
    """The inputs/outputs/params of every stage for the given cut positions."""
    nodes = {n.name: n for n in graph.module.graph.nodes}
    bounds = stage_bounds(graph, cuts)
    specs = []
    for s, (lo, hi) in enumerate(bounds):
        inputs = [i.name for i in graph.inputs] if s == 0 else graph.crossing(lo - 1)
        outputs = [graph.loss] if s == len(bounds) - 1 else graph.crossing(hi)
        params: list[str] = []
        for op in graph.ops[lo:hi + 1]:
            for a in nodes[op.name].all_input_nodes:
                if a.op == "get_attr" and str(a.target) not in params:
                    params.append(str(a.target))
        specs.append(StageSpec(s, (lo, hi), inputs, outputs, params, is_first=s == 0, is_last=s == len(bounds) - 1))
    return specs


def output_specs(graph: Graph, cuts: Sequence[int]) -> tuple[list[StageSpec], list[str]]:
    """Stage specs for forward-only runs that also return the model's other outputs (logits, ...): each
    tensor output travels from the stage that computes it through the later ones, and the last stage returns
    ``(loss, *extras)``. Returns ``(specs, extras)``."""
    specs = stage_specs(graph, cuts)
    vals = {n.name: n.meta.get("val") for n in graph.module.graph.nodes}
    extras: list[str] = []
    for o in graph.outputs:
        if o != graph.loss and o not in extras and isinstance(vals.get(o), torch.Tensor):
            extras.append(o)
    for s, spec in enumerate(specs):
        if s > 0:
            spec.inputs = list(specs[s - 1].outputs)
        if spec.is_last:
            spec.outputs = [graph.loss] + extras
        else:
            spec.outputs = spec.outputs + [e for e in extras
                                           if graph.defined_at(e) <= spec.op_range[1] and e not in spec.outputs]
    return specs, extras


def _fetch(root: Any, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def build_graph_module(graph: Graph, spec: StageSpec, model: Optional[nn.Module] = None,
                       device: Optional[torch.device] = None) -> fx.GraphModule:
    """The ``fx.GraphModule`` of one stage (see the module docstring for its calling convention).

    ``model``: resolve parameters/buffers on this module instead of the captured one (it must have the
    same structure); lifted constants always come from the captured module.
    ``device``: move the tensors the stage reads there **in place** (``t.data = t.data.to(device)``, so the
    user's parameter objects move) and rewrite ``device=`` arguments baked into the graph at capture.
    """
    src = graph.module
    nodes = {n.name: n for n in src.graph.nodes}
    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    for name in spec.inputs:
        ph = g.placeholder(name)
        ph.meta = dict(nodes[name].meta)
        env[name] = ph
    root: dict[str, Any] = {}
    lo, hi = spec.op_range
    for op in graph.ops[lo:hi + 1]:
        node = nodes[op.name]
        for a in node.all_input_nodes:
            if a.name in env:
                continue
            if a.op == "get_attr":
                target = str(a.target)
                obj = None
                if model is not None:
                    try:
                        obj = _fetch(model, target)
                    except AttributeError:
                        obj = None
                root[target] = obj if obj is not None else _fetch(src, target)
                env[a.name] = g.get_attr(target)
                env[a.name].meta = dict(a.meta)
            else:
                raise RuntimeError(f"stage {spec.index}: op {op.name} reads {a.name} ({a.op}) which is neither "
                                   f"a stage input nor computed in the stage")
        env[node.name] = g.node_copy(node, lambda n: env[n.name])
        if device is not None:  # factories and .to() calls baked with the capture device, as kwarg or positional
            new = env[node.name]
            new.args = _retarget(new.args, device)
            new.kwargs = _retarget(new.kwargs, device)
    if device is not None:
        for obj in root.values():
            if isinstance(obj, torch.Tensor) and obj.device != device:
                obj.data = obj.data.to(device)
    if spec.is_last and len(spec.outputs) == 1:
        g.output(env[spec.outputs[0]])
    elif spec.is_last:      # forward-only stages (output_specs): (loss, *other model outputs)
        g.output(tuple(env[v] for v in spec.outputs))
    else:
        outs = tuple(g.call_method("contiguous", (env[v],)) for v in spec.outputs)
        g.output(outs)
    g.lint()
    return fx.GraphModule(root, g, class_name=f"Stage{spec.index}")


def _retarget(value: Any, device: torch.device) -> Any:
    """``value`` (a node's args or kwargs) with every ``torch.device`` other than ``device`` replaced by it."""
    if isinstance(value, torch.device):
        return device if value != device else value
    if isinstance(value, tuple):
        return tuple(_retarget(v, device) for v in value)
    if isinstance(value, list):
        return [_retarget(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _retarget(v, device) for k, v in value.items()}
    return value


def value_meta(graph: Graph, name: str) -> torch.Tensor:
    """The example value (a fake tensor at microbatch size) of a graph value."""
    for n in graph.module.graph.nodes:
        if n.name == name:
            return n.meta["val"]
    raise KeyError(name)


def _torch_version() -> tuple[int, int]:
    parts = torch.__version__.split("+")[0].split(".")
    return int(parts[0]), int(parts[1])


# torch < 2.13: PipelineStage marks every received buffer requires_grad, which fails for int/bool tensors
# (labels, masks). There such values travel as floats (exactly: bool/int8/int16 -> fp32, int32/int64 -> fp64)
# and the receiving stage casts them back.
ENCODE_INTS = _torch_version() < (2, 13)


def transport_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a value of ``dtype`` has on the wire between stages."""
    if not ENCODE_INTS or dtype.is_floating_point or dtype.is_complex:
        return dtype
    if dtype in (torch.bool, torch.uint8, torch.int8, torch.int16):
        return torch.float32
    return torch.float64


def meta_args(graph: Graph, names: Sequence[str], device: torch.device | str = "meta",
              transport: bool = True) -> tuple[torch.Tensor, ...]:
    """Empty tensors shaped like the given values; floating ones ``requires_grad=True`` (PipelineStage static args).

    ``transport``: use the on-the-wire dtype (:func:`transport_dtype`)."""
    vals = {n.name: n.meta.get("val") for n in graph.module.graph.nodes}
    out = []
    for name in names:
        v = vals[name]
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"value {name} crossing a stage boundary is not a tensor ({type(v).__name__})")
        dt = transport_dtype(v.dtype) if transport else v.dtype
        t = torch.empty(tuple(int(s) for s in v.shape), dtype=dt, device=device)
        if t.is_floating_point() or t.is_complex():
            t.requires_grad_(True)
        out.append(t)
    return tuple(out)


class _TieInputs(torch.autograd.Function):
    """Identity on ``out`` whose backward gives every tied input a zero gradient (torch < 2.13 needs a
    gradient for every received input it sends back, even those the stage does not differentiate)."""

    @staticmethod
    def forward(ctx, out, *inputs):
        ctx.metas = [(i.shape, i.dtype, i.device) for i in inputs]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *[torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.metas])


_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class _Segment:
    """A contiguous run of a stage graph's nodes as its own ``GraphModule`` (rooted on the stage's, so it
    reads the same parameter objects), with the names of the values it takes and gives."""

    def __init__(self, gm: fx.GraphModule, inputs: list[str], outputs: list[str],
                 open_blocks: tuple = ()):
        self.gm, self.inputs, self.outputs = gm, inputs, outputs
        #: ``(engine_id, block)`` of the offloaded blocks the segment starts inside of (entered by an
        #: ``offload_enter`` of an earlier segment, not yet exited): their weights must be made resident
        #: before the segment runs again in backward (see :meth:`StageModule._run_split`)
        self.open_blocks = open_blocks
        #: the segment calls an offload fence, or starts inside an offloaded block: checkpointed non-reentrant
        #: (see :func:`_checkpoint`)
        self.offloaded = bool(open_blocks) or _fence_kinds(self)[0]


def split_segments(gm: fx.GraphModule, starts: set[str]) -> tuple[list[_Segment], Any]:
    """``gm``'s compute nodes cut before every node named in ``starts``: the segments in order, and the
    graph's output argument (fx nodes, to be filled from the values the segments produced)."""
    from ..offload.fences import offload_enter, offload_exit

    nodes = list(gm.graph.nodes)
    seg_of: dict[str, int] = {}
    k = 0
    order: list[list[fx.Node]] = [[]]
    open_now: list[tuple] = []          # offload blocks entered and not yet exited, in graph order
    opens: list[tuple] = [()]
    for n in nodes:
        if n.op in ("placeholder", "get_attr", "output"):
            continue
        if n.name in starts and order[-1]:
            order.append([])
            opens.append(tuple(open_now))
            k += 1
        order[-1].append(n)
        seg_of[n.name] = k
        if n.op == "call_function" and n.target in (offload_enter, offload_exit):
            key = (n.args[0], n.args[1])
            if n.target is offload_enter and key not in open_now:
                open_now.append(key)
            elif n.target is offload_exit and key in open_now:
                open_now.remove(key)
    out_node = next(n for n in nodes if n.op == "output")
    segments = []
    for i, run in enumerate(order):
        g = fx.Graph()
        env: dict[str, fx.Node] = {}
        inputs: list[str] = []

        def arg(a: fx.Node) -> fx.Node:
            if a.name not in env:
                if a.op == "get_attr":          # parameters and constants are read in place, not passed
                    env[a.name] = g.get_attr(a.target)
                    env[a.name].meta = dict(a.meta)
                else:                           # a stage input or an earlier segment's value
                    inputs.append(a.name)
                    env[a.name] = g.placeholder(a.name)
                    env[a.name].meta = dict(a.meta)
            return env[a.name]

        for n in run:
            for a in n.all_input_nodes:
                if a.name not in env:
                    arg(a)
            env[n.name] = g.node_copy(n, lambda a: env[a.name])
        outputs = [n.name for n in run
                   if any(u.op == "output" or seg_of.get(u.name, -1) > i for u in n.users)]
        g.output(tuple(env[o] for o in outputs))
        segments.append(_Segment(fx.GraphModule(gm, g, class_name=f"Segment{i}"), inputs, outputs, opens[i]))
    return segments, out_node.args[0]


#: ``RANNC_HF_COMPILE_FENCED_SEGMENTS=1`` compiles checkpointed code holding offload fences anyway (to study
#: the drift that made them eager; see :meth:`StageModule.segments`)
_COMPILE_FENCED = bool(env_flag("RANNC_HF_COMPILE_FENCED_SEGMENTS"))


#: ``RANNC_HF_UNGUARDED_OPEN_BLOCKS=1`` restores the old behaviour (to compare): a checkpointed segment that
#: starts inside an offloaded block is recomputed without first waiting for that block's weights
_UNGUARDED_OPEN_BLOCKS = bool(env_flag("RANNC_HF_UNGUARDED_OPEN_BLOCKS"))


def _run_with_blocks(gm, open_blocks, *ins):
    """Run a checkpointed segment that starts inside offloaded blocks, those blocks' weights resident first.

    Its recompute in backward reads the tail of a block whose ``offload_enter`` sits in an earlier segment
    and whose ``before_backward`` only fires during this segment's own backward: without this the block was
    at best prefetched, and on CUDA the compute stream read its weights without waiting for their copy."""
    from ..offload.engine import get_engine

    for eid, b in open_blocks:
        get_engine(eid).ensure_resident(b)
    return gm(*ins)


def fence_starts(gm: fx.GraphModule) -> set[str]:
    """Cut points that give each offload fence (with the ``getitem`` nodes unpacking it) a segment of its own.

    ``torch.compile`` treats a fence as a graph break; dynamo then builds a resume function per break out
    of the whole stage's code, which took minutes for GPT-2 1.3B's 48 fences. Compiling the runs between
    fences one by one, with the fences called eagerly between them, has no graph break at all."""
    from ..offload.fences import offload_enter, offload_exit

    ops = [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    starts: set[str] = set()
    for i, n in enumerate(ops):
        if n.op == "call_function" and n.target in (offload_enter, offload_exit):
            starts.add(n.name)
            j = i + 1
            while j < len(ops) and ops[j].target is operator.getitem and ops[j].args[0] is n:
                j += 1
            if j < len(ops):
                starts.add(ops[j].name)
    return starts


def _fence_kinds(seg: "_Segment") -> tuple[bool, bool]:
    """(the segment calls an offload fence, it calls nothing else but ``getitem``)."""
    from ..offload.fences import offload_enter, offload_exit

    ops = [n for n in seg.gm.graph.nodes if n.op == "call_function"]
    fenced = any(n.target in (offload_enter, offload_exit) for n in ops)
    return fenced, fenced and all(n.target in (offload_enter, offload_exit, operator.getitem) for n in ops)


class StageModule(nn.Module):
    """One stage: runs its ``GraphModule`` under autocast (``precision``), with activation recompute when
    ``recompute == "full"``: the stage is run as consecutive segments (``segment_starts``: the op names where
    the plan's recompute segments begin, see :mod:`rannc_hf.planner.recompute`) and each segment is
    checkpointed, so a stage keeps every segment's inputs and, during backward, one segment's activations,
    which is what the planner's memory model prices. Without ``segment_starts`` the whole stage is one
    checkpoint.

    Boundary outputs keep the dtype they had at capture (autocast results are cast back), so the static
    ``PipelineStage`` metadata holds; the last stage's loss is returned as fp32.
    """

    def __init__(self, gm: fx.GraphModule, spec: StageSpec, out_dtypes: Sequence[torch.dtype] = (),
                 precision: str = "fp32", recompute: str = "none", device_type: str = "cpu",
                 in_dtypes: Sequence[torch.dtype] = (), segment_starts: Sequence[str] = ()):
        super().__init__()
        self.in_dtypes = list(in_dtypes)   # received values are cast to these (see transport_dtype)
        self.gm = gm
        self.spec = spec
        self.out_dtypes = list(out_dtypes)
        self.precision = precision
        self.recompute = recompute
        self.device_type = device_type
        self.segment_starts = set(segment_starts)
        object.__setattr__(self, "compiled", None)   # torch.compile(gm) when enabled (not a registered submodule)
        object.__setattr__(self, "_segments", None)  # (graph version, segments, output arg, input names)
        object.__setattr__(self, "_pieces", None)    # the same, cut around offload fences (compiled runs)
        object.__setattr__(self, "_fence_cache", None)  # (graph version, fence_starts)
        self._compile_args: Optional[tuple] = None

    def compile(self, backend: str = "inductor", **kwargs) -> None:  # noqa: A003 - nn.Module.compile, same idea
        """Run the stage graph through ``torch.compile`` (parameters stay the ``gm``'s own objects)."""
        object.__setattr__(self, "compiled", torch.compile(self.gm, backend=backend, **kwargs))
        self._compile_args = (backend, kwargs)

    def segments(self) -> list[_Segment]:
        """The checkpointed segments (rebuilt when the stage graph changed, e.g. offload fences were added).

        With compile on, a segment that holds an offload fence stays eager: compiled and checkpointed with
        the fences inside, GPT-2 1.3B's params-offload run drifted from the uncompiled one on the H200
        (per-step losses apart by up to 0.045 in 30 steps, and a recipe that trained far worse), while
        the eager segments matched training without offload to 1e-3."""
        return self._split("_segments", self.segment_starts, eager_if_fenced=not _COMPILE_FENCED)[1]

    def fence_pieces(self) -> list[_Segment]:
        """The stage cut around its offload fences (see :func:`fence_starts`); empty without fences."""
        starts = self._fences()
        return self._split("_pieces", starts)[1] if starts else []

    def _version(self) -> tuple:
        """Changes when the stage graph does (offload fences inserted)."""
        return (id(self.gm.graph), len(self.gm.graph.nodes))

    def _fences(self) -> set[str]:
        """:func:`fence_starts` of the current graph, computed once per graph version (forward asks each call)."""
        cached = self._fence_cache
        if cached is None or cached[0] != self._version():
            cached = (self._version(), fence_starts(self.gm))
            object.__setattr__(self, "_fence_cache", cached)
        return cached[1]

    def _split(self, attr: str, starts: set[str], eager_if_fenced: bool = False) -> tuple:
        """(graph version, segments, output arg, input names) cached in ``attr``; compiled segments when
        compile is on, except the fences' own (and, ``eager_if_fenced``, every segment holding a fence)."""
        version = self._version()
        cached = getattr(self, attr)
        if cached is None or cached[0] != version:
            segs, out_arg = split_segments(self.gm, starts)
            if self._compile_args is not None:
                backend, kwargs = self._compile_args
                for sg in segs:
                    fenced, only_fence = _fence_kinds(sg)
                    if not (only_fence or (fenced and eager_if_fenced)):
                        sg.gm = torch.compile(sg.gm, backend=backend, **kwargs)
            names = [n.name for n in self.gm.graph.nodes if n.op == "placeholder"]
            cached = (version, segs, out_arg, names)
            object.__setattr__(self, attr, cached)
        return cached

    def _reentrant_ok(self, offloaded: bool) -> bool:
        return not offloaded and self.compiled is None

    def _run_split(self, attr: str, starts: set[str], args, checkpointed: bool):
        _, segs, out_arg, names = self._split(attr, starts, eager_if_fenced=checkpointed and not _COMPILE_FENCED)
        env: dict[str, Any] = dict(zip(names, args))
        for sg in segs:
            ins = [env[n] for n in sg.inputs]
            fn = sg.gm
            if checkpointed and sg.open_blocks and not _UNGUARDED_OPEN_BLOCKS:
                fn = functools.partial(_run_with_blocks, sg.gm, sg.open_blocks)
            outs = _checkpoint(fn, ins, self._reentrant_ok(sg.offloaded)) if checkpointed else fn(*ins)
            env.update(zip(sg.outputs, outs))
        return fx.node.map_arg(out_arg, lambda n: env[n.name])

    def _autocast(self):
        dt = _AUTOCAST[self.precision]
        if dt is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=dt)

    def _run(self, *args, whole_checkpoint: bool = False):
        received = args
        if self.in_dtypes:
            args = tuple(a.to(d) if isinstance(a, torch.Tensor) and a.dtype != d else a
                         for a, d in zip(args, self.in_dtypes))
        fences = self._fences() if self.compiled is not None else set()
        with self._autocast():
            if self.recompute == "full" and self.segment_starts and torch.is_grad_enabled():
                out = self._run_split("_segments", self.segment_starts, args, checkpointed=True)
            elif fences and not whole_checkpoint:
                out = self._run_split("_pieces", fences, args, checkpointed=False)
            else:   # fences under a checkpoint run eager, as in segments()
                out = (self.gm if (fences and not _COMPILE_FENCED) or self.compiled is None else self.compiled)(*args)
        if self.spec.is_last and isinstance(out, (tuple, list)):   # (loss, *extras): extras in capture dtypes
            loss = out[0].float() if out[0].is_floating_point() else out[0]
            out = (loss, *(o.to(d) if o.dtype != d else o for o, d in zip(out[1:], self.out_dtypes)))
        elif self.spec.is_last:
            out = out.float() if out.dtype != torch.float32 and out.is_floating_point() else out
        elif self.out_dtypes:
            out = tuple(o.to(d) if o.dtype != d else o for o, d in zip(out, self.out_dtypes))
        if ENCODE_INTS and not self.spec.is_first and torch.is_grad_enabled():
            out = self._tie(out, received)
        return out

    @staticmethod
    def _tie(out, received):
        ins = [a for a in received if isinstance(a, torch.Tensor) and a.requires_grad]
        if not ins:
            return out
        if isinstance(out, torch.Tensor):
            return _TieInputs.apply(out, *ins) if out.requires_grad else out
        out = list(out)
        for k, o in enumerate(out):
            if o.requires_grad:
                out[k] = _TieInputs.apply(o, *ins)
                break
        return tuple(out)

    def forward(self, *args):
        if self.recompute == "full" and not self.segment_starts and torch.is_grad_enabled():
            return _checkpoint(functools.partial(self._run, whole_checkpoint=True), args,
                               self._reentrant_ok(bool(self._fences())))
        return self._run(*args)


def _checkpoint(fn, args, reentrant_ok: bool):
    """``fn(*args)`` under activation checkpointing, its RNG state replayed in the recomputation.

    Reentrant where it can be: its forward runs without autograd and its recomputation is one nested backward,
    while the non-reentrant form runs a Python pack and unpack hook for every saved tensor. On BERT-large's
    structure the recompute cost 2.5x the forward's host time non-reentrant, 1x reentrant (CPU, 24 narrow layers:
    86 and 55 ms a step, 36 without recompute); on the H200, BERT-large's eager recompute step is bound by that host
    time (164 ms, 146 with this and the loss gradient applied on the device). Reentrant needs
    an input that requires grad (else its parameters would get no gradient: a stage's first segment, fed token
    ids). ``reentrant_ok`` is False for segments with offloaded weights (they keep the non-reentrant form their
    weights' arrival was verified with on the H200) and compiled ones (a forward without autograd would be a
    second compilation)."""
    from torch.utils.checkpoint import checkpoint

    reentrant = reentrant_ok and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    return checkpoint(fn, *args, use_reentrant=reentrant, preserve_rng_state=True)


def build_stages(graph: Graph, cuts: Sequence[int], *, only: Optional[Sequence[int]] = None,
                 model: Optional[nn.Module] = None, precision: str = "fp32",
                 recompute: Sequence[str] | str = "none", device_type: str = "cpu",
                 device: Optional[torch.device] = None, with_outputs: bool = False,
                 recompute_starts: Optional[Sequence[Sequence[int]]] = None) -> list[StageModule]:
    """Stage modules for ``cuts`` (all stages, or the indices in ``only``, in that order).

    ``with_outputs``: forward-only stages built from :func:`output_specs` (the last returns ``(loss, *extras)``).
    ``recompute_starts``: per stage, the op indices that begin a checkpointed segment (the plan's
    ``StagePlan.recompute_starts``); ``None``: chosen here by the same rule."""
    specs = output_specs(graph, cuts)[0] if with_outputs else stage_specs(graph, cuts)
    vals = {n.name: n.meta.get("val") for n in graph.module.graph.nodes}
    idx = list(range(len(specs))) if only is None else list(only)
    rcs = {s: recompute if isinstance(recompute, str) else recompute[s] for s in idx}
    own = [s for s in idx if rcs[s] == "full"] if recompute_starts is None else []
    derived = dict(zip(own, recompute_segment_starts(graph, [specs[s] for s in own], precision))) if own else {}
    out = []
    for s in idx:
        spec = specs[s]
        rc = rcs[s]
        dtypes = [vals[v].dtype for v in spec.outputs[1:]] if spec.is_last else \
            [transport_dtype(vals[v].dtype) for v in spec.outputs]
        in_dtypes = [] if spec.is_first else [vals[v].dtype for v in spec.inputs]
        starts: Sequence[str] = ()
        if rc == "full":
            lo, hi = spec.op_range
            starts = derived[s] if recompute_starts is None else [graph.ops[i].name for i in recompute_starts[s]
                                                                   if lo < i <= hi]
        sm = StageModule(build_graph_module(graph, spec, model, device), spec, dtypes, precision, rc, device_type,
                         in_dtypes, segment_starts=starts)
        sm.graph_ref = graph
        out.append(sm)
    return out


def recompute_segment_starts(graph: Graph, specs: Sequence[StageSpec], precision: str = "fp32") -> list[list[str]]:
    """Per stage, the op names that begin a checkpointed segment when no plan says: the planner's rule
    (:func:`rannc_hf.planner.recompute.choose_boundaries`) applied to single ops, valid cuts only."""
    import math

    from ..planner.recompute import choose_boundaries
    from ..profile.analytic import op_cost_table, saved_bytes

    crossing = graph.crossing_bytes()
    saved = saved_bytes(op_cost_table(graph, precision))
    out = []
    for spec in specs:
        lo, hi = spec.op_range
        cross = [crossing[c] if graph.valid_cuts[c] else math.inf for c in range(lo, hi)]
        cut = choose_boundaries(cross, saved[lo:hi + 1]).boundaries if hi > lo else []
        out.append([graph.ops[lo + j + 1].name for j in cut])
    return out


def batch_inputs(graph: Graph, batch: Any) -> tuple[torch.Tensor, ...]:
    """The tensors of a batch (dict / tuple / tensor) in the order of ``graph.inputs`` (stage 0's args)."""
    from ..capture.export import normalize_batch

    args, kwargs = normalize_batch(batch)
    out = []
    for info in graph.inputs:
        if info.key.startswith("arg") and info.key[3:].isdigit() and info.key not in kwargs:
            out.append(args[int(info.key[3:])])
        else:
            out.append(kwargs[info.key])
    return tuple(out)


def run_sequential(stages: Sequence[StageModule], batch: Any, graph: Optional[Graph] = None) -> torch.Tensor:
    """Run all stages one after another in this process (for tests and debugging): returns the loss."""
    g = graph if graph is not None else stages[0].graph_ref
    out: Any = batch_inputs(g, batch)
    for st in stages:
        out = st(*out)
    return out
