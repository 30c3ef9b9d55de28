"""Where does a training step go? :class:`StepProfilerCallback` traces a few steps with ``torch.profiler``.

    from rannc_hf.integrations.step_profiler import StepProfilerCallback

    trainer.add_callback(StepProfilerCallback("out/profile", start=20, steps=3))   # HF Trainer / RanncTrainer
    trainer.train()     # out/profile/steps_20-22.txt: top ops by device and by host time, plus the host's
                        # waits on the device; out/profile/steps_20-22.json.gz: a Chrome trace (chrome://tracing)

    prof = StepProfilerCallback("out/profile", start=20, steps=3)   # a plain loop: call the hooks yourself
    for step in range(n):
        prof.on_step_begin(None, None, None); train_one_step(); prof.on_step_end(None, None, None)

Steps count from 0 at the first ``on_step_begin``. Start after the first steps (capture, planning and
``torch.compile`` run there) so the trace shows the steady state. The recipes expose it as
``--profile_steps N --profile_start S``. Rank 0 writes the files; other ranks profile nothing.
"""

from __future__ import annotations

import gzip
import os
import shutil
import warnings
from typing import Optional

import torch

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a hard dependency
    TrainerCallback = object  # type: ignore[misc,assignment]

# Host-side calls that mean the host waited for the device (a synchronize, a blocking copy, a read of a value).
HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cudaMemcpyAsync", "aten::item", "aten::_local_scalar_dense")


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class StepProfilerCallback(TrainerCallback):
    """Profile training steps ``[start, start + steps)`` and write a text summary and a Chrome trace."""

    def __init__(self, out_dir: str, start: int = 10, steps: int = 3, row_limit: int = 25):
        if start < 0 or steps < 1:
            raise ValueError(f"StepProfilerCallback: start={start} must be >= 0 and steps={steps} >= 1 "
                             f"(profile steps [start, start + steps))")
        self.out_dir, self.start, self.steps, self.row_limit = out_dir, int(start), int(steps), int(row_limit)
        self._step = 0
        self._prof: Optional[torch.profiler.profile] = None
        self.summary_path: Optional[str] = None
        self.trace_path: Optional[str] = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self._step == self.start and _rank() == 0:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize()  # the trace starts with the device idle: step boundaries stay sharp
            self._prof = torch.profiler.profile(activities=acts, record_shapes=False)
            with warnings.catch_warnings():   # "Profiler clears events at the end of each cycle": one cycle here
                warnings.filterwarnings("ignore", message=".*clears events.*")
                self._prof.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        self._step += 1
        if self._step == self.start + self.steps:
            self._finish()

    def on_train_end(self, args, state, control, **kwargs):
        self._finish()   # training ended inside the window: keep what was traced

    def _finish(self) -> None:
        if self._prof is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._prof.__exit__(None, None, None)
        self._write(self._prof)
        self._prof = None

    def _write(self, prof: torch.profiler.profile) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        last = min(self._step, self.start + self.steps) - 1
        stem = os.path.join(self.out_dir, f"steps_{self.start}-{last}")
        n = max(1, last - self.start + 1)
        avg = prof.key_averages()
        device_sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        waits = [e for e in avg if e.key in HOST_WAITS]
        lines = [f"torch.profiler over {n} training step(s), {self.start}..{last}; times are totals over them",
                 "", "== host waits on the device (per step)"]
        lines += [f"{e.key:<32} {e.count / n:8.1f} calls  {e.cpu_time_total / n / 1e3:9.2f} ms"
                  for e in sorted(waits, key=lambda e: -e.cpu_time_total)] or ["(none)"]
        lines += ["", f"== top ops by {'device' if torch.cuda.is_available() else 'host'} time",
                  avg.table(sort_by=device_sort, row_limit=self.row_limit),
                  "", "== top ops by host time", avg.table(sort_by="self_cpu_time_total", row_limit=self.row_limit)]
        tmp = stem + ".txt.tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, stem + ".txt")
        raw = stem + ".json.tmp"
        prof.export_chrome_trace(raw)
        with open(raw, "rb") as src, gzip.open(stem + ".json.gz.tmp", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(raw)
        os.replace(stem + ".json.gz.tmp", stem + ".json.gz")
        self.summary_path, self.trace_path = stem + ".txt", stem + ".json.gz"
