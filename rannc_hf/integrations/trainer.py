"""The Transformers ``Trainer`` on an automatically partitioned model: :class:`RanncTrainer`.

    # torchrun --nproc_per_node 4 train.py      (2 pipeline stages x 2 data-parallel replicas)
    from rannc_hf import RanncConfig, RanncTrainer, RanncTrainingArguments

    args = RanncTrainingArguments(
        output_dir="out", per_device_train_batch_size=8,   # per data-parallel replica (one pipeline)
        gradient_accumulation_steps=2, max_grad_norm=1.0, bf16=True,
        logging_steps=10, eval_strategy="steps", eval_steps=100, save_steps=100, save_total_limit=2,
        report_to=["tensorboard"],
        rannc_config=RanncConfig(num_stages=2, num_microbatches=4))  # or "rannc.yaml", or a dict
    trainer = RanncTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                           processing_class=tokenizer, compute_metrics=compute_metrics)
    trainer.train()                     # rannc/... stats in the logs and TensorBoard
    trainer.save_model("out/final")     # HF layout: AutoModelFor*.from_pretrained("out/final") works

What differs from ``Trainer`` (everything else is the stock Trainer):

- The model is wrapped into a :class:`rannc_hf.RanncModule` in ``_wrap_model``; it is never moved whole onto a
  device (``place_model_on_device`` is False). ``bf16``/``fp16`` set ``RanncConfig.precision``; with neither,
  a precision the config states itself is kept (fp32 otherwise). The runtime casts; Accelerate's autocast and
  grad scaler are not used.
- ``per_device_train_batch_size`` is the batch of one data-parallel replica (one pipeline). The train
  dataloader is sharded by the replica index: all ranks of one pipeline see the same batch. The total batch
  per optimizer step is ``per_device_train_batch_size * gradient_accumulation_steps * dp_size``.
- The loss of one call is the mean of the per-microbatch losses (each the model's own mean), divided by the
  gradient accumulation steps; ``num_items_in_batch`` token weighting is not used (see docs/trainer.md).
- ``max_grad_norm`` clips by the global norm over all stages (``RanncModule.clip_grad_norm_``).
- Evaluation and ``predict``: every replica runs the whole eval set (it is not sharded), and the results are
  not gathered across ranks (each rank already holds all of them).
- Checkpoints hold the full gathered weights in HF layout (``model.safetensors``), the optimizer state
  (``optimizer.pt`` when the runtime gathers it, else one ``optimizer_pp{p}_dp{d}.pt`` per rank),
  ``scheduler.pt``, per-rank RNG states and the trainer state (data position), so ``resume_from_checkpoint``
  continues step for step.
- :class:`~rannc_hf.RanncStatsCallback` is added by default (``rannc_stats=False`` in the arguments turns it off).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments

from ..config import CONFIG_ENV, RanncConfig, env_config_values, read_yaml
from ..errors import CheckpointError, ConfigError
from .stats import RanncStatsCallback

__all__ = ["RanncTrainer", "RanncTrainingArguments", "RanncStatsCallback"]

logger = logging.getLogger(__name__)

OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"


# ---------------------------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RanncTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the rannc_hf configuration.

    ``rannc_config`` is a :class:`~rannc_hf.RanncConfig`, a dict of its keys, or the path of a YAML file;
    ``None`` reads ``$RANNC_HF_CONFIG`` / ``RANNC_HF_*`` (``RanncConfig.from_env()``). ``bf16``/``fp16`` decide
    ``precision``; with neither set, the precision the config states (YAML/dict key, ``RANNC_HF_PRECISION``) is
    kept, else ``fp32``. ``logging_nan_inf_filter`` defaults to ``False`` (the stock default syncs every step).
    """

    rannc_config: Optional[Union[str, dict, RanncConfig]] = field(
        default=None, metadata={"help": "RanncConfig, dict of its keys, or a YAML path; None: from the environment"})
    rannc_stats: bool = field(default=True, metadata={"help": "add RanncStatsCallback (per-stage memory/throughput)"})
    # The stock default (True) checks every step's loss for NaN/inf on the host: two device syncs a step, which
    # leave the GPU idle while the host catches up (BERT-large recipe on an H200: 105.7 vs 92.3 ms/step), and it
    # hides a diverged loss in the log behind the running mean. False logs the loss as it is.
    logging_nan_inf_filter: bool = field(default=False, metadata={
        "help": "replace NaN/inf step losses in the logged loss by the running mean (stock Trainer default; "
                "syncs the device every step)"})

    def __post_init__(self):
        super().__post_init__()
        self.rannc_config = resolve_rannc_config(self.rannc_config, bf16=self.bf16, fp16=self.fp16)

    @property
    def place_model_on_device(self) -> bool:
        return False

    def to_dict(self) -> dict:
        d = super().to_dict()
        if isinstance(d.get("rannc_config"), RanncConfig):
            d["rannc_config"] = d["rannc_config"].to_dict()
        return d


def resolve_rannc_config(value: Any, bf16: bool = False, fp16: bool = False) -> RanncConfig:
    """A :class:`RanncConfig` from a config, dict, YAML path or ``None`` (environment), with the Trainer precision.

    The Trainer's ``bf16``/``fp16`` flags win when one is set (with a warning if the config states another
    precision). With neither set, a precision the config states itself (a YAML or dict key, or
    ``RANNC_HF_PRECISION``) is kept, and ``fp32`` is used otherwise, as the stock Trainer would.
    """
    if value is None or isinstance(value, (str, os.PathLike)):
        environ = dict(os.environ) if value is None else {**os.environ, CONFIG_ENV: os.fspath(value)}
        cfg = RanncConfig.from_env(environ)  # validates the file and the variables
        valid = RanncConfig.valid_keys()
        stated = env_config_values(valid, lambda path: read_yaml(path, valid) or {}, environ).get("precision")
    elif isinstance(value, RanncConfig):
        cfg = RanncConfig.from_dict(value.to_dict())
        stated = cfg.precision if cfg.precision != "bf16" else None  # bf16 is also the dataclass default
    elif isinstance(value, dict):
        cfg = RanncConfig.from_dict(value)
        stated = value.get("precision")
    else:
        raise ConfigError(f"rannc_config: expected a RanncConfig, a dict or a YAML path, got {type(value).__name__}")
    flagged = "bf16" if bf16 else "fp16" if fp16 else None
    if flagged and stated and stated != flagged:
        warnings.warn(f"rannc_config precision={stated!r} is overridden by the Trainer flags "
                      f"(bf16={bf16}, fp16={fp16}) -> {flagged!r}", stacklevel=3)
    cfg.precision = flagged or stated or "fp32"
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------------------------
class RanncTrainer(Trainer):
    """A ``transformers.Trainer`` that trains the model partitioned by rannc_hf (pipeline x data parallel).

    Takes the Trainer's arguments; ``args`` should be :class:`RanncTrainingArguments` (plain
    ``TrainingArguments`` get the config from the environment). Extra keyword ``rannc_config`` overrides
    ``args.rannc_config``.
    """

    def __init__(self, model: Optional[nn.Module] = None, args: Optional[TrainingArguments] = None, *a,
                 rannc_config: Optional[Union[str, dict, RanncConfig]] = None, **kw):
        if args is None:
            args = RanncTrainingArguments(output_dir="tmp_trainer")
        if rannc_config is None and isinstance(getattr(args, "rannc_config", None), RanncConfig):
            # resolved in __post_init__; resolving again would lose the precision a YAML stated
            self.rannc_config: RanncConfig = RanncConfig.from_dict(args.rannc_config.to_dict())
        else:
            cfg_src = rannc_config if rannc_config is not None else getattr(args, "rannc_config", None)
            self.rannc_config = resolve_rannc_config(cfg_src, bf16=args.bf16, fp16=args.fp16)
        if self.rannc_config.step_in_backward and (args.max_grad_norm or args.gradient_accumulation_steps > 1):
            raise ValueError(
                f"rannc config step_in_backward=true steps offloaded blocks inside backward, before any clipping or "
                f"accumulation could touch their gradients; set max_grad_norm=0 (now {args.max_grad_norm}) and "
                f"gradient_accumulation_steps=1 (now {args.gradient_accumulation_steps}; use the config's "
                f"num_microbatches to accumulate), or set step_in_backward=false")
        self._rannc_module = None
        self._rannc_stats: Optional[RanncStatsCallback] = None
        super().__init__(model, args, *a, **kw)
        self.place_model_on_device = False
        # the runtime owns precision and loss scaling; Accelerate's scaler must not touch our optimizer
        if getattr(self.accelerator, "scaler", None) is not None:
            self.accelerator.scaler = None
        # the loss is the runtime's mean over microbatches; token-count weighting is not passed through
        self.model_accepts_loss_kwargs = False
        if getattr(args, "rannc_stats", True):
            cb = next((c for c in self.callback_handler.callbacks if isinstance(c, RanncStatsCallback)), None)
            self._rannc_stats = cb or RanncStatsCallback()
            self._insert_first(self._rannc_stats)

    # ---- the RanncModule ---------------------------------------------------------------------------------
    def _insert_first(self, cb) -> None:
        cbs = self.callback_handler.callbacks
        self.callback_handler.callbacks = [cb] + [c for c in cbs if c is not cb]

    @property
    def rannc_module(self):
        """The :class:`rannc_hf.RanncModule` (``None`` before the first dataloader / wrap)."""
        return self._rannc_module

    def _example_batch(self) -> Optional[dict]:
        """One replica batch collated from the first training samples (no RNG consumed)."""
        ds = self.train_dataset if self.train_dataset is not None else self.eval_dataset
        if isinstance(ds, dict):
            ds = next(iter(ds.values()))
        if ds is None or not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
            return None
        bs = min(self._train_batch_size, len(ds))
        collator = self.data_collator
        try:
            import datasets  # noqa: F401

            if isinstance(ds, datasets.Dataset):
                ds = self._remove_unused_columns(ds, description="example batch")
                samples = [ds[i] for i in range(bs)]
            else:
                samples = [ds[i] for i in range(bs)]
                collator = self._get_collator_with_removed_columns(collator, description="example batch")
        except ImportError:
            samples = [ds[i] for i in range(bs)]
            collator = self._get_collator_with_removed_columns(collator, description="example batch")
        batch = collator(samples)
        return {k: v for k, v in dict(batch).items()}

    def _ensure_module(self):
        if self._rannc_module is not None:
            return self._rannc_module
        from ..runtime import RanncModule

        # the optimizer is built over the full model first; RanncModule keeps only the local params in it
        if self.optimizer is None:
            self.create_optimizer()
        example = self._example_batch()
        num_params = sum(p.numel() for p in self.model.parameters())  # before the module frees non-local params
        kwargs: dict[str, Any] = {"config": self.rannc_config, "local_batch": True}
        if example is not None:
            kwargs["example_batch"] = example
        self._rannc_module = RanncModule(self.model, self.optimizer, **kwargs)
        m = self._rannc_module
        if self._rannc_stats is not None:
            self._rannc_stats.bind(m, num_params=num_params,
                                   device=self._module_device(), precision=self.rannc_config.precision)
        # route any remaining Accelerate clipping to the global pipeline norm
        self.accelerator.clip_grad_norm_ = lambda parameters, max_norm, norm_type=2: m.clip_grad_norm_(max_norm)
        return m

    def _module_device(self) -> torch.device:
        dev = getattr(self._rannc_module, "device", None)
        if isinstance(dev, torch.device):
            return dev
        return self.args.device

    @property
    def dp_rank(self) -> int:
        return int(getattr(self._ensure_module(), "dp_rank", 0))

    @property
    def dp_size(self) -> int:
        return int(getattr(self._ensure_module(), "dp_size", 1))

    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader: Optional[DataLoader] = None):
        return self._ensure_module()

    def create_optimizer(self, model=None):
        if self._rannc_module is not None and self.optimizer is not None:
            return self.optimizer
        return super().create_optimizer() if model is None else super().create_optimizer(model)

    # ---- data ----------------------------------------------------------------------------------------------
    def _prepare_loader(self, loader: DataLoader, num_processes: int, process_index: int) -> DataLoader:
        """Accelerate's dataloader preparation, sharded over ``num_processes`` (the dp replicas), not the world."""
        from accelerate.data_loader import prepare_data_loader

        acc = self.accelerator
        kw = dict(num_processes=num_processes, process_index=process_index, split_batches=acc.split_batches,
                  put_on_device=acc.device_placement, rng_types=list(acc.rng_types or []), dispatch_batches=False,
                  even_batches=acc.even_batches, use_seedable_sampler=acc.use_seedable_sampler,
                  non_blocking=getattr(acc, "non_blocking", False),
                  use_stateful_dataloader=getattr(acc, "use_stateful_dataloader", False))
        data_seed = getattr(getattr(acc, "dataloader_config", None), "data_seed", None)
        if data_seed is not None:
            kw["data_seed"] = data_seed
        try:
            prepared = prepare_data_loader(loader, acc.device, **kw)
        except TypeError:  # older accelerate without some keyword
            for k in ("data_seed", "non_blocking", "use_stateful_dataloader"):
                kw.pop(k, None)
            prepared = prepare_data_loader(loader, acc.device, **kw)
        acc._dataloaders.append(prepared)
        return prepared

    @contextlib.contextmanager
    def _sharded_prepare(self, num_processes: int, process_index: int):
        acc = self.accelerator
        orig = acc.prepare

        def prepare(*objs, **kw):
            if len(objs) == 1 and isinstance(objs[0], DataLoader):
                return self._prepare_loader(objs[0], num_processes, process_index)
            return orig(*objs, **kw)

        acc.prepare = prepare
        try:
            yield
        finally:
            try:
                del acc.prepare
            except AttributeError:
                acc.prepare = orig

    def get_train_dataloader(self) -> DataLoader:
        self._ensure_module()
        with self._sharded_prepare(self.dp_size, self.dp_rank):
            return super().get_train_dataloader()

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        with self._sharded_prepare(1, 0):
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset) -> DataLoader:
        with self._sharded_prepare(1, 0):
            return super().get_test_dataloader(test_dataset)

    def get_total_train_batch_size(self, args) -> int:
        return self._train_batch_size * args.gradient_accumulation_steps * self.dp_size

    # ---- training ------------------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        if self._rannc_stats is not None:
            self._rannc_stats.observe_batch(inputs)
        out = model(**inputs)
        loss = _loss_of(out)
        steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        loss = loss / steps
        loss.backward()
        return loss.detach().to(self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        loss = _loss_of(out)
        return (loss, out) if return_outputs else loss

    def _clip_grad_norm(self, model):
        return self._ensure_module().clip_grad_norm_(self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None and self.rannc_config.step_in_backward:
            return None   # the gradients were consumed by the step inside backward
        if grad_norm is None:
            grad_norm = self._ensure_module().clip_grad_norm_(float("inf"))
        return grad_norm

    def log(self, logs: dict, start_time: Optional[float] = None, *a, **kw) -> None:
        cb = self._rannc_stats
        if cb is not None and cb.is_train_log(logs) and "rannc/step_time_s" not in logs:
            logs.update(cb.collect(self.args, self.state))  # a collective: every rank logs at the same steps
        if start_time is None and not a and not kw:
            return super().log(logs)
        return super().log(logs, start_time, *a, **kw)

    # ---- evaluation ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _local_gather(self):
        """Every rank evaluates the whole set: gathering across ranks would duplicate samples."""
        acc = self.accelerator
        names = [n for n in ("gather_for_metrics", "gather", "pad_across_processes") if hasattr(acc, n)]
        ident = {
            "gather_for_metrics": lambda data, use_gather_object=False: data,
            "gather": lambda data: data,
            "pad_across_processes": lambda data, dim=0, pad_index=0, pad_first=False: data,
        }
        for n in names:
            setattr(acc, n, ident[n])
        try:
            yield
        finally:
            for n in names:
                try:
                    delattr(acc, n)
                except AttributeError:
                    pass

    def evaluation_loop(self, *a, **kw):
        self._ensure_module()
        with self._local_gather():
            return super().evaluation_loop(*a, **kw)

    def prediction_step(self, model: nn.Module, inputs: dict, prediction_loss_only: bool,
                        ignore_keys: Optional[list[str]] = None):
        """Loss (and logits) of one eval batch: from the runtime's forward-only path when it has one, else from
        the original model class evaluated on the gathered weights (see :meth:`_eval_model`)."""
        inputs = self._prepare_inputs(inputs)
        has_labels = len(self.label_names) > 0 and all(inputs.get(k) is not None for k in self.label_names)
        labels = None
        if has_labels:
            labels = tuple(inputs.get(n) for n in self.label_names)
            labels = labels[0] if len(labels) == 1 else labels
        if ignore_keys is None:
            ignore_keys = list(getattr(getattr(self.model, "config", None), "keys_to_ignore_at_inference", []) or [])
        with torch.no_grad():
            out = self._eval_forward(inputs, need_logits=not prediction_loss_only)
        loss = None
        if has_labels or getattr(out, "loss", None) is not None:
            lv = _loss_of(out) if not isinstance(out, dict) or "loss" in out else None
            loss = lv.detach().mean() if isinstance(lv, torch.Tensor) else None
        if prediction_loss_only:
            return loss, None, None
        if isinstance(out, dict):
            logits = tuple(v for k, v in out.items() if k not in ignore_keys + ["loss"])
        elif isinstance(out, (tuple, list)):
            logits = tuple(out[1:] if has_labels else out)
        else:
            logits = (out,) if isinstance(out, torch.Tensor) and out.dim() > 0 else ()
        logits = logits[0] if len(logits) == 1 else (logits or None)
        return loss, logits, labels

    def _eval_forward(self, inputs: dict, need_logits: bool):
        m = self._ensure_module()
        # a forward-only path of the runtime (returns logits from the last stage on every rank)
        for name in ("eval_forward", "forward_eval", "predict"):
            fn = getattr(m, name, None)
            if callable(fn):
                return fn(**inputs)
        return self._eval_model()(**inputs)

    def _eval_model(self) -> nn.Module:
        """Fallback evaluation model: the user's model class with the full gathered weights, on this rank.

        Correct but not partitioned: the whole model must fit on one device for evaluation. The gathered
        weights are refreshed at most once per optimizer step.
        """
        step = self.state.global_step
        cache = getattr(self, "_rannc_eval_cache", None)
        if cache is not None and cache[0] == step:
            return cache[1]
        import copy

        m = self._ensure_module()
        sd = m.state_dict()  # collective: every rank evaluates the same batches in the same order
        base = getattr(m, "original_model", None) or self.model
        model = cache[1] if cache is not None else copy.deepcopy(base)
        with torch.no_grad():
            # non-local parameters of the original model are freed by the runtime: set .data, any shape
            for k, t in model.state_dict(keep_vars=True).items():
                if isinstance(t, torch.Tensor) and k in sd:
                    t.data = sd[k].detach().to("cpu").clone()
        model.eval()
        dev = self.args.device
        model.to(dev)
        self._rannc_eval_cache = (step, model)
        return model

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Write an HF directory (config, full gathered safetensors, tied weights once, tokenizer). Call on every rank."""
        from .checkpoint import save_full_model

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        m = self._rannc_module
        sd = m.state_dict() if m is not None else None  # gathered: a collective on every rank
        if self.args.should_save:
            save_full_model(self.model, output_dir, state_dict=sd if sd is not None else self.model.state_dict(),
                            safe_serialization=True)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            elif getattr(self.data_collator, "tokenizer", None) is not None:
                self.data_collator.tokenizer.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        _barrier()
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=getattr(self.args, "hub_revision", None))

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        self.save_model(output_dir, _internal_call=True)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        m = self._ensure_module()
        osd = m.optimizer_state_dict()
        gathered = bool(getattr(m, "optimizer_state_is_full", True))  # RanncModule gathers it on every rank
        os.makedirs(output_dir, exist_ok=True)
        if gathered:
            if self.args.should_save:
                torch.save(osd, os.path.join(output_dir, OPTIMIZER_NAME))
        else:
            torch.save(osd, os.path.join(output_dir, _rank_optimizer_name(m)))
        if self.args.should_save and self.lr_scheduler is not None:
            with warnings.catch_warnings(record=True):
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
        _barrier()

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        if checkpoint is None:
            return
        m = self._ensure_module()
        per_rank = os.path.join(checkpoint, _rank_optimizer_name(m))
        full = os.path.join(checkpoint, OPTIMIZER_NAME)
        path = per_rank if os.path.isfile(per_rank) else full
        if not os.path.isfile(path):
            raise CheckpointError(f"no optimizer state in {checkpoint!r} (looked for {os.path.basename(per_rank)} "
                                  f"and {OPTIMIZER_NAME})")
        m.load_optimizer_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        sched = os.path.join(checkpoint, SCHEDULER_NAME)
        if self.lr_scheduler is not None and os.path.isfile(sched):
            with warnings.catch_warnings(record=True):
                self.lr_scheduler.load_state_dict(torch.load(sched, map_location="cpu", weights_only=True))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        sd = _read_weights(resume_from_checkpoint)
        m = self._rannc_module
        if m is not None:
            m.load_state_dict(sd)
            return
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        tied = _tied_aliases(self.model)
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {resume_from_checkpoint!r} does not match the model: missing "
                                  f"{missing[:5]}, unexpected {list(unexpected)[:5]}")
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None:
            return
        self._load_from_checkpoint(best)


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def _loss_of(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is None and isinstance(out, (tuple, list)):
        loss = out[0]
    if loss is None:
        raise ValueError("the model returned no loss; pass `labels` in the batch (RanncTrainer trains on the "
                         "model's own loss)")
    return loss


def _is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _barrier() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _rank_optimizer_name(m) -> str:
    return f"optimizer_pp{int(getattr(m, 'pp_rank', 0))}_dp{int(getattr(m, 'dp_rank', 0))}.pt"


def _read_weights(checkpoint: str) -> dict:
    """The full state dict of an HF checkpoint directory (safetensors, sharded or not)."""
    import json

    from safetensors.torch import load_file

    single = os.path.join(checkpoint, "model.safetensors")
    index = os.path.join(checkpoint, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
        sd: dict = {}
        for f in files:
            sd.update(load_file(os.path.join(checkpoint, f)))
        return sd
    raise CheckpointError(f"no model.safetensors in {checkpoint!r}")


def _tied_aliases(model: nn.Module) -> set[str]:
    seen: dict[int, str] = {}
    aliases: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases.add(name)
        else:
            seen[id(p)] = name
    return aliases
