"""The recipes' training loop: a plain Accelerate loop with ``RanncAccelerator`` swapped in.

Read top to bottom; everything rannc-specific is the accelerator class and the config file. Used by
``recipes/gpt/pretrain.py`` and ``recipes/bert/pretrain.py``::

    from loop import train
    train(parse_args("gpt"))          # or --trainer: the same job through RanncTrainer

What one run does: build/load data and a tokenizer, build the model from its config, plan and
partition it (the plan is printed), train with a progress bar and periodic loss logs, evaluate,
print per-stage memory/throughput, save an HF checkpoint (``from_pretrained`` loads it), the
tokenizer beside it, ``history.json`` and a loss-curve PNG.
"""

from __future__ import annotations

import json
import math
import os
import time
from types import SimpleNamespace

import torch

from common import (load_model_config, load_raw_text, prepare_datasets, prepare_tokenizer, save_run_args,
                    sync_config_with_tokenizer)


def _model_class(kind: str, config, nsp: bool):
    import transformers as tf

    if kind == "bert":
        return tf.BertForPreTraining if nsp else tf.AutoModelForMaskedLM
    return tf.AutoModelForCausalLM


def _build_model(kind, config, nsp):
    cls = _model_class(kind, config, nsp)
    return cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)


def _rannc_plugin(args):
    from rannc_hf import RanncPlugin

    if args.rannc_config:  # the file, with RANNC_HF_<KEY> variables on top (as under `rannc-hf launch`)
        return RanncPlugin.from_env({**os.environ, "RANNC_HF_CONFIG": args.rannc_config})
    return RanncPlugin.from_env()


def _scheduler(args, optimizer):
    from transformers import get_scheduler

    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, int(0.05 * args.max_steps))
    return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                         num_training_steps=args.max_steps)


def _pin_memory(args) -> bool:
    """Pinned batches and non-blocking copies, on a GPU and only when asked (``--dataloader_pin_memory``).

    Off by default: the DataLoader's pin-memory thread is one more Python thread beside an offload engine's step
    worker, and on an H200 host it took the GPT recipe's CPU-stepped blocks from 14.6-18.1 ms to 28.4-29.0 (loop:
    382-397 ms a step unpinned, 397-408 pinned; RanncTrainer 387 and 386: next72-73), while the pageable copy of a
    batch of token ids costs nothing measurable (BERT-large: 120.5 ms pinned against 121.8)."""
    return bool(getattr(args, "dataloader_pin_memory", False)) and torch.cuda.is_available()


def _num_workers(args) -> int:
    """Collator processes: on a GPU the step is host-bound enough that collating in the training process (7 ms+
    per BERT batch) slows it (BERT-large under 24 GiB on an H200: 120.5 ms/step with 0 workers, 92.2 with 2)."""
    n = getattr(args, "dataloader_num_workers", None)   # validate_args refused a negative count
    return (2 if torch.cuda.is_available() else 0) if n is None else n


def _step_profiler(args):
    """A :class:`StepProfilerCallback` when ``--profile_steps`` asks for one (steps count from 0 in this run)."""
    if not getattr(args, "profile_steps", 0):
        return None
    from rannc_hf.integrations.step_profiler import StepProfilerCallback

    return StepProfilerCallback(os.path.join(args.output_dir, "profile"), start=args.profile_start,
                                steps=args.profile_steps)


def _optimizer(args, model):
    """AdamW over decay / no-decay groups, as RanncTrainer builds it: torch's fused kernel on a GPU (the Trainer's
    default ``adamw_torch_fused``; ``--no-adam_fused`` leaves the choice to torch, which takes ``foreach`` there).
    With offload the engine steps the GPU-kept blocks with the user's kernel, so this keeps the loop and the
    Trainer on the same one; on a CPU torch's default."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = getattr(args, "adam_fused", None)
    fused = torch.cuda.is_available() if fused is None else fused
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             fused=True if fused else None)


def train(args) -> dict:
    """Run one pretraining job described by the recipe's ``args``; returns the loss history."""
    if args.trainer:
        return train_with_trainer(args)
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from rannc_hf import RanncAccelerator
    from rannc_hf.data.pipeline import make_collator, make_dataloader
    from rannc_hf.data.plots import plot_loss_curve
    from rannc_hf.integrations.stats import RanncStatsCallback

    plugin = _rannc_plugin(args)
    if plugin.to_config().step_in_backward and (args.max_grad_norm > 0 or args.gradient_accumulation_steps > 1):
        raise ValueError(f"the rannc config sets step_in_backward: true (offloaded blocks step inside backward, before "
                         f"clipping or accumulation could touch their gradients); pass --max_grad_norm 0 (now "
                         f"{args.max_grad_norm}) and --gradient_accumulation_steps 1 (now "
                         f"{args.gradient_accumulation_steps}; accumulate with the config's num_microbatches), or "
                         f"set step_in_backward: false")
    from accelerate.utils import DataLoaderConfiguration

    pin = _pin_memory(args)
    accelerator = RanncAccelerator(rannc_plugin=plugin,
                                   gradient_accumulation_steps=args.gradient_accumulation_steps,
                                   dataloader_config=DataLoaderConfiguration(non_blocking=pin),
                                   log_with=None if args.report_to == "none" else args.report_to,
                                   project_dir=args.output_dir)
    set_seed(args.seed)
    log = accelerator.print

    # ---- data and tokenizer (built once, on the main process first; others read the cache)
    config = load_model_config(args)
    with accelerator.main_process_first():
        raw = load_raw_text(args)
        tokenizer = prepare_tokenizer(args, config, raw)
        data = prepare_datasets(args, tokenizer, raw)
    sync_config_with_tokenizer(config, tokenizer)
    kind = "clm" if args.kind == "gpt" else "mlm"
    collate = make_collator(tokenizer, kind, seq_len=args.seq_len, mlm_probability=getattr(args, "mlm_probability", 0.15),
                            seed=args.seed)
    loader = dict(num_workers=_num_workers(args), pin_memory=pin)
    train_dl = make_dataloader(data["train"], collate, args.per_device_batch_size, shuffle=True, seed=args.seed,
                               **loader)
    eval_dl = make_dataloader(data["validation"], collate, args.per_device_batch_size, shuffle=False, **loader)

    # ---- model, optimizer, schedule: exactly as on one GPU
    model = _build_model(args.kind, config, getattr(args, "nsp", False))
    optimizer = _optimizer(args, model)
    scheduler = _scheduler(args, optimizer)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {type(model).__name__}, {n_params / 1e6:.2f}M parameters, seq_len {args.seq_len}")
    model, optimizer, train_dl, eval_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, eval_dl, scheduler)
    plan = getattr(model, "plan", None)
    if plan is not None:
        log(plan.summary())
    if getattr(model, "compile_enabled", False):
        log("the first step compiles the stage graphs with torch.compile (about a minute; two with offload, "
            "one graph per offloaded layer): `compile: false` in the rannc config skips it")
    if args.report_to != "none":
        accelerator.init_trackers("pretrain", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

    stats = RanncStatsCallback(print_summary=True).bind(module=model if hasattr(model, "pp_rank") else None,
                                                        plan=plan, num_params=n_params)
    targs = SimpleNamespace(device=accelerator.device, output_dir=args.output_dir)
    stats.on_train_begin(targs, None, None)
    profiler = _step_profiler(args)
    profile_announced = False

    # ---- the loop
    history: list[dict] = []
    step, t_start = 0, time.time()
    data_iter = iter(train_dl)
    # ---- resume: the newest *verified* checkpoint under output_dir/checkpoints (--resume auto, the
    # default); the data order is replayed so the run continues exactly where the checkpoint was taken
    from rannc_hf.reliability import load_checkpoint, resolve_checkpoint, save_checkpoint
    from rannc_hf.reliability.testing import maybe_kill

    ckpt_root = os.path.join(args.output_dir, "checkpoints")
    resume = getattr(args, "resume", "auto") or "none"
    ckpt = None if resume == "none" else resolve_checkpoint(ckpt_root if resume == "auto" else resume)
    if ckpt is None and resume not in ("auto", "none"):
        raise FileNotFoundError(f"--resume {resume}: no complete, verified checkpoint there")
    if ckpt is not None:
        with open(os.path.join(ckpt, "manifest.json")) as f:
            step = int(json.load(f)["step"])
        for _ in range(step * args.gradient_accumulation_steps):   # same batches as an uninterrupted run
            try:
                next(data_iter)
            except StopIteration:
                data_iter = iter(train_dl)
                next(data_iter)
        man = load_checkpoint(accelerator, ckpt)
        history = list(man.get("extra", {}).get("history", []))
        log(f"resumed from {ckpt} (step {step})")
    bar = tqdm(total=args.max_steps, initial=step, desc="training", disable=not accelerator.is_local_main_process)
    running = []
    while step < args.max_steps:
        maybe_kill(step, args.output_dir)   # fault-injection hook for tests (RANNC_HF_TEST_KILL_AT_STEP)
        if profiler is not None:   # outside the stats' step timing: starting and writing a trace is no step's cost
            profiler.on_step_begin(targs, None, None)
        stats.on_step_begin(targs, None, None)
        for _ in range(args.gradient_accumulation_steps):
            try:
                batch = next(data_iter)
            except StopIteration:
                data_iter = iter(train_dl)
                batch = next(data_iter)
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                stats.observe_batch(batch)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            running.append(loss.detach())   # read at the next log: a read per step would stall the host
        stats.on_step_end(targs, None, None)
        if profiler is not None:
            profiler.on_step_end(targs, None, None)
            if profiler.summary_path and not profile_announced:
                profile_announced = True
                log(f"profile of steps {args.profile_start}..{args.profile_start + args.profile_steps - 1}: "
                    f"{profiler.summary_path} (Chrome trace: {profiler.trace_path})")
        step += 1
        bar.update(1)
        if step % args.log_every == 0 or step == args.max_steps:
            loss_mean = torch.stack(running).float().mean().item()
            rec = {"step": step, "loss": loss_mean, "lr": scheduler.get_last_lr()[0],
                   "elapsed_s": round(time.time() - t_start, 2)}
            running = []
            rec.update({k: v for k, v in stats.collect().items() if not k.startswith("rannc/stage")})
            history.append(rec)
            if not math.isfinite(rec["loss"]):
                raise FloatingPointError(
                    f"training diverged: the loss is {rec['loss']} at step {step} (peak learning rate "
                    f"{args.learning_rate:g}); lower --learning_rate, raise --warmup_steps, or resume from the "
                    f"last checkpoint in {ckpt_root} (nothing saved was touched)")
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            log(f"step {step:>5}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
                f"{rec.get('rannc/tokens_per_s', 0):,.0f} tok/s")
            if args.report_to != "none":
                accelerator.log(rec, step=step)
        if args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
            history.append({"step": step, "eval_loss": evaluate(model, eval_dl, accelerator, args.eval_batches)})
            log(f"step {step:>5}  eval_loss {history[-1]['eval_loss']:.4f}")
        if args.save_every and step % args.save_every == 0 and step < args.max_steps:
            save_checkpoint(accelerator, ckpt_root, step, keep=2, extra={"history": history})
    bar.close()
    if profiler is not None:
        profiler.on_train_end(targs, None, None)   # the run ended inside the profiled window: keep what was traced
    # the summary covers training, as RanncTrainer's does (its evaluation comes after): taken after the final
    # evaluation it counted that evaluation's block fetches, and the wall time of the last step's CPU-stepped blocks
    # while the evaluation started (GPT-2 1.3B on an H200: 79 ms a block instead of 34; docs/offload.md)
    stats.finish(targs, SimpleNamespace(global_step=step, is_world_process_zero=accelerator.is_main_process))
    final_eval = evaluate(model, eval_dl, accelerator, args.eval_batches)
    history.append({"step": step, "eval_loss": final_eval})
    log(f"final eval_loss {final_eval:.4f} (perplexity {math.exp(min(final_eval, 50)):.1f})")

    # ---- save: HF checkpoint + tokenizer + history + loss curve
    accelerator.wait_for_everyone()
    accelerator.save_model(model, args.output_dir)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
        save_run_args(args)
        with open(os.path.join(args.output_dir, "history.json"), "w") as f:
            json.dump(history, f, indent=1)
        if not args.no_plot:
            path = plot_loss_curve(history, os.path.join(args.output_dir, "loss.png"),
                                   title=f"{config.model_type} pretraining ({n_params / 1e6:.1f}M params)")
            log(f"loss curve: {path}")
        log(f"checkpoint: {args.output_dir} (load with AutoModel*.from_pretrained)")
    accelerator.end_training()
    return {"history": history}


@torch.no_grad()
def evaluate(model, eval_dl, accelerator, max_batches: int) -> float:
    """Mean validation loss over at most ``max_batches`` batches (same value on every rank)."""
    was_training = model.training
    model.eval()
    losses = []
    for i, batch in enumerate(eval_dl):
        if i >= max_batches:
            break
        loss = model(**batch).loss
        losses.append(accelerator.gather_for_metrics(loss.detach().reshape(1)).float().mean())
    if was_training:
        model.train()
    return float(torch.stack(losses).mean()) if losses else float("nan")


def eval_subset(validation, args):
    """The validation rows RanncTrainer evaluates: the first ``--eval_batches`` batches, as the loop's ``evaluate``
    reads on one replica (RanncTrainer runs its whole evaluation set on every replica; the loop's replicas each
    read their own shard, so with data parallelism the loop sees ``dp`` times as many rows)."""
    rows = args.eval_batches * args.per_device_batch_size
    return validation.select(range(rows)) if len(validation) > rows else validation


def train_with_trainer(args) -> dict:
    """The same job through :class:`rannc_hf.RanncTrainer` (``--trainer``)."""
    from transformers import set_seed

    from rannc_hf import RanncTrainer
    from rannc_hf.data.pipeline import make_collator
    from rannc_hf.data.plots import plot_loss_curve

    set_seed(args.seed)
    config = load_model_config(args)
    raw = load_raw_text(args)
    tokenizer = prepare_tokenizer(args, config, raw)
    data = prepare_datasets(args, tokenizer, raw)
    sync_config_with_tokenizer(config, tokenizer)
    model = _build_model(args.kind, config, getattr(args, "nsp", False))
    collate = make_collator(tokenizer, "clm" if args.kind == "gpt" else "mlm", seq_len=args.seq_len, seed=args.seed)
    targs = _trainer_args(args)
    profiler = _step_profiler(args)
    eval_data = eval_subset(data["validation"], args)
    trainer = RanncTrainer(model=model, args=targs, train_dataset=data["train"],
                           eval_dataset=eval_data, data_collator=collate, processing_class=tokenizer,
                           callbacks=[profiler] if profiler is not None else None)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(args.output_dir)
    history = [h for h in trainer.state.log_history if "loss" in h or "eval_loss" in h]
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, "history.json"), "w") as f:
            json.dump(history, f, indent=1)
        if not args.no_plot:
            plot_loss_curve(history, os.path.join(args.output_dir, "loss.png"))
        print(f"final eval_loss {metrics.get('eval_loss', float('nan')):.4f} over {len(eval_data)} validation "
              f"sequences; checkpoint: {args.output_dir}")
    return {"history": history}


def _trainer_args(args):
    from rannc_hf import RanncTrainingArguments

    pin = _pin_memory(args)
    return RanncTrainingArguments(
        output_dir=args.output_dir, rannc_config=args.rannc_config or os.environ.get("RANNC_HF_CONFIG"),
        per_device_train_batch_size=args.per_device_batch_size, per_device_eval_batch_size=args.per_device_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_steps=args.max_steps,
        learning_rate=args.learning_rate, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, lr_scheduler_type=args.lr_scheduler_type, max_grad_norm=args.max_grad_norm,
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else max(1, int(0.05 * args.max_steps)),
        logging_steps=args.log_every, eval_strategy="steps" if args.eval_every else "no",
        eval_steps=args.eval_every or None, save_strategy="steps" if args.save_every else "no",
        save_steps=args.save_every or 500, report_to=[] if args.report_to == "none" else [args.report_to],
        seed=args.seed, dataloader_drop_last=True, remove_unused_columns=False,
        dataloader_num_workers=_num_workers(args), dataloader_pin_memory=pin,
        accelerator_config={"non_blocking": pin},
        **({"optim": "adamw_torch"} if getattr(args, "adam_fused", None) is False else {}),   # torch's own choice
    )
