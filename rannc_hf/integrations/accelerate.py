"""Accelerate integration: :class:`RanncPlugin` and :class:`RanncAccelerator`.

A plain Accelerate training script gets automatic pipeline + data-parallel partitioning by
swapping one class and starting it with ``rannc-hf launch``::

    # train.py                                     (was: from accelerate import Accelerator)
    from rannc_hf import RanncAccelerator as Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=2)
    model, optimizer, train_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, scheduler)
    for batch in train_dl:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step(); scheduler.step(); optimizer.zero_grad()
    accelerator.save_model(model, "out")           # full model, HF layout, safetensors

    # shell
    rannc-hf launch --rannc_config rannc.yaml --num_processes 4 train.py

or in code: ``RanncAccelerator(rannc_plugin=RanncPlugin(num_stages=2, num_microbatches=4))``.

Accelerate has no third-party plugin API (``DistributedType`` is closed), so this is a subclass of
:class:`accelerate.Accelerator` that runs as a normal multi-process (``MULTI_GPU`` / ``MULTI_CPU``)
Accelerator and changes only what partitioning changes:

* ``prepare()`` wraps the model in a :class:`rannc_hf.RanncModule` planned for the launched
  world (marked ``_is_accelerate_prepared`` so Accelerate leaves it alone), the optimizer is
  narrowed in place to this rank's parameters and wrapped as Accelerate would, dataloaders are
  sharded by **data-parallel rank** (every stage of one pipeline sees the same batch; each batch is
  this replica's batch, ``local_batch=True``), schedulers are Accelerate's.
* ``clip_grad_norm_`` is global over all stages; ``accumulate``/``no_sync`` use the RanncModule's
  ``no_sync``; ``backward`` is Accelerate's (divides by the accumulation steps).
* ``gather``/``gather_for_metrics``/``reduce`` work over data-parallel replicas only (the stages
  of a replica hold the same values), so metrics count every sample once.
* ``get_state_dict`` returns the full model (gathered); ``unwrap_model`` returns **the user's
  original model object with the full, current weights copied in** (a collective: call it on every
  rank, as Accelerate's examples do); ``save_model`` writes config + ``model.safetensors`` that
  ``from_pretrained`` loads; ``save_state``/``load_state`` save the full model, the full optimizer
  state, schedulers, samplers, per-rank RNG states and the step, atomically.
* ``mixed_precision`` maps to ``RanncConfig.precision`` (``no`` -> ``fp32``); Accelerate's own
  autocast stays off because the stages run in that precision themselves.

Without a plugin and without ``RANNC_HF_CONFIG`` in the environment, or in a single process with
nothing to partition (``num_stages`` unset or 1, no offload on a GPU), ``RanncAccelerator`` is
exactly ``Accelerator``.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import DistributedType, InitProcessGroupKwargs, recursively_apply

from ..config import CONFIG_ENV, ENV_PREFIX, NON_CONFIG_ENV, RanncConfig, _DictLoadable, env_config_values
from ..errors import ConfigError
from .checkpoint import atomic_dir, original_model, save_full_model

logger = logging.getLogger(__name__)

__all__ = ["RanncPlugin", "RanncAccelerator"]

_PRECISION_FROM_ACCELERATE = {"no": "fp32", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
_PRECISION_TO_ACCELERATE = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def _help(name: str) -> str:
    for f in fields(RanncConfig):
        if f.name == name:
            return f.metadata.get("help", "")
    return ""


def _f(name: str, extra: str = "") -> Any:
    return field(default=None, metadata={"help": (_help(name) + extra).strip()})


@dataclass
class RanncPlugin(_DictLoadable):
    """What rannc_hf does inside a :class:`RanncAccelerator`; the fields are :class:`RanncConfig`'s.

    A field left ``None`` is *unset*: it takes the value from the environment (``RANNC_HF_CONFIG``
    file, ``RANNC_HF_<FIELD>`` variables) when the accelerator merges it with the environment, and
    :class:`RanncConfig`'s default otherwise. ``precision`` unset follows Accelerate's
    ``mixed_precision`` (``no`` -> ``fp32``).

        >>> RanncPlugin(num_stages=2, schedule="1f1b").to_config().num_stages
        2
        >>> RanncPlugin(num_stage=2)
        Traceback (most recent call last):
        ...
        TypeError: RanncPlugin.__init__() got an unexpected keyword argument 'num_stage'
    """

    num_stages: Optional[int] = _f("num_stages")
    num_microbatches: Optional[int] = _f("num_microbatches")
    schedule: Optional[str] = _f("schedule")
    partitioner: Optional[str] = _f("partitioner")
    recompute: Optional[str] = _f("recompute")
    offload: Optional[str] = _f("offload")
    gpu_memory: Optional[Union[int, str]] = _f("gpu_memory")
    compile: Optional[Union[str, bool]] = _f("compile")
    mem_margin: Optional[float] = _f("mem_margin")
    precision: Optional[str] = _f("precision", "; unset: follow Accelerate's mixed_precision")
    plan_file: Optional[str] = _f("plan_file")
    profile_cache: Optional[str] = _f("profile_cache")
    dp_size: Optional[int] = _f("dp_size")
    prefetch_blocks: Optional[int] = _f("prefetch_blocks")
    gpu_step_blocks: Optional[Union[str, int]] = _f("gpu_step_blocks")
    stream_step_blocks: Optional[Union[str, int]] = _f("stream_step_blocks")
    step_in_backward: Optional[bool] = _f("step_in_backward")
    split_head: Optional[Union[str, bool]] = _f("split_head")
    collective_timeout_s: Optional[float] = _f("collective_timeout_s")

    def __post_init__(self):
        missing = set(RanncConfig.valid_keys()) - {f.name for f in fields(self)}
        if missing:  # RanncConfig grew a field this plugin does not know yet
            raise ConfigError(f"RanncPlugin lacks RanncConfig fields {sorted(missing)}; update rannc_hf")
        self.to_config()   # validate every value now, with RanncConfig's messages

    # ---- construction (valid_keys, from_dict, from_yaml: _DictLoadable) ------------------------
    @classmethod
    def from_env(cls, environ: Optional[dict] = None) -> "RanncPlugin":
        """``$RANNC_HF_CONFIG`` (a YAML path), then ``RANNC_HF_<FIELD>`` variables on top."""
        return cls(**env_config_values(cls.valid_keys(), lambda path: cls.from_yaml(path).set_fields(), environ))

    @staticmethod
    def env_is_set(environ: Optional[dict] = None) -> bool:
        """True when ``RANNC_HF_CONFIG`` or any ``RANNC_HF_<FIELD>`` variable is set."""
        env = os.environ if environ is None else environ
        return any(k.startswith(ENV_PREFIX) and (k == CONFIG_ENV or k not in NON_CONFIG_ENV) for k in env)

    # ---- use --------------------------------------------------------------------------------
    def set_fields(self) -> dict:
        """The fields that are set (not ``None``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def merged_with(self, other: "RanncPlugin") -> "RanncPlugin":
        """This plugin's set fields, with ``other``'s filling the unset ones."""
        return RanncPlugin(**{**other.set_fields(), **self.set_fields()})

    def to_config(self, mixed_precision: Optional[str] = None) -> RanncConfig:
        """The :class:`RanncConfig` this plugin describes.

        ``mixed_precision`` (Accelerate's: ``no``/``fp16``/``bf16``) fills ``precision`` when unset.
        """
        data = self.set_fields()
        if "precision" not in data and mixed_precision is not None:
            mp = str(mixed_precision).lower()
            if mp not in _PRECISION_FROM_ACCELERATE:
                raise ConfigError(f"mixed_precision={mixed_precision!r} is not supported by rannc_hf; "
                                  f"use one of no, fp16, bf16")
            data["precision"] = _PRECISION_FROM_ACCELERATE[mp]
        return RanncConfig(**data)


# -------------------------------------------------------------------------------------------------
def _ranncmodule_cls():
    from ..runtime.module import RanncModule

    return RanncModule


def _is_rannc(obj: Any) -> bool:
    try:
        return isinstance(obj, _ranncmodule_cls())
    except ImportError:
        return False


def _raw_optimizer(opt: Any) -> Any:
    while isinstance(opt, AcceleratedOptimizer):
        opt = opt.optimizer
    return opt


class _RanncOptimizer(AcceleratedOptimizer):
    """Accelerate's optimizer wrapper whose state dict is the full (gathered) optimizer state.

    ``step``/``zero_grad`` skip while accumulating, exactly as ``AcceleratedOptimizer`` does;
    ``state_dict()`` is collective (every rank calls it inside ``save_state``) and
    ``load_state_dict()`` keeps this rank's part.
    """

    def __init__(self, optimizer, rannc_module, scaler=None):
        super().__init__(optimizer, device_placement=False, scaler=scaler)
        self.rannc_module = rannc_module

    def state_dict(self):
        fn = getattr(self.rannc_module, "optimizer_state_dict", None)
        return fn() if fn is not None else self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        fn = getattr(self.rannc_module, "load_optimizer_state_dict", None)
        if fn is not None:
            fn(state_dict)
        else:
            self.optimizer.load_state_dict(state_dict)


class _RanncScheduler(AcceleratedScheduler):
    """Accelerate's scheduler wrapper, stepping once per *data-parallel replica* (not per process).

    Plain Accelerate steps the scheduler ``num_processes`` times per optimizer step because every
    process is a replica; with pipeline stages only ``dp_size`` of the processes are.
    """

    def __init__(self, *args, dp_size_fn, **kwargs):
        super().__init__(*args, **kwargs)
        self._dp_size_fn = dp_size_fn

    def step(self, *args, **kwargs):
        if not self.step_with_optimizer or self.split_batches or not self.gradient_state.sync_gradients:
            return super().step(*args, **kwargs)
        for opt in self.optimizers:
            if opt.step_was_skipped:
                return
        for _ in range(self._dp_size_fn()):
            if hasattr(self.scheduler, "total_steps") and self.scheduler._step_count > self.scheduler.total_steps:
                break
            self.scheduler.step(*args, **kwargs)


def _world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class RanncAccelerator(Accelerator):
    """An :class:`accelerate.Accelerator` that partitions the prepared model with rannc_hf.

    Args:
        rannc_plugin: what to partition and how. ``None``: read from the environment
            (``RANNC_HF_CONFIG``, set by ``rannc-hf launch --rannc_config``); with neither, this
            is a plain ``Accelerator``. Fields the plugin leaves unset are filled from the
            environment when it is set.
        **accelerate_kwargs: everything :class:`accelerate.Accelerator` takes. DeepSpeed,
            FSDP, Megatron-LM and tensor-parallel plugins cannot be combined with rannc.

    Extra attributes once a model is prepared: ``rannc_module``, ``dp_rank``, ``dp_size``,
    ``pp_rank``, ``num_stages``, ``rannc_config``; ``rannc_enabled`` tells whether rannc is on.
    """

    def __init__(self, rannc_plugin: Optional[RanncPlugin] = None, **accelerate_kwargs):
        env_plugin = RanncPlugin.from_env() if RanncPlugin.env_is_set() else None
        if rannc_plugin is not None and not isinstance(rannc_plugin, RanncPlugin):
            raise TypeError(f"rannc_plugin must be a RanncPlugin, got {type(rannc_plugin).__name__}")
        if rannc_plugin is not None and env_plugin is not None:
            rannc_plugin = rannc_plugin.merged_with(env_plugin)
        plugin = rannc_plugin if rannc_plugin is not None else env_plugin

        user_mp = accelerate_kwargs.get("mixed_precision")
        if user_mp is None:
            user_mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        user_mp = str(user_mp).lower()
        self.rannc_plugin = plugin
        self.rannc_config: Optional[RanncConfig] = None
        self.rannc_module = None
        self._rannc_reps: Optional[list[int]] = None   # global ranks representing each dp replica
        self._rannc_originals: dict[int, nn.Module] = {}

        if plugin is not None:
            cfg = plugin.to_config(mixed_precision=user_mp)
            _, world = _world()
            gpu = torch.cuda.is_available() and not _env_flag("ACCELERATE_USE_CPU") and not accelerate_kwargs.get("cpu")
            nothing_to_do = world == 1 and (cfg.num_stages in (None, 1)) and (cfg.offload == "none" or not gpu)
            if nothing_to_do:
                logger.info("rannc_hf: one process and nothing to partition; running as a plain Accelerator")
                plugin = None
            else:
                for k in ("deepspeed_plugin", "deepspeed_plugins", "fsdp_plugin", "megatron_lm_plugin",
                          "torch_tp_plugin", "parallelism_config"):
                    if accelerate_kwargs.get(k) is not None:
                        raise ConfigError(f"RanncAccelerator: {k} cannot be combined with rannc_hf, which does "
                                          f"the partitioning itself; drop it (or drop the rannc config)")
                if cfg.precision != "fp32" and user_mp not in ("no", _PRECISION_TO_ACCELERATE[cfg.precision]):
                    logger.warning("rannc_hf: precision=%s from the rannc config overrides Accelerate's "
                                   "mixed_precision=%s", cfg.precision, user_mp)
                self.rannc_config = cfg
                accelerate_kwargs["mixed_precision"] = "no"     # stages run in cfg.precision themselves
                handlers = list(accelerate_kwargs.get("kwargs_handlers") or [])
                if not any(isinstance(h, InitProcessGroupKwargs) for h in handlers):
                    import datetime

                    handlers.append(InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.collective_timeout_s)))
                    accelerate_kwargs["kwargs_handlers"] = handlers
        self.rannc_plugin = plugin
        super().__init__(**accelerate_kwargs)
        if self.rannc_enabled and self.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP,
                                                            DistributedType.MEGATRON_LM, DistributedType.XLA):
            raise ConfigError(f"RanncAccelerator: the accelerate config selects {self.distributed_type.value}, "
                              f"which cannot be combined with rannc_hf; use a multi-GPU (or CPU) accelerate "
                              f"config and let rannc_hf partition the model")

    # ---- introspection ----------------------------------------------------------------------
    @property
    def rannc_enabled(self) -> bool:
        return self.rannc_config is not None

    @property
    def num_processes(self) -> int:
        """Data-parallel replicas (what a plain Accelerate script means by it); see ``world_size``.

        Known from the config when it sets ``num_stages`` or ``dp_size``; otherwise the world size
        until ``prepare()`` has planned the model.
        """
        if not getattr(self, "rannc_config", None):
            return super().num_processes
        world = self.state.num_processes
        if self.rannc_module is not None:
            return int(self.rannc_module.dp_size)
        cfg = self.rannc_config
        if cfg.dp_size:
            return cfg.dp_size
        if cfg.num_stages and world % cfg.num_stages == 0:
            return world // cfg.num_stages
        self._num_processes_guessed = True
        return world

    @property
    def world_size(self) -> int:
        """All processes (stages x replicas)."""
        return self.state.num_processes

    @property
    def is_last_process(self) -> bool:
        return self.process_index == self.state.num_processes - 1

    @property
    def mixed_precision(self) -> str:
        if self.rannc_enabled:
            return _PRECISION_TO_ACCELERATE[self.rannc_config.precision]
        return super().mixed_precision

    def _rm_attr(self, name: str, default: int) -> int:
        return int(getattr(self.rannc_module, name, default)) if self.rannc_module is not None else default

    @property
    def dp_rank(self) -> int:
        """This process's data-parallel replica (``process_index`` without rannc)."""
        return self._rm_attr("dp_rank", self.process_index)

    @property
    def dp_size(self) -> int:
        """Number of data-parallel replicas (``num_processes`` without rannc)."""
        return self._rm_attr("dp_size", self.num_processes)

    def prepare_scheduler(self, scheduler):
        if not self.rannc_enabled or getattr(scheduler, "_is_accelerate_prepared", False):
            return super().prepare_scheduler(scheduler)
        optimizer = self._optimizers
        for opt in self._optimizers:
            if getattr(scheduler, "optimizer", None) == opt.optimizer:
                optimizer = opt
                break
        wrapped = _RanncScheduler(scheduler, optimizer, step_with_optimizer=self.step_scheduler_with_optimizer,
                                  split_batches=self.split_batches, dp_size_fn=lambda: self.num_processes)
        self._schedulers.append(wrapped)
        return wrapped

    @property
    def pp_rank(self) -> int:
        return self._rm_attr("pp_rank", 0)

    @property
    def num_stages(self) -> int:
        return self._rm_attr("num_stages", 1)

    # ---- prepare ----------------------------------------------------------------------------
    def prepare(self, *args, device_placement=None):
        if not self.rannc_enabled:
            return super().prepare(*args, device_placement=device_placement)
        args = list(args)
        model_idx = [i for i, a in enumerate(args)
                     if isinstance(a, nn.Module) and not getattr(a, "_is_accelerate_prepared", False)]
        if len(model_idx) > 1:
            raise ValueError("RanncAccelerator.prepare(): rannc_hf partitions one model; prepare other models "
                             "with a separate plain Accelerator (or mark them _is_accelerate_prepared)")
        if model_idx:
            i = model_idx[0]
            model = args[i]
            params = {id(p) for p in model.parameters()}
            opt_idx = [j for j, a in enumerate(args) if isinstance(a, torch.optim.Optimizer)
                       and any(id(p) in params for g in _raw_optimizer(a).param_groups for p in g["params"])]
            if len(opt_idx) > 1:
                raise ValueError("RanncAccelerator.prepare(): more than one optimizer over the model's parameters")
            optimizer = _raw_optimizer(args[opt_idx[0]]) if opt_idx else None
            example = self._example_batch(args)
            args[i] = self._wrap_model(model, optimizer, example)
            if opt_idx:
                args[opt_idx[0]] = optimizer
        else:
            if self.rannc_module is None and any(isinstance(a, torch.utils.data.DataLoader) for a in args):
                raise ValueError("RanncAccelerator.prepare(): prepare the model first (or in the same call), "
                                 "dataloaders are sharded by the model's data-parallel layout")
            rm = self.rannc_module
            for j, a in enumerate(args):   # an optimizer prepared after its model: narrow it now
                if rm is not None and isinstance(a, torch.optim.Optimizer) and getattr(rm, "optimizer", 1) is None:
                    raw = _raw_optimizer(a)
                    if any(p is q for g in raw.param_groups for p in g["params"] for q in rm.module.parameters()):
                        rm.set_optimizer(raw)   # narrowed to this rank's parameters now if built, else at build
                        args[j] = raw
            if rm is not None and getattr(rm, "mesh", 1) is None:
                example = self._example_batch(args)
                if example is not None:
                    self._build_now(rm, example)
        return super().prepare(*args, device_placement=device_placement)

    def _build_now(self, rm, example: dict) -> None:
        """Plan/build a RanncModule prepared without a batch, from a dataloader's first batch."""
        if not hasattr(rm, "build"):
            raise ValueError("RanncAccelerator.prepare(): pass the model together with its training dataloader")
        with torch.random.fork_rng(devices=[]):
            rm.build(dict(example))
        self._find_replicas(rm)

    def _example_batch(self, args: list) -> Optional[dict]:
        for a in args:
            if isinstance(a, torch.utils.data.DataLoader) and not getattr(a, "_is_accelerate_prepared", False):
                with torch.random.fork_rng(devices=[]):   # do not disturb the user's RNG stream
                    try:
                        batch = next(iter(a))
                    except StopIteration:
                        return None
                return dict(batch) if isinstance(batch, dict) or hasattr(batch, "keys") else None
        return None

    def _wrap_model(self, model: nn.Module, optimizer, example: Optional[dict]):
        RanncModule = _ranncmodule_cls()
        with torch.random.fork_rng(devices=[]):
            rm = RanncModule(model, optimizer, config=self.rannc_config, example_batch=example, local_batch=True)
        rm._is_accelerate_prepared = True
        from ..reliability.watchdog import guard_module

        guard_module(rm)   # a dead/stuck peer: CollectiveTimeoutError naming the rank and collective, no hang
        self.rannc_module = rm
        self._rannc_originals[id(rm)] = model
        if getattr(rm, "mesh", 1) is not None:
            self._find_replicas(rm)
        return rm

    def _find_replicas(self, rm) -> None:
        # which global rank stands for each data-parallel replica: the last stage (it has outputs)
        world = self.state.num_processes
        info = [None] * world
        mine = (int(rm.dp_rank), int(rm.pp_rank), bool(rm.is_last_stage))
        if world > 1:
            torch.distributed.all_gather_object(info, mine)
        else:
            info = [mine]
        reps = sorted((d, r) for r, (d, _, last) in enumerate(info) if last)
        self._rannc_reps = [r for _, r in reps]
        if getattr(self, "_num_processes_guessed", False) and int(rm.dp_size) != self.state.num_processes:
            logger.warning("rannc_hf: accelerator.num_processes was read before prepare() as %d (world size); "
                           "the plan has %d data-parallel replicas, which num_processes reports from now on. "
                           "Set num_stages or dp_size in the rannc config to know it up front.",
                           self.state.num_processes, int(rm.dp_size))
        if self.is_main_process:
            summary = getattr(getattr(rm, "plan", None), "summary", None)
            logger.info("rannc_hf: %s stage(s) x %s replica(s)%s", rm.num_stages, rm.dp_size,
                        ("\n" + summary()) if callable(summary) else "")

    def prepare_model(self, model, device_placement=None, evaluation_mode=False):
        if self.rannc_enabled and not getattr(model, "_is_accelerate_prepared", False) and isinstance(model, nn.Module):
            model = self._wrap_model(model, None, None)
        return super().prepare_model(model, device_placement=device_placement, evaluation_mode=evaluation_mode)

    def prepare_optimizer(self, optimizer, device_placement=None):
        if not self.rannc_enabled or self.rannc_module is None or getattr(optimizer, "_is_accelerate_prepared", False):
            return super().prepare_optimizer(optimizer, device_placement=device_placement)
        wrapped = _RanncOptimizer(_raw_optimizer(optimizer), self.rannc_module, scaler=self.scaler)
        self._optimizers.append(wrapped)
        return wrapped

    def prepare_data_loader(self, data_loader, device_placement=None, slice_fn_for_dispatch=None):
        if not self.rannc_enabled or getattr(data_loader, "_is_accelerate_prepared", False):
            return super().prepare_data_loader(data_loader, device_placement, slice_fn_for_dispatch)
        if self.rannc_module is None:
            raise ValueError("RanncAccelerator: prepare the model before (or together with) its dataloaders")
        if getattr(self.rannc_module, "mesh", 1) is None:
            raise ValueError("RanncAccelerator: the model is not planned yet, so the data-parallel layout that "
                             "shards this dataloader is unknown; prepare the model and its training dataloader "
                             "in the same prepare() call")
        from accelerate.data_loader import prepare_data_loader

        if device_placement is None:
            device_placement = self.device_placement
        prepared = prepare_data_loader(
            data_loader, self.device, num_processes=self.dp_size, process_index=self.dp_rank,
            split_batches=self.split_batches, put_on_device=device_placement, rng_types=self.rng_types.copy(),
            dispatch_batches=False,   # every rank reads its replica's shard itself
            even_batches=self.even_batches, use_seedable_sampler=self.use_seedable_sampler,
            data_seed=self.dataloader_config.data_seed, non_blocking=self.non_blocking,
            use_stateful_dataloader=self.use_stateful_dataloader)
        if self.dp_size == 1 and self.state.num_processes > 1:
            self._synchronize_sampler(prepared)
        self._dataloaders.append(prepared)
        return prepared

    def _synchronize_sampler(self, prepared) -> None:
        """One replica over several processes: Accelerate leaves a 1-process dataloader alone, so a
        shuffling sampler would draw from each rank's own RNG. Give it a generator whose state rank 0
        broadcasts at every epoch (what Accelerate does with several processes), so every stage of
        the pipeline reads the same batches."""
        from accelerate.data_loader import SeedableRandomSampler, get_sampler

        sampler = get_sampler(prepared)
        if not isinstance(sampler, torch.utils.data.RandomSampler) or isinstance(sampler, SeedableRandomSampler):
            return
        if sampler.generator is None:
            sampler.generator = torch.Generator()
            sampler.generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        if getattr(prepared, "synchronized_generator", None) is None:
            prepared.synchronized_generator = sampler.generator
        rng = list(prepared.rng_types or [])
        if "generator" not in [str(getattr(r, "value", r)) for r in rng]:
            rng.append("generator")
        prepared.rng_types = rng

    # ---- training ---------------------------------------------------------------------------
    def _rannc_for(self, model=None):
        if not self.rannc_enabled:
            return None
        if model is not None and _is_rannc(model):
            return model
        if model is not None:
            for rid, orig in self._rannc_originals.items():
                if orig is model and self.rannc_module is not None and id(self.rannc_module) == rid:
                    return self.rannc_module
            return None
        return self.rannc_module

    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        """Clip by the global norm over every stage (RanncModule.clip_grad_norm_); returns the norm."""
        rm = self._rannc_for()
        if rm is None:
            return super().clip_grad_norm_(parameters, max_norm, norm_type=norm_type)
        self.unscale_gradients()
        if norm_type != 2:
            try:
                return rm.clip_grad_norm_(max_norm, norm_type=norm_type)
            except TypeError:
                raise ValueError("rannc_hf clips by the 2-norm only") from None
        return rm.clip_grad_norm_(max_norm)

    def no_sync(self, model):
        rm = self._rannc_for(model)
        if rm is not None and hasattr(rm, "no_sync"):
            return rm.no_sync()
        return super().no_sync(model)

    # ---- gathering over data-parallel replicas ---------------------------------------------
    def _select_reps(self, data):
        reps, world = self._rannc_reps, self.state.num_processes

        def pick(t):
            if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] % world:
                return t
            chunks = t.split(t.shape[0] // world)
            return torch.cat([chunks[r] for r in reps], dim=0)

        return recursively_apply(pick, data, error_on_other_type=False)

    def _dp_active(self) -> bool:
        rm = self.rannc_module
        if self._rannc_reps is None and rm is not None and getattr(rm, "mesh", None) is not None:
            self._find_replicas(rm)      # built by its first forward; gathering is collective anyway
        return self.rannc_enabled and self._rannc_reps is not None and self.state.num_processes > 1

    def gather(self, tensor):
        """Gather over data-parallel replicas (concatenated in replica order).

        Every rank of one replica must pass tensors of the same shape (the loss, batch tensors);
        the last stage's values are the ones kept.
        """
        data = super().gather(tensor)
        return self._select_reps(data) if self._dp_active() else data

    def _gather_object(self, obj):
        if not self._dp_active():
            from accelerate.utils import gather_object

            return gather_object(obj)
        out = [None] * self.state.num_processes
        torch.distributed.all_gather_object(out, obj)
        picked = [out[r] for r in self._rannc_reps]
        if all(isinstance(p, (list, tuple)) for p in picked):
            return [x for p in picked for x in p]
        return picked

    def gather_for_metrics(self, input_data, use_gather_object=False):
        """Accelerate's ``gather_for_metrics`` over data-parallel replicas (duplicates dropped)."""
        if not self._dp_active():
            return super().gather_for_metrics(input_data, use_gather_object=use_gather_object)
        try:
            recursively_apply(lambda x: x, input_data, error_on_other_type=True)
            all_tensors = True
        except TypeError:
            all_tensors = False
        use_gather_object = use_gather_object or not all_tensors
        data = self._gather_object(input_data) if use_gather_object else self.gather(input_data)
        gs = self.gradient_state
        try:
            if gs.end_of_dataloader and gs.remainder > 0:
                if use_gather_object:
                    return data[: gs.remainder]
                return recursively_apply(lambda t: t[: gs.remainder], data)
        except Exception:
            pass
        return data

    def reduce(self, tensor, reduction="sum", scale=1.0):
        """Accelerate's ``reduce`` over data-parallel replicas (each replica counted once)."""
        out = super().reduce(tensor, reduction=reduction, scale=scale)
        if self._dp_active() and reduction == "sum":
            out = recursively_apply(lambda t: t / self.num_stages, out)
        return out

    # ---- models and checkpoints -------------------------------------------------------------
    def get_state_dict(self, model, unwrap=True):
        """The full model state under the original keys (gathered; call on every rank)."""
        rm = self._rannc_for(model)
        if rm is None:
            return super().get_state_dict(model, unwrap=unwrap)
        sd = rm.state_dict()
        if getattr(self, "_rannc_saving_state", False):
            # save_state writes the dict with safetensors, which refuses tensors sharing memory (tied
            # aliases), and load_state loads it strictly: store every key, aliases as copies.
            seen: set[int] = set()
            for k, v in sd.items():
                if isinstance(v, torch.Tensor):
                    key = v.untyped_storage().data_ptr() if v.numel() else id(v)
                    if key in seen:
                        sd[k] = v.clone()
                    seen.add(key)
        return sd

    def unwrap_model(self, model, keep_fp32_wrapper: bool = True, keep_torch_compile: bool = True):
        """For a RanncModule: the user's original model, its weights refreshed from the full state.

        This gathers the weights (a collective): call it on every rank. The returned object is the
        model class the user built (``save_pretrained``, ``generate`` and ``state_dict`` work on it);
        it is a snapshot, later training steps update the RanncModule, not it.
        """
        rm = self._rannc_for(model)
        if rm is None:
            return super().unwrap_model(model, keep_fp32_wrapper=keep_fp32_wrapper,
                                        keep_torch_compile=keep_torch_compile)
        orig = self._rannc_originals.get(id(rm)) or original_model(rm)
        _copy_into(orig, rm.state_dict())
        return orig

    def save_model(self, model, save_directory, max_shard_size="10GB", safe_serialization=True):
        """Full model in Hugging Face layout (config + safetensors) that ``from_pretrained`` loads."""
        rm = self._rannc_for(model)
        if rm is None:
            return super().save_model(model, save_directory, max_shard_size=max_shard_size,
                                      safe_serialization=safe_serialization)
        orig = self._rannc_originals.get(id(rm)) or original_model(rm)
        sd = rm.state_dict()
        save_full_model(orig, save_directory, state_dict=sd, safe_serialization=safe_serialization,
                        max_shard_size=max_shard_size)
        self.wait_for_everyone()

    def save_state(self, output_dir: Optional[str] = None, safe_serialization: bool = True, **save_model_func_kwargs):
        """Accelerate's ``save_state`` (model, optimizer, schedulers, samplers, RNG, step), atomic.

        With rannc the model file holds the full model and ``optimizer.bin`` the full optimizer
        state, so a checkpoint also resumes on another layout. Files are written to a temporary
        directory which replaces ``output_dir`` only when every rank is done.
        """
        if not self.rannc_enabled or self.project_configuration.automatic_checkpoint_naming or output_dir is None:
            return super().save_state(output_dir, safe_serialization=safe_serialization, **save_model_func_kwargs)
        final = os.path.abspath(os.path.expanduser(os.fspath(output_dir)))
        tmp = final + ".rannc-tmp"
        writer = self.is_local_main_process if self.project_configuration.save_on_each_node else self.is_main_process
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        self.wait_for_everyone()
        self._rannc_saving_state = True
        try:
            super().save_state(tmp, safe_serialization=safe_serialization, **save_model_func_kwargs)
        finally:
            self._rannc_saving_state = False
        self.wait_for_everyone()
        if writer:
            from ..reliability.checkpoint import write_manifest

            # sizes + sha256 of every file: load_state (and rannc_hf.reliability) verify them
            write_manifest(tmp, int(getattr(self, "step", 0) or 0))
            atomic_dir(tmp, final, merge=False)
        self.wait_for_everyone()
        return final

    def load_state(self, input_dir: Optional[str] = None, load_kwargs: Optional[dict] = None, **load_model_func_kwargs):
        """Accelerate's ``load_state``; a RanncModule takes the full model and keeps its part.

        A directory with a ``manifest.json`` (written by ``save_state``) is verified first: a
        truncated or corrupted file raises :class:`~rannc_hf.errors.CheckpointError` naming it.
        """
        if input_dir is not None and os.path.isfile(os.path.join(os.fspath(input_dir), "manifest.json")):
            from ..reliability.checkpoint import verify_checkpoint

            verify_checkpoint(input_dir)
        if not self.rannc_enabled:
            return super().load_state(input_dir, load_kwargs=load_kwargs, **load_model_func_kwargs)
        saved = self._models
        self._models = [_LoadProxy(m) if _is_rannc(m) else m for m in saved]
        try:
            return super().load_state(input_dir, load_kwargs=load_kwargs, **load_model_func_kwargs)
        finally:
            self._models = saved


class _LoadProxy(nn.Module):
    """Stands in for a RanncModule inside Accelerate's ``load_state``.

    ``safetensors.torch.load_model`` calls ``model.state_dict()`` only to find tensors that share
    memory; the RanncModule's own would be a full gather with tied aliases sharing one tensor (and
    then reported as "unexpected"). The proxy answers with distinct placeholders and forwards
    ``load_state_dict`` (a full state dict; each rank keeps its part).
    """

    def __init__(self, rannc_module):
        super().__init__()
        object.__setattr__(self, "_rm", rannc_module)

    def state_dict(self, *args, **kwargs):
        return {k: torch.empty(1) for k in self._rm.module.state_dict().keys()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self._rm.load_state_dict(state_dict, strict=strict)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


@torch.no_grad()
def _copy_into(model: nn.Module, state_dict: dict) -> None:
    """Copy a full state dict into ``model`` in place (re-materialising meta/resized tensors)."""
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(dict(model.named_buffers(remove_duplicate=False)))
    reassign = {}
    for k, v in state_dict.items():
        t = own.get(k)
        if t is None or not isinstance(v, torch.Tensor):
            continue
        if t.device.type == "meta" or t.shape != v.shape:
            reassign[k] = v
        else:
            t.copy_(v.to(device=t.device, dtype=t.dtype))
    if reassign:
        model.load_state_dict(reassign, strict=False, assign=True)
