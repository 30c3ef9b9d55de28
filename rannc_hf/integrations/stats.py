"""Per-stage memory and throughput statistics for the Hugging Face ``Trainer``: :class:`RanncStatsCallback`.

    from transformers import Trainer, TrainingArguments
    from rannc_hf import RanncStatsCallback

    trainer = Trainer(model=model, args=TrainingArguments("out", logging_steps=10, report_to=["tensorboard"]),
                      train_dataset=ds)
    RanncStatsCallback().attach(trainer)   # first in the callback list, so every tracker sees its keys
    trainer.train()                        # log_history / TensorBoard get rannc/... keys;
                                           # out/rannc_stats.json holds the per-stage summary

:class:`~rannc_hf.RanncTrainer` adds the callback by itself and merges its keys into the logs before
``Trainer.log`` appends them to ``state.log_history`` (so every tracker sees them too).

At every training log step (``logging_steps``) the callback reports, per pipeline stage (and per
data-parallel replica when there is more than one):

========================================  =====================================================================
key                                       meaning
========================================  =====================================================================
``rannc/stage{s}/peak_mem_gib``           peak device memory since training began (GPU: ``max_memory_allocated``;
                                          CPU: peak process RSS), max over the stage's replicas
``rannc/stage{s}/mem_gib``                current device memory (GPU: ``memory_allocated``; CPU: RSS), max over replicas
``rannc/stage{s}/tokens_per_s``           tokens through the stage per second (sum over its replicas)
``rannc/stage{s}/samples_per_s``          samples through the stage per second (sum over its replicas)
``rannc/stage{s}/tflops``                 achieved TFLOP/s of the stage (its share of the step's FLOPs)
``rannc/stage{s}/mfu``                    ``tflops`` / peak TFLOP/s of one device (absent without a device profile)
``rannc/stage{s}/dp{r}/...``              the same per replica ``r`` (only when there are 2+ replicas)
``rannc/tokens_per_s``                    global tokens per second (all replicas)
``rannc/samples_per_s``                   global samples per second
``rannc/tflops``, ``rannc/mfu``           achieved TFLOP/s of all devices, and MFU against ``num_devices * peak``
``rannc/step_time_s``                     measured time of one optimizer step (mean since the last log,
                                          slowest rank). On a GPU: CUDA events around each step, read at the
                                          log, so the host never waits for the device between steps
``rannc/predicted_step_time_s``           the plan's predicted step time (absent without a plan)
``rannc/bubble_fraction``                 pipeline bubble: measured when the runtime reports busy time, else the
                                          plan's prediction, else the analytic ``(S-1)/(M+S-1)``; 0 with one stage
``rannc/predicted_bubble_fraction``       the plan's (or the analytic) prediction
``rannc/num_stages``, ``rannc/dp_size``   the layout
========================================  =====================================================================

Values from other ranks are gathered with ``torch.distributed.all_gather`` of float64 tensors (no
pickling); every rank computes the same dict. FLOPs per step come from ``plan.flops_per_step`` when the
plan has them, else ``6 * parameters * tokens``. Peak FLOP/s come from ``rannc_hf.profile.devices`` when
that module knows the device, or from ``peak_tflops=``; without either MFU is left out.

When the module offloads, the end-of-training summary (printed, and ``rannc_stats.json``'s ``offload``) adds the
offload engine's per-step means on the writing rank: bytes to and from the GPU, the host optimizer step and the
resident group's share of it, the step's thread count and the host store's size (:func:`offload_summary`).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from typing import Any, Optional

import torch

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a hard dependency
    TrainerCallback = object  # type: ignore[misc,assignment]

logger = logging.getLogger(__name__)

GIB = float(2**30)
STATS_FILE = "rannc_stats.json"

# Slots of the per-rank vector that is all-gathered at each log step.
_FIELDS = ("stage", "dp_rank", "peak_mem", "mem", "tokens", "samples", "time", "steps", "busy", "num_params",
           "tot_tokens", "tot_samples", "tot_time", "tot_steps", "first_step_time")
_N = len(_FIELDS)


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # pragma: no cover
        return 0


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def device_memory(device: Optional[torch.device] = None) -> tuple[int, int]:
    """``(current, peak)`` bytes: CUDA allocator figures on a GPU, process RSS on the CPU."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.memory_allocated(device)), int(torch.cuda.max_memory_allocated(device))
    cur = _rss_bytes()
    return cur, max(cur, _peak_rss_bytes())


def peak_flops_of(device: Optional[torch.device], precision: str = "bf16", profile: Any = None) -> Optional[float]:
    """Peak FLOP/s of one device from ``rannc_hf.profile.devices`` (guarded: ``None`` when unknown).

    ``profile`` may name a profile (``"h200"``), be a ``DeviceProfile`` or a JSON path; default: the local device
    (a GPU when ``device`` is CUDA; on a CPU ``None`` unless a profile is given, since the built-in
    CPU profile is too rough for an MFU figure).
    """
    try:
        from rannc_hf.profile import devices as _dev  # written separately; optional
    except Exception:
        return None
    try:
        if profile is None:
            if device is None or device.type != "cuda":
                # the built-in CPU profile is a rough guess: an MFU against it would mislead; pass
                # peak_tflops= or a calibrated profile (rannc-hf calibrate) to get CPU MFU figures
                return None
            profile = "auto"
        prof = _dev.get_profile(profile)
        v = prof.peak_flops(precision)
        return float(v) if v else None
    except Exception:
        return None


def _count_batch(inputs: Any) -> tuple[int, int]:
    """``(samples, tokens)`` of a batch: first dimension and element count of ``input_ids`` (or the first tensor)."""
    if not isinstance(inputs, dict):
        return 0, 0
    t = inputs.get("input_ids")
    if not isinstance(t, torch.Tensor):
        t = next((v for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        if t is None:
            return 0, 0
        return int(t.shape[0]), 0
    return int(t.shape[0]) if t.dim() > 0 else 1, int(t.numel())


def offload_summary(module, since: Optional[dict] = None) -> Optional[dict]:
    """Per-step means of ``module``'s offload engine counters (this rank's stages), or None without offload:
    bytes each way, the host optimizer step (its resident-group part, which the next forward waits for, and its
    CPU-stepped blocks), host store size. Counted from the engine's start, or from the counters ``since`` (the
    callback passes those after the first step, which builds and compiles)."""
    st = _engine_counters(module)
    if not st:
        return None
    if since:
        st = {k: (v - since.get(k, 0) if isinstance(v, (int, float)) and k in _OFFLOAD_COUNTERS else v)
              for k, v in st.items()}
    n = max(1, int(st.get("steps", 0)))
    blocks = max(1, st.get("cpu_block_steps", 0))
    return {"mode": st.get("mode"), "stage_modes": st.get("stage_modes"), "steps": int(st.get("steps", 0)),
            "h2d_gb_per_step": st.get("h2d_bytes", 0) / n / 1e9, "d2h_gb_per_step": st.get("d2h_bytes", 0) / n / 1e9,
            "host_step_ms": st.get("step_time_s", 0.0) / n * 1e3,
            "rest_step_ms": st.get("rest_step_time_s", 0.0) / n * 1e3,
            "host_step_threads": int(st.get("host_step_threads", 0)),
            "cpu_block_steps_per_step": st.get("cpu_block_steps", 0) / n,
            "cpu_block_step_ms": st.get("cpu_block_step_time_s", 0.0) / blocks * 1e3,
            "cpu_block_refill_ms": st.get("cpu_block_refill_time_s", 0.0) / blocks * 1e3,
            "early_block_steps_per_step": st.get("early_block_steps", 0) / n,
            "worker_busy_ms": st.get("worker_task_time_s", 0.0) / n * 1e3,
            "worker_overlap_ms": st.get("worker_overlap_s", 0.0) / n * 1e3,
            "worker_threads": int(st.get("worker_threads", 0)),
            "host_gib": st.get("host_bytes", 0) / 2**30}


def _engine_counters(module) -> Optional[dict]:
    """``module.offload_stats()`` (a RanncModule's offload engine counters), or None without one."""
    fn = getattr(module, "offload_stats", None)
    return fn() if callable(fn) else None


#: offload engine counters that add up over steps (the others are states or peaks)
_OFFLOAD_COUNTERS = frozenset({"h2d_bytes", "d2h_bytes", "step_time_s", "rest_step_time_s", "cpu_block_step_time_s",
                               "cpu_block_refill_time_s", "cpu_block_steps", "early_block_steps", "steps",
                               "worker_task_time_s", "worker_overlap_s"})


def analytic_bubble(num_stages: int, num_microbatches: int) -> float:
    """Idle fraction of a GPipe / 1F1B pipeline: ``(S - 1) / (M + S - 1)``."""
    if num_stages <= 1:
        return 0.0
    m = max(1, num_microbatches)
    return (num_stages - 1) / (m + num_stages - 1)


def _fmt_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# the callback
# ---------------------------------------------------------------------------------------------------------------
class RanncStatsCallback(TrainerCallback):
    """Reports per-stage (and per-replica) memory, throughput, TFLOP/s, MFU and pipeline bubble at each log step.

    Args:
        peak_tflops: peak TFLOP/s of one device, overriding the device profile (for MFU).
        device_profile: a ``rannc_hf.profile.devices`` profile name / object / JSON path (default: the local device).
        print_summary: print the per-stage table at the end of training (main process only).
        stats_file: name of the JSON summary written to ``args.output_dir`` (``None``: don't write).
        per_replica: also emit ``rannc/stage{s}/dp{r}/...`` keys when a stage has 2+ replicas.
    """

    def __init__(self, peak_tflops: Optional[float] = None, print_summary: bool = True,
                 stats_file: Optional[str] = STATS_FILE, per_replica: bool = True, device_profile: Any = None):
        self.peak_tflops = peak_tflops
        self.device_profile = device_profile
        self.print_summary = print_summary
        self.stats_file = stats_file
        self.per_replica = per_replica
        self.module = None            # a RanncModule (set by RanncTrainer / bind())
        self.plan = None
        self.num_params: Optional[int] = None
        self.device: Optional[torch.device] = None
        self.precision = "bf16"
        self.summary: Optional[dict] = None
        self.last_stats: dict[str, float] = {}
        self._reset_totals()

    # ---- wiring --------------------------------------------------------------------------------------------
    def attach(self, trainer) -> "RanncStatsCallback":
        """Put this callback first in ``trainer``'s list (trackers then see its keys) and count its batches.

        Needed only with a plain ``Trainer``; :class:`~rannc_hf.RanncTrainer` wires the callback itself.
        """
        handler = trainer.callback_handler
        handler.callbacks = [cb for cb in handler.callbacks if cb is not self]
        handler.callbacks.insert(0, self)
        if getattr(trainer, "_rannc_stats_wrapped", False):
            return self
        orig = trainer.training_step

        def training_step(model, inputs, *args, **kwargs):
            self.observe_batch(inputs)
            return orig(model, inputs, *args, **kwargs)

        trainer.training_step = training_step
        trainer._rannc_stats_wrapped = True
        if self.device is None:
            self.device = trainer.args.device
        if self.num_params is None and getattr(trainer, "model", None) is not None:
            self.num_params = sum(p.numel() for p in trainer.model.parameters())
        if trainer.args.fp16:
            self.precision = "fp16"
        elif not trainer.args.bf16:
            self.precision = "fp32"
        return self

    def bind(self, module=None, plan=None, num_params: Optional[int] = None,
             device: Optional[torch.device] = None, precision: Optional[str] = None) -> "RanncStatsCallback":
        """Tell the callback about the RanncModule (layout, plan) it reports on."""
        if module is not None:
            self.module = module
            plan = plan if plan is not None else getattr(module, "plan", None)
        if plan is not None:
            self.plan = plan
        if num_params is not None:
            self.num_params = num_params
        if device is not None:
            self.device = device
        if precision is not None:
            self.precision = precision
        return self

    def observe_batch(self, inputs: Any) -> None:
        """Count the samples and tokens of one forward/backward call (this rank's replica batch)."""
        s, t = _count_batch(inputs)
        self._iv_samples += s
        self._iv_tokens += t

    # ---- layout --------------------------------------------------------------------------------------------
    def _layout(self) -> tuple[int, int, int, int]:
        """``(stage, dp_rank, num_stages, dp_size)`` of this rank."""
        m = self.module
        if m is not None and hasattr(m, "pp_rank"):
            return int(m.pp_rank), int(getattr(m, "dp_rank", 0)), int(getattr(m, "num_stages", 1)), \
                int(getattr(m, "dp_size", 1))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return 0, torch.distributed.get_rank(), 1, torch.distributed.get_world_size()
        return 0, 0, 1, 1

    # ---- TrainerCallback -------------------------------------------------------------------------------------
    def _reset_totals(self) -> None:
        self._iv_samples = self._iv_tokens = 0
        self._iv_time = 0.0
        self._iv_steps = 0
        self._iv_busy = 0.0
        self._tot_samples = self._tot_tokens = 0
        self._tot_time = 0.0
        self._tot_steps = 0
        self._first_step_time = 0.0
        self._first_tokens = self._first_samples = 0
        self._seen_first = False
        self._offload_first: Optional[dict] = None   # the offload engine's counters after the first step
        self._t0: Optional[float] = None
        self._step_start: Optional[torch.cuda.Event] = None
        self._step_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._history: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self._reset_totals()
        if self.device is None:
            self.device = args.device
        if self.num_params is None and kwargs.get("model") is not None:
            self.num_params = sum(p.numel() for p in kwargs["model"].parameters())
        if self.device is not None and self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats(self.device)

    def _on_cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda" and torch.cuda.is_available()

    def on_step_begin(self, args, state, control, **kwargs):
        if self._on_cuda():
            if not self._seen_first:  # the first step (capture, planning, compile) is timed apart, by the wall
                torch.cuda.synchronize(self.device)
            else:  # later steps: CUDA events, read at the next log, so the host is never stopped in between
                self._step_start = torch.cuda.Event(enable_timing=True)
                self._step_start.record()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is None:
            return
        dt = None
        if self._on_cuda() and self._step_start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._step_events.append((self._step_start, end))
            self._step_start = None
        else:
            if self._on_cuda():
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - self._t0
        self._t0 = None
        if not self._seen_first:
            self._seen_first = True
            self._first_step_time = dt or 0.0
            self._first_tokens, self._first_samples = self._iv_tokens, self._iv_samples
            self._offload_first = _engine_counters(self.module)   # the summary's offload means leave it out too
        if dt is not None:
            self._iv_time += dt
        self._iv_steps += 1
        busy = self._runtime_busy_time()
        if busy is not None:
            self._iv_busy += busy

    def _read_step_events(self) -> None:
        """Add the GPU-timeline span of every step since the last read to the interval time (waits once)."""
        if not self._step_events:
            return
        self._step_events[-1][1].synchronize()
        self._iv_time += sum(start.elapsed_time(end) for start, end in self._step_events) / 1e3
        self._step_events.clear()

    def _first_apart(self) -> bool:
        """Whether the whole-run totals leave the first step (capture, planning, compile) out: after 2+ steps."""
        return self._seen_first and self._tot_steps + self._iv_steps > 1

    def _runtime_busy_time(self) -> Optional[float]:
        """Compute seconds of the last pipeline step on this rank, when the runtime reports them."""
        m = self.module
        for attr in ("last_step_busy_s", "last_busy_time", "busy_time_s"):
            v = getattr(m, attr, None) if m is not None else None
            if isinstance(v, (int, float)) and v > 0:
                return float(v)
        return None

    def on_log(self, args, state, control, logs=None, **kwargs):
        # RanncTrainer merges the stats before Trainer.log appends; a plain Trainer gets them here
        # (all ranks call on_log at the same points, so the collective below is matched).
        if logs is None or "rannc/step_time_s" in logs or not self.is_train_log(logs):
            return
        stats = self.collect(args, state)
        logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)

    def on_train_end(self, args, state, control, **kwargs):
        self.finish(args, state)

    # ---- collection ------------------------------------------------------------------------------------------
    @staticmethod
    def is_train_log(logs: dict) -> bool:
        return "loss" in logs and not any(k.startswith(("eval_", "test_")) for k in logs)

    def _local_vector(self) -> torch.Tensor:
        self._read_step_events()
        stage, dp_rank, _, _ = self._layout()
        cur, peak = device_memory(self.device)
        stage_params = 0
        if self.plan is not None and stage < len(getattr(self.plan, "stages", [])):
            stage_params = int(getattr(self.plan.stages[stage], "num_params", 0) or 0)
        tot = [self._tot_tokens + self._iv_tokens, self._tot_samples + self._iv_samples,
               self._tot_time + self._iv_time, self._tot_steps + self._iv_steps]
        if self._first_apart():  # whole-run figures are steady state: the first step left out
            tot = [tot[0] - self._first_tokens, tot[1] - self._first_samples, tot[2] - self._first_step_time,
                   tot[3] - 1]
        v = [stage, dp_rank, peak, cur, self._iv_tokens, self._iv_samples, self._iv_time, self._iv_steps,
             self._iv_busy, stage_params, *tot, self._first_step_time]
        return torch.tensor(v, dtype=torch.float64)

    def _gather(self, vec: torch.Tensor) -> torch.Tensor:
        """``[world, _N]`` rows of every rank (a plain all_gather of tensors; no pickling)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return vec.unsqueeze(0)
        dev = torch.device("cpu")
        if dist.get_backend() == "nccl":
            dev = torch.device("cuda", torch.cuda.current_device())
        vec = vec.to(dev)
        out = [torch.empty_like(vec) for _ in range(dist.get_world_size())]
        dist.all_gather(out, vec)
        return torch.stack(out).cpu()

    def _peak_flops(self) -> Optional[float]:
        if self.peak_tflops:
            return float(self.peak_tflops) * 1e12
        return peak_flops_of(self.device, self.precision, self.device_profile)

    def _compute(self, rows: torch.Tensor, interval: bool) -> tuple[dict[str, float], list[dict]]:
        """Turn the gathered rows into the flat key dict (and per-stage records)."""
        _, _, num_stages, dp_size = self._layout()
        f = {name: i for i, name in enumerate(_FIELDS)}
        tok_k, smp_k, time_k, steps_k = (("tokens", "samples", "time", "steps") if interval
                                         else ("tot_tokens", "tot_samples", "tot_time", "tot_steps"))
        plan = self.plan
        nmb = int(getattr(plan, "num_microbatches", 0) or 0) if plan is not None else 0
        if nmb == 0 and self.module is not None:
            nmb = int(getattr(self.module, "num_microbatches", 1) or 1)
        predicted_bubble = None
        if plan is not None and getattr(plan, "predicted_bubble", None) is not None and num_stages > 1:
            predicted_bubble = float(plan.predicted_bubble)
        if predicted_bubble is None or (predicted_bubble == 0.0 and num_stages > 1):
            predicted_bubble = analytic_bubble(num_stages, nmb or 1)
        peak = self._peak_flops()
        total_params = self.num_params or 0
        plan_flops = float(getattr(plan, "flops_per_step", 0.0) or 0.0) if plan is not None else 0.0

        # one pipeline (replica) = all stages with the same dp rank; time per step = slowest rank
        steps = max(1.0, float(rows[:, f[steps_k]].max()))
        step_time = float(rows[:, f[time_k]].max()) / steps if rows[:, f[steps_k]].max() > 0 else 0.0
        # tokens: count each replica once (stage 0's rows)
        first = rows[rows[:, f["stage"]] == 0]
        g_tokens = float(first[:, f[tok_k]].sum())
        g_samples = float(first[:, f[smp_k]].sum())
        wall = step_time * steps
        out: dict[str, float] = {"rannc/num_stages": float(num_stages), "rannc/dp_size": float(dp_size)}
        tps = g_tokens / wall if wall > 0 else 0.0
        sps = g_samples / wall if wall > 0 else 0.0
        out["rannc/tokens_per_s"] = tps
        out["rannc/samples_per_s"] = sps
        out["rannc/step_time_s"] = step_time
        if plan is not None and float(getattr(plan, "predicted_step_time", 0.0) or 0.0) > 0:
            out["rannc/predicted_step_time_s"] = float(plan.predicted_step_time)
        tokens_per_step = g_tokens / steps
        flops_step = plan_flops if plan_flops > 0 else 6.0 * total_params * tokens_per_step
        total_tflops = flops_step / step_time / 1e12 if step_time > 0 else 0.0
        out["rannc/tflops"] = total_tflops
        n_dev = max(1, rows.shape[0])
        if peak:
            out["rannc/mfu"] = total_tflops * 1e12 / (peak * n_dev)
        busy = rows[:, f["busy"]]
        if bool((busy > 0).all()) and interval and step_time > 0:
            out["rannc/bubble_fraction"] = float(max(0.0, min(0.999999, 1.0 - float(busy.mean()) / (step_time * steps))))
        else:
            out["rannc/bubble_fraction"] = float(predicted_bubble)
        out["rannc/predicted_bubble_fraction"] = float(predicted_bubble)

        stage_params = {int(r[f["stage"]]): float(r[f["num_params"]]) for r in rows}
        known = sum(stage_params.values())
        records = []
        for s in range(num_stages):
            srows = rows[rows[:, f["stage"]] == s]
            if srows.shape[0] == 0:
                continue
            share = stage_params.get(s, 0.0) / known if known > 0 else 1.0 / num_stages
            s_tokens = float(srows[:, f[tok_k]].sum())
            s_samples = float(srows[:, f[smp_k]].sum())
            rec = {"stage": s, "replicas": int(srows.shape[0]),
                   "peak_mem_gib": float(srows[:, f["peak_mem"]].max()) / GIB,
                   "mem_gib": float(srows[:, f["mem"]].max()) / GIB,
                   "tokens_per_s": s_tokens / wall if wall > 0 else 0.0,
                   "samples_per_s": s_samples / wall if wall > 0 else 0.0,
                   "tflops": total_tflops * share}
            if peak:
                rec["mfu"] = rec["tflops"] * 1e12 / (peak * srows.shape[0])
            for k, v in rec.items():
                if k not in ("stage",):
                    out[f"rannc/stage{s}/{k}"] = float(v)
            if self.per_replica and srows.shape[0] > 1:
                rec["per_replica"] = []
                for r in srows:
                    d = int(r[f["dp_rank"]])
                    rep = {"dp_rank": d, "peak_mem_gib": float(r[f["peak_mem"]]) / GIB,
                           "mem_gib": float(r[f["mem"]]) / GIB,
                           "tokens_per_s": float(r[f[tok_k]]) / wall if wall > 0 else 0.0,
                           "samples_per_s": float(r[f[smp_k]]) / wall if wall > 0 else 0.0}
                    rec["per_replica"].append(rep)
                    for k in ("peak_mem_gib", "mem_gib", "tokens_per_s", "samples_per_s"):
                        out[f"rannc/stage{s}/dp{d}/{k}"] = float(rep[k])
            records.append(rec)
        if not interval:
            out["rannc/first_step_time_s"] = float(rows[:, f["first_step_time"]].max())
        return out, records

    def collect(self, args=None, state=None) -> dict[str, float]:
        """Gather every rank's figures since the last call and return the ``rannc/...`` keys (a collective)."""
        rows = self._gather(self._local_vector())
        stats, _ = self._compute(rows, interval=True)
        self._tot_tokens += self._iv_tokens
        self._tot_samples += self._iv_samples
        self._tot_time += self._iv_time
        self._tot_steps += self._iv_steps
        self._iv_samples = self._iv_tokens = self._iv_steps = 0
        self._iv_time = self._iv_busy = 0.0
        if state is not None:
            self._history.append({"step": int(state.global_step), **stats})
        self.last_stats = stats
        return stats

    def finish(self, args, state) -> Optional[dict]:
        """End of training: gather totals, print the per-stage table and write ``rannc_stats.json`` (a collective)."""
        rows = self._gather(self._local_vector())
        stats, records = self._compute(rows, interval=False)
        _, _, num_stages, dp_size = self._layout()
        plan = self.plan
        first_apart = self._first_apart()
        summary = {
            "num_stages": num_stages, "dp_size": dp_size,
            "steps": int(rows[:, _FIELDS.index("tot_steps")].max()) + int(first_apart),
            "totals_exclude_first_step": bool(first_apart),
            "device": str(self.device) if self.device is not None else None,
            "peak_tflops_per_device": (self._peak_flops() or 0) / 1e12 or None,
            "num_params": self.num_params,
            "totals": {k.split("/", 1)[1]: v for k, v in stats.items() if "/stage" not in k},
            "stages": records,
            "plan": None if plan is None else {
                "predicted_step_time_s": float(getattr(plan, "predicted_step_time", 0.0) or 0.0),
                "predicted_bubble": float(getattr(plan, "predicted_bubble", 0.0) or 0.0),
                "num_microbatches": int(getattr(plan, "num_microbatches", 0) or 0),
                "schedule": str(getattr(plan, "schedule", "")),
                "flops_per_step": float(getattr(plan, "flops_per_step", 0.0) or 0.0)},
            "history": self._history,
        }
        off = offload_summary(self.module, self._offload_first if first_apart else None)
        if off is not None:
            summary["offload"] = off
        self.summary = summary
        is_main = state is None or state.is_world_process_zero
        if is_main and self.print_summary:
            print(self.format_summary(summary), flush=True)
        if is_main and self.stats_file and args is not None and getattr(args, "output_dir", None):
            os.makedirs(args.output_dir, exist_ok=True)
            path = os.path.join(args.output_dir, self.stats_file)
            tmp = path + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(summary, fh, indent=2)
            os.replace(tmp, path)
        return summary

    @staticmethod
    def format_summary(summary: dict) -> str:
        """The per-stage table printed at the end of training."""
        rows = []
        for r in summary["stages"]:
            rows.append([str(r["stage"]), str(r["replicas"]), f"{r['peak_mem_gib']:.2f}", f"{r['mem_gib']:.2f}",
                         f"{r['tokens_per_s']:.1f}", f"{r['samples_per_s']:.2f}", f"{r['tflops']:.4f}",
                         f"{r['mfu']:.1%}" if "mfu" in r else "-"])
        t = summary["totals"]
        head = (f"rannc stats: {summary['num_stages']} stage(s) x {summary['dp_size']} replica(s), "
                f"{summary['steps']} steps, step {t.get('step_time_s', 0.0) * 1e3:.1f} ms"
                + (f" (predicted {t['predicted_step_time_s'] * 1e3:.1f} ms)" if "predicted_step_time_s" in t else "")
                + f", bubble {t.get('bubble_fraction', 0.0):.0%}, {t.get('tokens_per_s', 0.0):.1f} tokens/s")
        table = _fmt_table(rows, ["stage", "replicas", "peak GiB", "now GiB", "tokens/s", "samples/s", "TFLOP/s",
                                  "MFU"])
        off = summary.get("offload")
        if off:
            table += (f"\noffload (this rank's stages, mean of {off['steps']} steps): {off['h2d_gb_per_step']:.2f} GB to "
                      f"the GPU and {off['d2h_gb_per_step']:.2f} GB back a step, host step "
                      f"{off['host_step_ms']:.1f} ms on {off['host_step_threads']} threads (resident group "
                      f"{off['rest_step_ms']:.1f} ms, {off['cpu_block_steps_per_step']:.0f} CPU-stepped blocks of "
                      f"{off['cpu_block_step_ms']:.1f} ms, {off['cpu_block_refill_ms']:.1f} of it refilling the GPU copy), "
                      f"step worker busy {off['worker_busy_ms']:.1f} ms a step"
                      + (f" ({off['worker_overlap_ms']:.1f} ms of it overlapping, on {off['worker_threads']} threads)"
                         if off["worker_overlap_ms"] > 0 else "")
                      + f", host store {off['host_gib']:.2f} GiB")
        return head + "\n" + table
