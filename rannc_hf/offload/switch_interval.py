"""The interpreter's GIL switch interval while an offload engine's step worker runs.

    from rannc_hf.offload.switch_interval import shorten, restore
    token = shorten(500)     # sys.getswitchinterval() is now at most 0.5 ms
    ...                      # worker thread and training loop share the GIL
    restore(token)           # back to the value before the first shorten()

Every torch call the step worker makes lets go of the GIL while its kernel runs and then waits to take it back.
While the training loop's thread runs Python (enqueueing the next forward), that wait lasts until the loop's
thread is asked to drop the GIL, which happens after the switch interval: 5 ms by default, so a block step of a
few torch calls lost 10-15 ms to it. On the GPT-2 1.3B recipe's H200 host the CPU-stepped blocks took 76.5 ms
each through the accelerate loop against 27.1 through RanncTrainer (``benchmarks/h200/next69.sh``); on 2 cores
``benchmarks/host_step_gil.py`` measured the GIL's share of a 12.6M-parameter block step at 11.3 ms with 5 ms,
3.2 with 1 ms, 2.2 with 0.5 ms and 0.8 with 0.2 ms. The interval is process-wide, so engines share it: the first
to start a worker saves the old value, the last to close puts it back.
"""

from __future__ import annotations

import sys
import threading
from typing import Optional

from ..config import env_int

#: microseconds; ``RANNC_HF_OFFLOAD_SWITCH_US`` overrides it, 0 leaves the interpreter's interval alone
DEFAULT_US = 500

_lock = threading.Lock()
_holders = 0
_saved: Optional[float] = None


def wanted_us() -> int:
    """The interval the engine asks for, in microseconds (0: leave it)."""
    return env_int("RANNC_HF_OFFLOAD_SWITCH_US", DEFAULT_US)


def shorten(us: Optional[int] = None) -> bool:
    """Lower the switch interval to ``us`` microseconds (never raise it). Returns a token for :func:`restore`:
    True when this call holds a share of the change."""
    us = wanted_us() if us is None else us
    if us <= 0:
        return False
    global _holders, _saved
    with _lock:
        if _holders == 0:
            _saved = sys.getswitchinterval()
        _holders += 1
        if sys.getswitchinterval() > us * 1e-6:
            sys.setswitchinterval(us * 1e-6)
    return True


def restore(token: bool) -> None:
    """Give back a :func:`shorten` share; the last one restores the interval saved by the first."""
    if not token:
        return
    global _holders, _saved
    with _lock:
        _holders -= 1
        if _holders == 0 and _saved is not None:
            sys.setswitchinterval(_saved)
            _saved = None
