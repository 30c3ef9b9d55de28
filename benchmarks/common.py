"""Shared helpers for benchmark scripts: environment facts and JSON result files.

    from benchmarks.common import environment, seconds_per_call, write_result
    write_result("plan_speed", {"cases": [...]})   # -> benchmarks/results/plan_speed.json
    seconds_per_call(opt.step, calls=10, warmup=3)   # wall time per call, CUDA synchronized

Every result file records the date, the device (GPU name or CPU model), core count and the
versions of torch / transformers / accelerate / rannc_hf, so numbers are never quoted without
their context.
"""

from __future__ import annotations

import datetime as _dt
import faulthandler
import json
import os
import platform
import signal
import tempfile

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

faulthandler.register(signal.SIGUSR1, all_threads=True)   # lib.sh's deadline: every thread's stack, then kill


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def environment() -> dict:
    import torch

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host_cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for mod in ("transformers", "accelerate", "rannc_hf", "deepspeed"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            pass
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["num_gpus"] = torch.cuda.device_count()
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = "cpu: " + env["host_cpu"]
        env["num_gpus"] = 0
    return env


def write_result(name: str, data: dict, out_dir: str | None = None) -> str:
    """Write ``{"environment": ..., **data}`` to ``<out_dir>/<name>.json`` atomically; return the path."""
    out_dir = out_dir or os.environ.get("RANNC_HF_RESULTS", RESULTS_DIR)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    payload = {"benchmark": name, "environment": environment(), **data}
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
    return path


def seconds_per_call(fn, calls: int, warmup: int = 1, cuda: bool | None = None) -> float:
    """Wall seconds per call of ``fn`` over ``calls`` calls after ``warmup`` untimed ones; with ``cuda`` (default:
    when a GPU is present) the device is synchronized before the clock starts and before it stops."""
    import time

    import torch

    sync = torch.cuda.synchronize if (torch.cuda.is_available() if cuda is None else cuda) else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) / calls


def decay_param_groups(model, weight_decay: float) -> list:
    """transformers' Trainer's grouping, as the benchmarks use it: ``weight_decay`` on matrices, none on biases and
    norms (which alternate with the matrices in every layer)."""
    ps = list(model.parameters())
    return [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]
