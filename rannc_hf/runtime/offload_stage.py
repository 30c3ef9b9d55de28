"""Offload inside pipeline stages: one :class:`~rannc_hf.offload.OffloadEngine` per rank, fences in the stage graphs.

:class:`RanncModule` calls :func:`attach` once its stages exist; everything offload-specific the
runtime does goes through the :class:`StageOffload` it returns::

    # RanncConfig(offload="all") (every stage), or a plan whose StagePlan.offload differs per stage
    model = rannc_hf.RanncModule(model, optimizer, config=rannc_hf.RanncConfig(num_stages=2, offload="all"))
    loss = model(**batch).loss; loss.backward()
    model.clip_grad_norm_(1.0)        # global norm: host gradients of offloaded stages + .grad of the others
    optimizer.step()                  # on an offloaded rank: the engine's (CPU or streamed) step
    optimizer.zero_grad()
    model.state_dict(); model.optimizer_state_dict()   # fp32 masters / host optimizer state, gathered

What it does, per rank whose stage's offload mode (``config.offload`` unless ``auto``; else the plan's
per-stage choice; on CPU devices ``auto`` means none unless the plan was given or loaded from a file) is
``optimizer``, ``params`` or ``all``:

* **Blocks.** The stage's parameters are grouped by the repeated layers of the model
  (:func:`rannc_hf.offload.find_blocks`: GPT-2 ``transformer.h.N``, BERT ``bert.encoder.layer.N``, the
  CNN's ``blocks.N``): a block is a maximal run of consecutive ops of the stage graph owned by one such
  layer. A parameter read only inside one run belongs to that block; every other local parameter
  (embeddings, heads, tied weights, a layer split by a stage cut on both sides) is the resident "rest".
* **Fences.** ``offload_enter(engine_id, b, *activations entering the run)`` goes in the stage fx graph
  before the run, ``offload_exit(engine_id, b, *activations leaving it)`` after it; the run's users are
  rerouted through them (data dependencies, so the order survives graph passes). Every variant (new
  input shapes, eval) gets the same fences.
* **Gradients.** The engine takes each parameter's gradient to its fp32 host buffer as it is produced
  (summed over microbatches). After the pipeline pass, :meth:`StageOffload.collect` lends those buffers to
  the runtime's usual post-processing (divide by microbatches, fp16 overflow check, tied-weight sums, dp
  average), :meth:`StageOffload.store` takes them back; ``loss.backward()`` then applies ``grad_output``
  and adds gradients accumulated by earlier calls (:meth:`StageOffload.accumulate`).
* **Optimizer.** The user's optimizer object (already restricted to this rank's parameters) is rebuilt by
  the engine per block over the host masters; its ``step``/``zero_grad``/``state_dict``/``load_state_dict``
  are patched to go through the engine, hyperparameters (LR schedulers) are re-read at every step.
* **Host memory.** Before anything is allocated, every rank's host need is summed per node
  (``LOCAL_WORLD_SIZE`` consecutive ranks) and checked against the available RAM; a plan that does not
  fit raises :class:`~rannc_hf.errors.OffloadError` on every rank, with the numbers and what to change.
"""

from __future__ import annotations

import logging
import operator
import os
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn

from ..config import env_flag, env_int
from ..errors import OffloadError
from ..offload import OffloadEngine, find_blocks, offload_enter, offload_exit
from ..offload.cost import (choose_gpu_step_blocks, choose_gpu_step_rest, choose_stream_step_blocks,
                             gpu_step_rest_bytes, use_device_accumulation)
from ..offload.engine import device_grads_default, local_world_size
from ..offload.hooks import masters_into_state_dict, reject_closure
from ..offload.optimizer import state_bytes_per_param
from ..offload.store import check_host_memory, host_need
from .grads import grad_norm_sq

log = logging.getLogger(__name__)

MODES = ("optimizer", "params", "all")
_RANK = {"none": 0, "optimizer": 1, "params": 2, "all": 3}


# ---------------------------------------------------------------------------------------- decisions
def stage_modes(module, var) -> list[str]:
    """The offload mode of every stage of the pipeline (same answer on every rank)."""
    cfg, lay = module.config, module.layout
    n = lay.num_stages
    if cfg.offload in MODES:
        return [cfg.offload] * n
    if cfg.offload == "none":
        return ["none"] * n
    plan = lay.plan
    if plan is None or len(plan.stages) != n:
        return ["none"] * n
    explicit = module._given_plan is not None or getattr(module, "_plan_from_file", False)
    if module.device.type != "cuda" and not explicit:
        return ["none"] * n            # auto on CPU devices: nothing to gain
    return [s.offload if s.offload in MODES else "none" for s in plan.stages]


def _compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    # bf16 on CUDA: working copies in bf16 halve the host->device traffic (fp32 masters stay on the host).
    # On CPU there is no traffic to save, and CPU autocast does not cast a norm's bf16 weight up to the
    # fp32 input a captured graph can hand it (CUDA autocast does). fp16 keeps fp32 working copies (the
    # loss scaler and autocast handle the fp16 compute).
    return torch.bfloat16 if precision == "bf16" and device.type == "cuda" else torch.float32


# ---------------------------------------------------------------------------------------- blocks
def _key_of(module_path: str, prefixes: list[str]) -> Optional[str]:
    for p in prefixes:
        if module_path == p or module_path.startswith(p + "."):
            return p
    return None


def _is_float(node: fx.Node) -> bool:
    v = node.meta.get("val")
    return isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())


def stage_runs(stage, graph, prefixes: list[str], trainable: set[int]) -> list[tuple[list[fx.Node], list[nn.Parameter]]]:
    """``[(op nodes of the run, its block parameters)]`` for one stage module, in op order (empty runs dropped)."""
    gm = stage.gm
    runs: list[list[fx.Node]] = []
    key_prev = None
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        try:
            op = graph.op(node.name)
        except KeyError:        # the boundary .contiguous() calls and anything we added
            key_prev = None
            continue
        key = _key_of(op.module, prefixes)
        if key is None:
            key_prev = None
            continue
        if key != key_prev:
            runs.append([])
        runs[-1].append(node)
        key_prev = key
    run_of = {n: r for r, nodes in enumerate(runs) for n in nodes}
    # parameter -> the runs that read it (every get_attr alias counted)
    where: dict[int, set] = {}
    objs: dict[int, nn.Parameter] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        try:
            obj = gm.get_parameter(str(node.target))
        except AttributeError:
            continue
        if id(obj) not in trainable:
            continue
        objs[id(obj)] = obj
        s = where.setdefault(id(obj), set())
        for u in node.users:
            s.add(run_of.get(u, -1))
    per_run: list[list[nn.Parameter]] = [[] for _ in runs]
    for pid, rs in where.items():
        if len(rs) == 1 and -1 not in rs:
            per_run[next(iter(rs))].append(objs[pid])
    return [(nodes, ps) for nodes, ps in zip(runs, per_run) if ps]


def insert_fences(gm: fx.GraphModule, runs: list[list[fx.Node]], engine_id: int, first_block: int) -> None:
    """Put ``offload_enter``/``offload_exit`` around every run (block ``first_block + k``) and reroute uses."""
    g = gm.graph
    for k, nodes in enumerate(runs):
        b = first_block + k
        inside = set(nodes)
        entering: list[fx.Node] = []
        for n in nodes:
            for a in n.all_input_nodes:
                if a not in inside and a.op != "get_attr" and a not in entering and _is_float(a):
                    entering.append(a)
        leaving = [n for n in nodes if _is_float(n) and any(u not in inside for u in n.users)]
        with g.inserting_before(nodes[0]):
            enter = g.call_function(offload_enter, (engine_id, b, *entering))
            outs = _unpack(g, enter, entering)
        for n in nodes:
            for a, o in zip(entering, outs):
                n.replace_input_with(a, o)
        with g.inserting_after(nodes[-1]):
            ex = g.call_function(offload_exit, (engine_id, b, *leaving))
        with g.inserting_after(ex):
            outs = _unpack(g, ex, leaving)
        made = {ex, *outs}
        for v, o in zip(leaving, outs):
            for u in list(v.users):
                if u not in inside and u not in made:
                    u.replace_input_with(v, o)
    g.lint()
    gm.recompile()


def _unpack(g: fx.Graph, call: fx.Node, vals: list[fx.Node]) -> list[fx.Node]:
    if len(vals) == 1:
        call.meta["val"] = vals[0].meta.get("val")
        return [call]
    outs = []
    for i, v in enumerate(vals):
        o = g.call_function(operator.getitem, (call, i))
        o.meta["val"] = v.meta.get("val")
        outs.append(o)
    return outs


# ---------------------------------------------------------------------------------------- host memory
def host_bytes(num_params: int, mode: str, compute_dtype: torch.dtype, cuda: bool, optimizer,
               on_device: int = 0, kept: int = 0) -> dict:
    """Host bytes an engine of ``num_params`` parameters needs, by kind (as ``OffloadEngine.host_bytes_needed``):
    ``mode`` is the engine's; ``on_device`` parameters step on the GPU (their optimizer state is there), ``kept``
    of them keep their gradients there too (no host gradient or staging buffer)."""
    state = state_bytes_per_param(optimizer) if optimizer is not None and mode in ("optimizer", "all") else 0.0
    return host_need(num_params, compute_dtype, cuda, state, on_device, kept)


def check_node_memory(need: dict, mode: str, device: torch.device) -> None:
    """Sum every rank's host need over its node and refuse (on every rank) a plan that does not fit."""
    mine = float(sum(need.values()))
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world)) or world
    nodes = max(1, -(-world // local))
    dev = device if device.type == "cuda" else torch.device("cpu")
    per_node = torch.zeros(nodes, dtype=torch.float64, device=dev)
    per_node[rank // local] = mine
    if world > 1:
        dist.all_reduce(per_node)
    total = int(per_node[rank // local].item())
    err = None
    try:
        if total > 0:
            breakdown = dict(need)
            if total != int(mine):
                breakdown = {"this rank": int(mine), f"other ranks of this node ({local} ranks)": total - int(mine)}
            check_host_memory(total, breakdown, mode)
    except OffloadError as e:
        err = e
    flag = torch.tensor([1.0 if err else 0.0], device=dev)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if err is not None:
        raise err
    if flag.item() > 0:
        raise OffloadError("offload refused: the host memory of another node is too small for this plan "
                           "(see the error on that node's ranks)")


# ---------------------------------------------------------------------------------------- the runtime side
class StageOffload:
    """This rank's engine plus what the runtime needs from it (see the module docstring)."""

    def __init__(self, module, engine: OffloadEngine, mode: str, modes: list[str]):
        self.owner = module
        self.engine = engine
        self.mode = mode
        self.modes = modes
        self._base: Optional[dict[int, torch.Tensor]] = None   # gradients applied by earlier backward() calls
        self._pending = None                                    # payload of the call whose backward is due
        self._lent: list = []
        self._on_host = False                                   # this call's gradients stay in host buffers
        self._prefixes: list[str] = []
        self._patched: list[tuple[Any, str]] = []

    # -- graphs ------------------------------------------------------------------------------
    def fence(self, var) -> None:
        """Fences in every stage module of ``var`` (a new variant: same parameters, new graphs)."""
        trainable = {id(p) for p in var.params}
        first = 0
        for stage in var.pipe.modules:
            runs = stage_runs(stage, var.graph, self._prefixes, trainable)
            got = [ps for _, ps in runs]
            exp = self._blocks_per_stage.get(stage.spec.index)
            if exp is not None and [[id(p) for p in ps] for ps in got] != exp:
                raise OffloadError(f"stage {stage.spec.index}: this input shape/mode groups the parameters into "
                                   f"other offload blocks than the first one; pad inputs to the first shapes")
            insert_fences(stage.gm, [nodes for nodes, _ in runs], self.engine.id, first)
            first += len(runs)

    # -- gradients -----------------------------------------------------------------------------
    def owns(self, p) -> bool:
        return self.engine.owns(p)

    def keeps_grads_on_host(self, var) -> bool:
        """True when a call's gradients can stay where the engine folds them (host buffers, no device round
        trip, no wait on the background step): nothing on the device needs them all (no fp16 loss scaler, no
        data-parallel all-reduce in this call). The runtime then applies the microbatch mean's 1/m as the loss
        scale instead of dividing the gradients afterwards. Parameters tied across stages make only their own
        round trip (:meth:`allreduce_tied_`)."""
        o = self.owner
        if o.scaler.enabled:
            return False
        return not (o._sync and o.mesh is not None and o.mesh.dp_size > 1)

    def before_run(self, on_host: bool = False, num_microbatches: int = 1, tied: bool = False) -> None:
        """Before a pipeline pass with backward: the engine's buffers must hold only this call's gradients.

        ``on_host``: this call keeps its gradients on the host (see :meth:`keeps_grads_on_host`); ``tied``: some
        of this rank's parameters are tied across pipeline ranks (their gradients are all-reduced after the pass)."""
        eng = self.engine
        mesh = self.owner.mesh
        # the step may run inside backward only when nothing touches these gradients before it: no earlier
        # call's gradients to add, no replicas to average with, no device round trip, no tied all-reduce
        early = (eng.step_in_backward and on_host and not tied and not eng.may_have_grads()
                 and (mesh is None or mesh.dp_size == 1))
        eng.begin_pass(num_microbatches, step_in_backward=early)
        if self._pending is not None:       # the last call's backward never came: forget its gradients
            self._restore_base()
        self._pending = None
        self._on_host = on_host
        if not eng.may_have_grads():        # nothing earlier to keep apart (checked without waiting)
            self._base = None
            return
        params = [p for p in self.owner.local_parameters() if eng.owns(p)]
        base = {}
        for p in params:
            gr = eng.grad_of(p)
            if gr is not None:
                base[id(p)] = gr.clone()
        self._base = base or None
        eng.zero_grad()

    def after_run(self) -> None:
        """After the pipeline pass: gradient sums still on the device go to the host."""
        self.engine.end_pass()

    def allreduce_tied_(self, var, idx: list, group, new: list) -> None:
        """Sum one group of parameters tied across pipeline ranks (``var.params[i]`` for ``i`` in ``idx``: GPT-2's
        embedding and head) over ``group``, when the call keeps its gradients on the host: only these gradients
        go to the device and back into the engine's buffers (before, every gradient of the rank made the round
        trip: GPT-2 2.7B over two H200s, 5.6 GB each way per step). Gradients of parameters the engine does not
        own are in ``new`` and are summed there."""
        from .grads import allreduce_sum_

        eng, dev = self.engine, self.owner.device
        params = [var.params[i] for i in idx]
        work = []
        for i, p in zip(idx, params):
            if eng.owns(p):
                g = eng.grad_of(p)
                work.append(None if g is None else g.to(dev, copy=True))
            else:
                work.append(new[i])
        allreduce_sum_(params, work, group)
        for i, p, w in zip(idx, params, work):
            if eng.owns(p):   # copied straight into the engine's pinned host buffer: a pageable ``w.to("cpu")``
                eng.set_grad_(p, w)   # of GPT-2 2.7B's tied embedding took 0.46 s of a 2.3 s step (two H200s)
            else:
                new[i] = w

    def _restore_base(self) -> None:
        eng = self.engine
        if self._base is None:
            eng.zero_grad()
            return
        for p in self.owner.local_parameters():
            if eng.owns(p):
                eng.set_grad_(p, self._base.get(id(p)))

    def collect(self, var, new: list) -> list:
        """``new`` with this call's host gradients of engine parameters filled in (device copies on CUDA)."""
        eng = self.engine
        self._lent = [None] * len(new)
        for i, p in enumerate(var.params):
            if eng.owns(p):
                gr = eng.grad_of(p)
                if gr is not None and self.owner.device.type == "cuda":
                    gr = gr.to(self.owner.device, non_blocking=True)
                self._lent[i] = gr
                new[i] = gr
        return new

    def store(self, var, new: list, payload):
        """Take the processed gradients of engine parameters back (``new`` loses them, in place); returns ``payload``."""
        eng = self.engine
        if self._on_host:                   # the gradients never left the engine's buffers
            self._lent = []
            self._pending = payload
            return payload
        for i, p in enumerate(var.params):
            if not eng.owns(p):
                continue
            gr = new[i]
            if gr is None:
                eng.set_grad_(p, None)
            elif gr is not self._lent[i] or gr.device.type != "cpu":
                eng.set_grad_(p, gr.detach().to("cpu"))
            new[i] = None
        self._lent = []
        self._pending = payload
        return payload

    def accumulate(self, payload, grad_output: torch.Tensor, dp_sync: bool) -> None:
        """``loss.backward()`` of the call that made ``payload``: apply ``grad_output``, add earlier gradients."""
        if payload is not self._pending:
            raise RuntimeError("with offload, call backward() on a step's loss before the next forward with "
                               "gradients (the gradients of an earlier call were dropped when the next one started)")
        eng = self.engine
        go = grad_output.detach()
        one = bool(go.numel() == 1 and float(go) == 1.0)
        if not one and eng.stepped_in_backward():
            raise OffloadError(
                "step_in_backward: loss.backward() with a gradient other than 1 (a scaled loss, e.g. loss / "
                "accumulation steps), but the offloaded blocks already stepped inside this call's backward with the "
                "loss as returned; call backward() on the loss unchanged (accumulate with num_microbatches), or set "
                "step_in_backward=False")
        base = self._base or {}
        params = [p for p in self.owner.local_parameters() if eng.owns(p)] if (base or not one) else []
        for p in params:                    # none when this call's gradients are already final (no wait)
            gr = eng.grad_of(p)
            if gr is not None and not one:
                gr.mul_(go.to("cpu", gr.dtype))
            b = base.get(id(p))
            if b is not None:
                if gr is None:
                    eng.set_grad_(p, b)
                else:
                    gr.add_(b)
        self._base = None
        self._pending = None
        mesh = self.owner.mesh
        if dp_sync and mesh is not None and mesh.dp_size > 1:
            self.allreduce_dp()

    def allreduce_dp(self) -> None:
        """Average every engine gradient over the data-parallel replicas (after ``no_sync`` accumulation)."""
        from .grads import allreduce_sum_

        eng, mesh = self.engine, self.owner.mesh
        params = [p for p in self.owner.local_parameters() if eng.owns(p)]
        grads = [eng.grad_of(p) for p in params]
        cuda = self.owner.device.type == "cuda"
        work = [g.to(self.owner.device) if (cuda and g is not None) else g for g in grads]
        allreduce_sum_(params, work, mesh.dp_group, divide_by=float(mesh.dp_size))
        for p, g in zip(params, work):
            eng.set_grad_(p, None if g is None else g.to("cpu"))

    def reset(self) -> None:
        self._base = None
        self._pending = None
        self.engine.zero_grad()

    # -- clipping ------------------------------------------------------------------------------
    def grad_norm_part(self, var, owned: Callable[[str], bool], norm_type: float) -> torch.Tensor:
        """This rank's share of the global gradient norm over engine parameters (sum of |g|^p, or max for
        inf): from the engine's per-block norms when this rank owns all of them, else over each gradient."""
        eng = self.engine
        engine_names = [n for p, n in zip(var.params, var.names) if eng.owns(p)]
        if float(norm_type) == 2.0 and all(owned(n) for n in engine_names):
            return eng.grad_norm_from_blocks().pow(2)
        return grad_norm_sq([eng.grad_of(p) for p, n in zip(var.params, var.names) if eng.owns(p) and owned(n)],
                            norm_type)

    def scale_grads_(self, coef: torch.Tensor) -> None:
        """Clip: the engine applies ``coef`` inside its next step (or at once without the async pipeline)."""
        self.engine.defer_scale_(coef)

    # -- checkpoints ---------------------------------------------------------------------------
    def value_of(self, t: torch.Tensor) -> torch.Tensor:
        """The authoritative value of a local tensor (fp32 host master for engine parameters)."""
        return self.engine.master_of(t) if self.engine.owns(t) else t.data

    def load_value_(self, t: torch.Tensor, value: torch.Tensor) -> bool:
        """Load ``value`` into an engine parameter (True), or leave it to the caller (False)."""
        if not self.engine.owns(t):
            return False
        self.engine.load_param_(t, value)
        return True

    def optimizer_state(self, opt) -> dict:
        """``{param: state}`` for this rank's optimizer (the engine's host state, the user's optimizer's format)."""
        sd = self.engine.optimizer_state_dict()
        flat = [p for g in opt.param_groups for p in g["params"]]
        return {flat[int(k)]: st for k, st in sd["state"].items()}

    def load_optimizer_state(self, opt, by_param: dict) -> None:
        flat = [p for g in opt.param_groups for p in g["params"]]
        index = {id(p): k for k, p in enumerate(flat)}
        groups, k = [], 0
        for g in opt.param_groups:
            groups.append({**{key: v for key, v in g.items() if key != "params"},
                           "params": list(range(k, k + len(g["params"])))})
            k += len(g["params"])
        state = {index[id(p)]: st for p, st in by_param.items() if id(p) in index}
        self.engine.load_optimizer_state_dict({"state": state, "param_groups": groups})

    # -- optimizer -----------------------------------------------------------------------------
    def patch_optimizer(self, opt) -> None:
        """The user's optimizer steps through the engine (every local parameter is the engine's)."""
        owner, eng = self.owner, self.engine
        this = self

        def step(*args, **kwargs):
            reject_closure(args, kwargs)
            if owner.scaler.enabled and owner.scaler.consume_skip():
                return None
            if this._pending is not None:       # forward without backward: its gradients do not count
                this._restore_base()
                this._pending = None
                this._base = None
            eng.step()
            return None

        step._wrapped_by_lr_sched = True       # an LR scheduler created earlier keeps working silently

        def zero_grad(set_to_none: bool = True):
            this.reset()

        def state_dict():
            return eng.optimizer_state_dict()

        def load_state_dict(sd):
            eng.load_optimizer_state_dict(sd)

        for name, fn in (("step", step), ("zero_grad", zero_grad), ("state_dict", state_dict),
                         ("load_state_dict", load_state_dict)):
            opt.__dict__[name] = fn
            self._patched.append((opt, name))

    def stats(self) -> dict:
        st = self.engine.stats()
        st["stage_modes"] = list(self.modes)
        return st


def engine_mode_for(mode: str, cuda: bool, num_blocks: int, gpu_step_blocks: int) -> tuple[str, int]:
    """The engine mode and GPU-stepped block count that run a plan's offload ``mode``.

    On CUDA, ``params`` (weights offloaded, optimizer state on the GPU) runs as ``all`` with every block stepped
    on the device: the same placement of the blocks' state, through the engine's background pipeline (folds
    during backward, block steps overlapping the next forward) instead of its synchronous path.

        >>> engine_mode_for("params", True, 24, 0), engine_mode_for("params", False, 24, 0)
        (('all', 24), ('params', 0))
    """
    if cuda and mode == "params":
        return "all", num_blocks
    return mode, gpu_step_blocks


def _gpu_headroom(module) -> Optional[float]:
    """GPU bytes the plan leaves free on this rank: the cap (after ``mem_margin``) less the local stages'
    predicted peak, not counting the fp32 gradient sums the plan placed there (``memory["grad_sum"]``: the
    runtime decides them by the planner's rule, from this headroom). None without a CUDA device or a plan with
    memory figures."""
    plan = module.plan
    local = [m.spec.index for m in module._primary.pipe.modules]
    if module.device.type != "cuda" or plan is None or not all(
            i < len(plan.stages) and plan.stages[i].memory for i in local):
        return None
    cap = module.config.gpu_memory_bytes or torch.cuda.get_device_properties(module.device).total_memory
    return cap * (1.0 - module.config.mem_margin) - sum(plan.stages[i].peak_bytes - plan.stages[i].memory.get(
        "grad_sum", 0) for i in local)


def _device_accumulate(module, num_params: int, headroom: Optional[float]) -> bool:
    """Sum micro-batch gradients on the GPU (:func:`~rannc_hf.offload.cost.use_device_accumulation`, the
    planner's rule); ``RANNC_HF_OFFLOAD_DEVICE_ACCUMULATE=0/1`` overrides it (benchmarks)."""
    forced = env_flag("RANNC_HF_OFFLOAD_DEVICE_ACCUMULATE")
    if forced is not None:
        return forced
    return (module.device.type == "cuda" and headroom is not None
            and use_device_accumulation(module.layout.num_microbatches, num_params, headroom))


def _gpu_step_blocks(module, blocks: list, mode: str, headroom: Optional[float], device_grads: bool = False) -> int:
    """``config.gpu_step_blocks``, resolving ``auto`` from ``headroom`` (see :func:`_gpu_headroom`, less the
    device gradient sums if any; ``device_grads``: each such block also keeps its gradients on the GPU).
    0 without a CUDA device, a CPU step mode, or a plan with memory figures."""
    want = module.config.gpu_step_blocks
    if module.device.type != "cuda" or mode not in ("optimizer", "all"):
        return 0
    if want != "auto":
        return min(int(want), len(blocks))
    if headroom is None:
        return 0
    state = 8.0 + (4.0 if device_grads else 0.0)   # AdamW state (+ the gradients kept on the GPU)
    return choose_gpu_step_blocks([sum(p.numel() for p in ps) for ps in blocks], headroom, state)


def _gpu_step_rest(module, rest: list, mode: str, headroom: Optional[float]) -> bool:
    """Whether the rest group (embeddings, heads) steps on the GPU: as the plan chose for a local stage (the planner
    prices both places with ``gpu_step_blocks: auto``), if its master, gradients and optimizer state fit in
    ``headroom`` (:func:`~rannc_hf.offload.cost.choose_gpu_step_rest`); ``RANNC_HF_OFFLOAD_GPU_STEP_REST=0/1``
    overrides it. False without a CUDA device or a CPU step."""
    if module.device.type != "cuda" or mode not in ("optimizer", "all") or not rest:
        return False
    forced = env_flag("RANNC_HF_OFFLOAD_GPU_STEP_REST")
    if forced is not None:
        return forced
    plan = module.plan
    if module.config.gpu_step_blocks != "auto" or headroom is None or plan is None:
        return False
    local = [m.spec.index for m in module._primary.pipe.modules]
    chosen = any(plan.stages[i].gpu_step_rest for i in local if i < len(plan.stages))
    return chosen and choose_gpu_step_rest(sum(p.numel() for p in rest), headroom, _state_bytes(module.optimizer))


def _state_bytes(opt) -> float:
    return state_bytes_per_param(opt) if opt is not None else 8.0


def _stream_step_blocks(module, blocks: list, mode: str, k: int, device_grads: bool) -> int:
    """``config.stream_step_blocks`` (``$RANNC_HF_OFFLOAD_STREAM_STEP`` overrides it), ``auto`` resolved by
    :func:`~rannc_hf.offload.cost.choose_stream_step_blocks` from the local device profile's rates over the
    blocks the CPU would step (all but the ``k`` GPU-stepped ones). 0 without a CUDA device or a CPU step."""
    if module.device.type != "cuda" or mode not in ("optimizer", "all"):
        return 0
    forced = env_int("RANNC_HF_OFFLOAD_STREAM_STEP")
    want = forced if forced is not None else module.config.stream_step_blocks
    cpu_side = [sum(p.numel() for p in ps) for ps in blocks[k:]]
    if want != "auto":
        return min(int(want), len(cpu_side))
    from ..profile.devices import get_profile

    prof = get_profile("auto")
    state = _state_bytes(module.optimizer)
    itemsize = torch.empty(0, dtype=_compute_dtype(module.config.precision, module.device)).element_size()
    return choose_stream_step_blocks(cpu_side, sum(p.numel() for ps in blocks[:k] for p in ps),
                                     device_grads=device_grads, compute_itemsize=itemsize,
                                     state_bytes_per_param=state, link_bps=prof.h2d_bw, duplex_bps=prof.duplex_bw,
                                     cpu_adam_params_per_s=prof.cpu_adam_params_per_s / local_world_size())


def _masters_hook(so: StageOffload, model: nn.Module):
    """A state-dict hook for the user's model: offloaded parameters read as their fp32 host masters.

    Their device working copies are released between uses (``params``/``all``), so reading ``param``
    itself would touch freed storage; ``state_dict(keep_vars=True)`` (the runtime's own use) is left alone."""
    named = list(model.named_parameters(remove_duplicate=False))

    def hook(mod, state_dict, prefix, local_metadata):
        masters_into_state_dict(so.engine, named, state_dict, prefix)

    return hook


def attach(module) -> Optional[StageOffload]:
    """Build this rank's engine and fences if any local stage offloads (collective when any stage does)."""
    var = module._primary
    modes = stage_modes(module, var)
    if plan := module.plan:
        for s, m in zip(plan.stages, modes):
            s.offload = m
    if all(m == "none" for m in modes):
        return None
    local_modes = [modes[m.spec.index] for m in var.pipe.modules]
    offloaded = [m for m in local_modes if m != "none"]
    mode = max(offloaded, key=lambda m: _RANK[m]) if offloaded else "none"
    if offloaded and len(set(offloaded)) + (len(offloaded) < len(local_modes)) > 1:
        log.warning("rannc_hf: the stages of this rank ask for offload modes %s; one engine per rank runs them "
                    "all as %r", local_modes, mode)
    dtype = _compute_dtype(module.config.precision, module.device)
    cuda = module.device.type == "cuda"
    params = list(var.params)
    if mode == "none":   # the node check is collective: every rank takes part
        check_node_memory({k_: 0 for k_ in host_bytes(0, mode, dtype, cuda, None)}, mode, module.device)
        return None
    names = {id(m): n for n, m in module.module.named_modules()}
    prefixes = [names[id(b)] for b in find_blocks(module.module) if id(b) in names]
    trainable = {id(p) for p in params}
    blocks: list[list[nn.Parameter]] = []
    per_stage: dict[int, list] = {}
    stage_runs_: list = []
    for stage in var.pipe.modules:
        runs = stage_runs(stage, var.graph, prefixes, trainable)
        per_stage[stage.spec.index] = [[id(p) for p in ps] for _, ps in runs]
        stage_runs_.append((stage, runs))
        blocks.extend(ps for _, ps in runs)
    in_blocks = {id(p) for ps in blocks for p in ps}
    rest = [p for p in params if id(p) not in in_blocks]
    opt = module.optimizer
    headroom = _gpu_headroom(module)
    n_params = sum(p.numel() for p in params)
    dev_acc = _device_accumulate(module, n_params, headroom)
    if dev_acc and headroom is not None:
        headroom -= 4.0 * n_params
    dev_grads = device_grads_default()
    n_rest = sum(p.numel() for p in rest)
    rest_gpu = _gpu_step_rest(module, rest, engine_mode_for(mode, cuda, len(blocks), 0)[0], headroom)
    if rest_gpu and headroom is not None:
        headroom -= gpu_step_rest_bytes(n_rest, _state_bytes(opt))
    engine_mode, k = engine_mode_for(mode, cuda, len(blocks),
                                     _gpu_step_blocks(module, blocks, mode, headroom, dev_grads))
    on_device = sum(p.numel() for ps in blocks[:k] for p in ps) if cuda else 0   # GPU-stepped (async on CUDA only)
    kept = (on_device if dev_grads else 0) + (n_rest if rest_gpu else 0)
    check_node_memory(host_bytes(n_params, engine_mode, dtype, cuda, opt, on_device + (n_rest if rest_gpu else 0),
                                 kept), mode, module.device)
    streamed = _stream_step_blocks(module, blocks, engine_mode, k, dev_grads)
    engine = OffloadEngine(blocks, device=module.device, mode=engine_mode, compute_dtype=dtype,
                           prefetch_blocks=module.config.prefetch_blocks, optimizer=opt, rest=rest,
                           check_memory=False, param_order=params, device_step_blocks=k,
                           device_accumulate=dev_acc, device_grads=dev_grads, stream_step_blocks=streamed,
                           step_in_backward=module.config.step_in_backward, gpu_step_rest=rest_gpu)
    so = StageOffload(module, engine, mode, modes)
    so._prefixes = prefixes
    so._blocks_per_stage = per_stage
    first = 0
    for stage, runs in stage_runs_:
        insert_fences(stage.gm, [nodes for nodes, _ in runs], engine.id, first)
        first += len(runs)
    if opt is not None:
        so.patch_optimizer(opt)
    module.module._register_state_dict_hook(_masters_hook(so, module.module))
    log.info("rannc_hf: offload %s (engine mode %s) on pipeline rank %d: %d blocks (%d stepped on the GPU, %d on "
             "the GPU with their state streamed), %d resident parameters stepped on the %s, micro-batch gradients "
             "summed on the %s", mode, engine_mode, module.pp_rank, len(blocks), engine.device_step_blocks,
             engine.stream_step_blocks, len(rest), "GPU" if engine.gpu_step_rest else "host",
             "GPU" if engine.device_accumulate else "host")
    return so
