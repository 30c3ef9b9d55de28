"""CPU stand-in for CUDA's asynchronous host-to-GPU fetches, to find races without a GPU.

On CUDA a fetched block's copy runs on a side stream; the compute stream waits for it only in the engine's
``_ensure``. An op that reads a block's weights without that wait computes with whatever the memory held.
Inside :func:`emulate_async_fetch` a block fetched on CPU holds NaN until ``_ensure`` "completes" its copy, so
the same race shows as NaN losses or gradients::

    >>> from rannc_hf.offload.emulation import emulate_async_fetch
    >>> with emulate_async_fetch():
    ...     pass   # train through RanncModule / offload_module here: a missed wait gives NaN

Used by ``tests/test_offload_pipeline.py`` and ``benchmarks/drift/repro_fenced_compile.py --emulate-async``.
"""

from __future__ import annotations

import contextlib

from .residency import _ResidencyMixin
from .stepping import _StepMixin


@contextlib.contextmanager
def emulate_async_fetch():
    """Patch the engine's fetch/ensure/release (and the step's refresh of resident blocks) for the block."""
    fetch, ensure, release = _ResidencyMixin._fetch, _ResidencyMixin._ensure, _ResidencyMixin._release
    refresh = _StepMixin._refresh_work

    def _fetch(self, i, prefetch):
        g = self.blocks[i]
        was = g.resident
        fetch(self, i, prefetch)
        if not was and g.resident:
            g.work.fill_(float("nan"))
            g.emu_pending = True

    def _ensure(self, i):
        ensure(self, i)
        g = self.blocks[i]
        if getattr(g, "emu_pending", False):
            g.fill_work()
            g.emu_pending = False

    def _refresh_work(self, g):   # the step's copy of new weights into a resident block (waited for on CUDA)
        g.emu_pending = False
        return refresh(self, g)

    def _release(self, i):
        self.blocks[i].emu_pending = False
        return release(self, i)

    _ResidencyMixin._fetch, _ResidencyMixin._ensure, _ResidencyMixin._release = _fetch, _ensure, _release
    _StepMixin._refresh_work = _refresh_work
    try:
        yield
    finally:
        _ResidencyMixin._fetch, _ResidencyMixin._ensure, _ResidencyMixin._release = fetch, ensure, release
        _StepMixin._refresh_work = refresh
