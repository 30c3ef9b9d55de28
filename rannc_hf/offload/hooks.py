"""Offload for a plain ``nn.Module``: find its blocks, hook them, and hand back a training handle.

    import torch, rannc_hf
    from rannc_hf.offload import offload_module

    model, batch = rannc_hf.zoo.make("gpt2", batch_size=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    h = offload_module(model, opt, "all", device="cpu")      # or a RanncConfig
    loss = model(**batch).loss
    loss.backward()
    h.clip_grad_norm_(1.0)
    opt.step(); opt.zero_grad()       # the user's optimizer now steps the host masters (or h.step())
    torch.save(model.state_dict(), "ckpt.pt")   # fp32 masters under the original keys
    print(h.stats())

Blocks are found automatically (:func:`find_blocks`): the outermost ``nn.ModuleList``s of repeated
layers (GPT-2 ``transformer.h``, BERT ``bert.encoder.layer``, T5's encoder and decoder blocks), else
the direct children that hold parameters. Everything else is the resident "rest" group.
A forward pre-hook and a forward hook on each block call :func:`~rannc_hf.offload.fences.offload_enter`
and :func:`~rannc_hf.offload.fences.offload_exit`. Use the handle (or the patched optimizer) for
``step``, ``zero_grad`` and ``clip_grad_norm_``: gradients live on the host, so
``torch.nn.utils.clip_grad_norm_(model.parameters(), ...)`` would see none.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..config import RanncConfig
from ..errors import ConfigError, OffloadError
from .cost import choose_mode
from .engine import OffloadEngine
from .fences import offload_enter, offload_exit
from .optimizer import state_bytes_per_param


def check_state_keys(module: nn.Module, own: dict, state_dict: dict, strict: bool) -> tuple[list, list]:
    """``load_state_dict``'s key check: ``(missing, unexpected)``; with ``strict`` the same error as ``nn.Module``."""
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if strict and (missing or unexpected):
        raise RuntimeError(f"Error(s) in loading state_dict for {type(module).__name__}: "
                           f"missing keys {missing}, unexpected keys {unexpected}")
    return missing, unexpected

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def find_blocks(model: nn.Module, min_share: float = 0.1) -> list[nn.Module]:
    """The repeated layers of ``model`` in registration order (see module docstring)."""
    total = sum(p.numel() for p in model.parameters()) or 1
    found: list[nn.Module] = []
    taken: list[str] = []
    for name, mod in model.named_modules():
        if any(name == t or name.startswith(t + ".") for t in taken):
            continue
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2 and len({type(m) for m in mod}) == 1:
            n = sum(p.numel() for p in mod.parameters())
            if n >= min_share * total:
                found.extend(mod)
                taken.append(name)
    if found:
        return found
    return [m for m in model.children() if any(True for _ in m.parameters())]


def masters_into_state_dict(engine, named: Iterable[tuple[str, nn.Parameter]], state_dict: dict, prefix: str = "",
                            copy: bool = True) -> None:
    """Replace the entries of ``engine``'s parameters in ``state_dict`` by their fp32 host masters (their device
    working copies may be released). Entries that are the parameters themselves (``keep_vars=True``) stay;
    ``copy``: clone the masters (a master view changes with the next step)."""
    for name, p in named:
        key = prefix + name
        v = state_dict.get(key)
        if v is not None and not isinstance(v, nn.Parameter) and engine.owns(p):
            m = engine.master_of(p).detach()
            state_dict[key] = m.clone() if copy else m


def _tensors(obj, out=None) -> list:
    out = [] if out is None else out
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, out)
    elif hasattr(obj, "to_tuple"):  # transformers ModelOutput
        _tensors(obj.to_tuple(), out)
    return out


def _resolve(config_or_mode, compute_dtype, prefetch_blocks):
    if isinstance(config_or_mode, RanncConfig):
        mode = config_or_mode.offload
        dtype = compute_dtype or _DTYPES[config_or_mode.precision]
        pf = config_or_mode.prefetch_blocks if prefetch_blocks is None else prefetch_blocks
    elif isinstance(config_or_mode, str):
        mode = config_or_mode.lower()
        if mode not in ("auto", "none", "optimizer", "params", "all"):
            raise ConfigError(f"offload mode {config_or_mode!r} is not one of auto, none, optimizer, params, all")
        dtype = compute_dtype or torch.float32
        pf = 2 if prefetch_blocks is None else prefetch_blocks
    else:
        raise ConfigError(f"offload_module: expected a RanncConfig or a mode string, got {type(config_or_mode).__name__}")
    return mode, dtype, pf


def _auto_mode(model, optimizer, device, dtype, num_blocks, pf) -> str:
    if device.type != "cuda":
        return "none"
    free, _total = torch.cuda.mem_get_info(device)
    n = sum(p.numel() for p in model.parameters())
    obpp = state_bytes_per_param(optimizer) if optimizer is not None else 0
    itemsize = torch.empty(0, dtype=dtype).element_size()
    # keep ~30% of free memory for activations
    return choose_mode(n, 0.7 * free, compute_itemsize=itemsize, optim_bytes_per_param=obpp,
                       num_blocks=num_blocks, prefetch_blocks=pf) or "all"


class OffloadHandle:
    """What :func:`offload_module` returns: step / zero_grad / clipping / state dicts / stats."""

    def __init__(self, model: nn.Module, optimizer, engine: Optional[OffloadEngine], mode: str,
                 blocks: Sequence[nn.Module]):
        self.module = model
        self.optimizer = optimizer
        self.engine = engine
        self.mode = mode
        self.blocks = list(blocks)
        self._hooks: list = []
        self._patched: list[tuple[object, str]] = []
        self._raw_state = False
        self._names = dict(model.named_parameters(remove_duplicate=False))

    # -- training ------------------------------------------------------------------------------
    def step(self) -> None:
        if self.engine is None:
            type(self.optimizer).step(self.optimizer)
        else:
            self.engine.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.engine is None:
            type(self.optimizer).zero_grad(self.optimizer, set_to_none=set_to_none)
        else:
            self.engine.zero_grad()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> torch.Tensor:
        """Clip the global gradient norm (same result as ``torch.nn.utils.clip_grad_norm_``); returns the norm."""
        if self.engine is None:
            return torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm, norm_type, error_if_nonfinite)
        return self.engine.clip_grad_norm_(max_norm, norm_type, error_if_nonfinite)

    def stats(self) -> dict:
        return self.engine.stats() if self.engine is not None else {"mode": "none"}

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The model's state dict under its original keys, parameters as fp32 host masters."""
        return self.module.state_dict()

    def _state_dict_hook(self, module, state_dict, prefix, local_metadata):
        if self.engine is None or self._raw_state:
            return
        masters_into_state_dict(self.engine, self._names.items(), state_dict, prefix, copy=False)

    def load_state_dict(self, state_dict: dict, strict: bool = True):
        """Load parameters into the host masters (and resident copies) and buffers into the module."""
        if self.engine is None:
            return type(self.module).load_state_dict(self.module, state_dict, strict=strict)
        self._raw_state = True
        try:
            own = self.module.state_dict(keep_vars=True)
        finally:
            self._raw_state = False
        missing, unexpected = check_state_keys(self.module, own, state_dict, strict)
        with torch.no_grad():
            for k, v in state_dict.items():
                if k not in own:
                    continue
                t = own[k]
                if isinstance(t, nn.Parameter) and self.engine.owns(t):
                    if tuple(v.shape) != tuple(t.shape):
                        raise RuntimeError(f"size mismatch for {k}: checkpoint {tuple(v.shape)}, model {tuple(t.shape)}")
                    self.engine.load_param_(t, v)
                else:
                    t.copy_(v)
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    def optimizer_state_dict(self) -> dict:
        if self.engine is None:
            return type(self.optimizer).state_dict(self.optimizer)
        return self.engine.optimizer_state_dict()

    def load_optimizer_state_dict(self, state_dict: dict) -> None:
        if self.engine is None:
            type(self.optimizer).load_state_dict(self.optimizer, state_dict)
        else:
            self.engine.load_optimizer_state_dict(state_dict)

    # -- wiring --------------------------------------------------------------------------------
    def _patch(self, obj, name, fn):
        obj.__dict__[name] = fn
        self._patched.append((obj, name))

    def remove(self, restore: bool | str = True) -> None:
        """Undo everything: hooks, patches. ``restore``: parameters become normal tensors holding the fp32
        masters, on the device (``True``) or on the host (``"cpu"``: for a model larger than the GPU);
        ``False`` leaves them as they are (e.g. before dropping the model)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for obj, name in self._patched:
            obj.__dict__.pop(name, None)
        self._patched = []
        if self.engine is not None:
            self.engine.close(restore=restore)


def reject_closure(args: tuple, kwargs: dict) -> None:
    """An offloaded ``optimizer.step`` runs no closure; ``step(None)`` (Accelerate's wrapper) is fine."""
    closure = args[0] if args else kwargs.get("closure")
    if closure is not None or len(args) > 1 or set(kwargs) - {"closure"}:
        raise OffloadError("offloaded optimizer.step() takes no closure: compute the loss and call backward() "
                           "before step()")


def _materializer(model: nn.Module, blocks: Sequence[nn.Module],
                  init: Optional[Callable[[nn.Module], None]]) -> Optional[Callable[[int], None]]:
    """The engine's ``prepare``: before group ``i`` is stored, give its meta parameters host storage and run
    ``init`` on its modules (block ``i``'s, or for ``i == len(blocks)`` those outside every block)."""
    if init is None or not any(p.is_meta for p in model.parameters()):
        return None
    inside = {id(m) for b in blocks for m in b.modules()}
    groups = [list(b.modules()) for b in blocks] + [[m for m in model.modules() if id(m) not in inside]]

    def prepare(i: int) -> None:
        metas = [p for m in groups[i] for p in m.parameters(recurse=False) if p.is_meta]
        for p in {id(p): p for p in metas}.values():   # in place: the optimizer, the engine and ties hold it
            torch.utils.swap_tensors(p, nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                     requires_grad=p.requires_grad))
        if metas:
            for m in reversed(groups[i]):   # children before parents, as Module.apply (GPT-2 rescales c_proj
                init(m)                     # when it reaches the attention module)

    return prepare


def offload_module(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                   config_or_mode: Union[RanncConfig, str] = "all", blocks: Optional[Sequence[nn.Module]] = None, *,
                   device: Union[str, torch.device, None] = None, compute_dtype: Optional[torch.dtype] = None,
                   prefetch_blocks: Optional[int] = None, patch_optimizer: bool = True, check_memory: bool = True,
                   trace: bool = False, timing: bool = False, cpu_fused: Optional[bool] = None,
                   async_step: Optional[bool] = None, device_step_blocks: int = 0,
                   cpu_threads: Optional[int] = None, stream_step_blocks: Optional[int] = None,
                   device_grads: Optional[bool] = None, step_in_backward: bool = False, gpu_step_rest: bool = False,
                   materialize: Optional[Callable[[nn.Module], None]] = None) -> OffloadHandle:
    """Offload ``model``'s blocks per ``config_or_mode`` and return an :class:`OffloadHandle`.

    Args:
        model: any module (on CPU, meta-free, or already on ``device``).
        optimizer: the user's optimizer over ``model``'s parameters; rebuilt over the host masters.
            With ``patch_optimizer`` its ``step``/``zero_grad``/``state_dict``/``load_state_dict`` go
            through the handle, so an unchanged training loop works.
        config_or_mode: a :class:`~rannc_hf.config.RanncConfig` (uses ``offload``, ``precision``,
            ``prefetch_blocks``) or a mode string (compute dtype fp32 unless ``compute_dtype``).
        blocks: the block modules in forward order (default: :func:`find_blocks`).
        device: compute device (default ``cuda`` when available, else ``cpu``).
        prefetch_blocks: blocks fetched ahead (default: the config's, or 2).
        check_memory: refuse with :class:`OffloadError` if host RAM is too small.
        trace, timing, cpu_fused, async_step, device_step_blocks, cpu_threads, stream_step_blocks, device_grads,
            step_in_backward, gpu_step_rest: see :class:`~rannc_hf.offload.engine.OffloadEngine` (with ``step_in_backward`` every
            ``loss.backward()`` must be followed by ``optimizer.step()``, and gradients cannot be clipped).
        materialize: for a model built on the meta device (``with torch.device("meta"): ...``): its
            parameters get host storage one block at a time, just before the engine copies that block into
            its store, and ``materialize(module)`` initialises every module of the block in place (for a
            Transformers model: ``model._init_weights``). So the whole model never exists in host memory in
            fp32 next to the store, which a model near the host-memory limit needs. Buffers must not be on
            the meta device.

    Example (a model too large to build on the host first)::

        with torch.device("meta"):
            model = transformers.GPT2LMHeadModel(config)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
        h = offload_module(model, opt, "all", materialize=model._init_weights)
    """
    mode, dtype, pf = _resolve(config_or_mode, compute_dtype, prefetch_blocks)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    blocks = list(blocks) if blocks is not None else find_blocks(model)
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta and materialize is None:
        raise OffloadError(f"{len(meta)} parameter(s) are on the meta device (first: {meta[0]}); pass "
                           f"materialize= (e.g. model._init_weights for a Transformers model) to give them values "
                           f"block by block, or build the model on the CPU")
    bad = [n for n, b in model.named_buffers() if b.is_meta]
    if bad:
        raise OffloadError(f"buffer {bad[0]!r} is on the meta device; offload_module materialises parameters only: "
                           f"build the model's buffers on the CPU (e.g. create it on the CPU, or re-register "
                           f"the buffers after building it on the meta device)")
    if mode == "auto":
        mode = _auto_mode(model, optimizer, dev, dtype, len(blocks), pf)
    if meta and mode == "none":
        raise OffloadError("a model on the meta device needs an offload mode (optimizer, params or all): "
                           "offload 'none' would have to build it whole on the device")
    for mod in model.modules():  # buffers (BatchNorm stats, masks) live on the compute device
        for k, b in list(mod._buffers.items()):
            if b is not None and b.device != dev:
                mod._buffers[k] = b.to(dev)
    if mode == "none":
        model.to(device=dev)
        if dtype != torch.float32:
            raise OffloadError("offload='none' with a low-precision compute dtype: use torch.autocast instead")
        return OffloadHandle(model, optimizer, None, mode, blocks)
    if not blocks:
        raise OffloadError(f"found no blocks to offload in {type(model).__name__}; pass blocks=[...]")
    block_params = [list(b.parameters()) for b in blocks]
    in_blocks = {id(p) for ps in block_params for p in ps}
    rest = [p for p in model.parameters() if id(p) not in in_blocks]
    engine = OffloadEngine(block_params, device=dev, mode=mode, compute_dtype=dtype, prefetch_blocks=pf,
                           optimizer=optimizer, rest=rest, check_memory=check_memory, trace=trace, timing=timing,
                           cpu_fused=cpu_fused, param_order=list(model.parameters()), async_step=async_step,
                           device_step_blocks=device_step_blocks, cpu_threads=cpu_threads, stream_step_blocks=stream_step_blocks,
                           device_grads=device_grads, step_in_backward=step_in_backward, gpu_step_rest=gpu_step_rest,
                           prepare=_materializer(model, blocks, materialize))
    handle = OffloadHandle(model, optimizer, engine, mode, blocks)
    eid = engine.id
    for i, b in enumerate(blocks):
        def pre(mod, args, kwargs, i=i):
            offload_enter(eid, i, *_tensors((args, kwargs)))

        def post(mod, args, output, i=i):
            offload_exit(eid, i, *_tensors(output))

        handle._hooks.append(b.register_forward_pre_hook(pre, with_kwargs=True))
        handle._hooks.append(b.register_forward_hook(post))
    handle._hooks.append(model._register_state_dict_hook(handle._state_dict_hook))
    handle._patch(model, "load_state_dict", handle.load_state_dict)
    if optimizer is not None and patch_optimizer:
        def step(*args, **kwargs):
            reject_closure(args, kwargs)
            handle.step()

        step._wrapped_by_lr_sched = True  # an LR scheduler created earlier keeps working silently
        handle._patch(optimizer, "step", step)
        handle._patch(optimizer, "zero_grad", lambda set_to_none=True: handle.zero_grad(set_to_none))
        handle._patch(optimizer, "state_dict", handle.optimizer_state_dict)
        handle._patch(optimizer, "load_state_dict", handle.load_optimizer_state_dict)
    return handle
