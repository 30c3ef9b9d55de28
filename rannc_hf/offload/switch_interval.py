"""The interpreter's GIL switch interval while an offload engine's step worker runs.

    from rannc_hf.offload.switch_interval import shorten, restore
    share = shorten(500)     # sys.getswitchinterval() is now at most 0.5 ms
    ...                      # worker thread and training loop share the GIL
    restore(share)           # back to the value before the first shorten()

Every torch call the step worker makes lets go of the GIL while its kernel runs and then waits to take it back.
While the training loop's thread runs Python (enqueueing the next forward), that wait lasts until the loop's
thread is asked to drop the GIL, which happens after the switch interval: 5 ms by default, so a block step of a
few torch calls lost 10-15 ms to it. ``benchmarks/host_step_gil.py`` times a 12.6M-parameter block step beside a
Python-busy thread: on the H200 host 13.8 ms at 5 ms and 3.4 at 0.5 ms (1.7 alone; ``h200/next70.sh``), on 2 cores
26.6 and 17.0 (a busy process alone costs 14-17 there). The GPT-2 1.3B recipe's slow CPU-stepped blocks through the
accelerate loop did not move with it (docs/offload.md). The interval is process-wide, so engines share it: the first
to start a worker saves the old value, the last to close puts it back (an engine
left open keeps its share: its gradient hooks keep it alive anyway).
"""

from __future__ import annotations

import sys
import threading
from typing import Optional

from ..config import env_int

#: microseconds; ``RANNC_HF_OFFLOAD_SWITCH_US`` overrides it, 0 leaves the interpreter's interval alone
DEFAULT_US = 500

_lock = threading.Lock()
_live: set = set()                # the shares held now
_saved: Optional[float] = None    # the interval before the first of them


def wanted_us() -> int:
    """The interval the engine asks for, in microseconds (0: leave it)."""
    return env_int("RANNC_HF_OFFLOAD_SWITCH_US", DEFAULT_US)


class Share:
    """One holder's part of the shortened interval (:func:`shorten`); :meth:`release` gives it back, once."""

    def release(self) -> None:
        global _saved
        with _lock:
            if self not in _live:
                return
            _live.discard(self)
            if not _live and _saved is not None:
                sys.setswitchinterval(_saved)
                _saved = None


def shorten(us: Optional[int] = None) -> Optional[Share]:
    """Lower the switch interval to ``us`` microseconds (never raise it). Returns the caller's :class:`Share`
    (None when ``us`` is 0: nothing changed)."""
    us = wanted_us() if us is None else us
    if us <= 0:
        return None
    global _saved
    share = Share()
    with _lock:
        if not _live:
            _saved = sys.getswitchinterval()
        _live.add(share)
        if sys.getswitchinterval() > us * 1e-6:
            sys.setswitchinterval(us * 1e-6)
    return share


def restore(share: Optional[Share]) -> None:
    """Give back a :func:`shorten` share (None, or one given back already: nothing to do); the last one restores
    the interval saved by the first."""
    if share is not None:
        share.release()
