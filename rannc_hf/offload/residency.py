"""Offload engine, residency: which offloaded blocks are on the device and when (fetch, prefetch,
release, the forward/backward hooks that drive them).

:class:`_ResidencyMixin` is mixed into :class:`~rannc_hf.offload.engine.OffloadEngine` and works on the engine's state
(``self.groups``, ``self.blocks``, streams, ...); see the engine module for the whole picture::

    from rannc_hf.offload import OffloadEngine
    eng = OffloadEngine(blocks, device="cuda", mode="all", optimizer=opt)   # has every mixin's methods
"""

from __future__ import annotations

import time
import weakref
from typing import Iterable

import torch

from ..errors import OffloadError


def _in_backward() -> bool:
    try:
        return torch._C._current_graph_task_id() != -1
    except AttributeError:  # pragma: no cover
        return False


class _ResidencyMixin:
    """Block residency of :class:`~rannc_hf.offload.engine.OffloadEngine`."""

    def _log(self, event: str, i: int) -> None:
        if self.trace is not None:
            self.trace.append((event, i))

    def resident_blocks(self) -> list[int]:
        """Offloaded blocks whose working copy is on the device now (including in-flight prefetches)."""
        return sorted(self._resident)

    def _fetch(self, i: int, prefetch: bool) -> None:
        g = self.blocks[i]
        if g.resident:
            return
        self._wait_group_step(g)
        if self.cuda:
            s = self.h2d_stream
            with torch.cuda.stream(s):
                if self.timing:
                    e0 = torch.cuda.Event(enable_timing=True)
                    e0.record(s)
                g.work.untyped_storage().resize_(g.work_bytes)
                moved_in, moved_out = g.fill_work(non_blocking=True, writeback_stream=self.d2h_stream)
                ev = torch.cuda.Event(enable_timing=self.timing)
                ev.record(s)
                if self.timing:
                    self._copy_events.append((e0, ev))
            g.resident = True
            g.ready_event = ev
        else:
            t0 = time.perf_counter()
            moved_in, moved_out = g.fetch()
            self._stats["copy_time_s"] += time.perf_counter() - t0
        self._resident.append(i)
        st = self._stats
        st["h2d_bytes"] += moved_in
        st["d2h_bytes"] += moved_out
        st["fetches"] += 1
        st["prefetches" if prefetch else "demand_fetches"] += 1
        st["resident_peak_blocks"] = max(st["resident_peak_blocks"], len(self._resident))
        st["resident_peak_bytes"] = max(st["resident_peak_bytes"],
                                        sum(self.blocks[j].work_bytes for j in self._resident))
        self._log("prefetch" if prefetch else "fetch", i)

    def _ensure(self, i: int) -> None:
        g = self.blocks[i]
        if not g.resident:
            self._fetch(i, prefetch=False)
        if self.cuda and g.ready_event is not None:
            cur = torch.cuda.current_stream(self.device)
            if self.timing:
                e0 = torch.cuda.Event(enable_timing=True)
                e0.record(cur)
            cur.wait_event(g.ready_event)
            if self.timing:
                e1 = torch.cuda.Event(enable_timing=True)
                e1.record(cur)
                self._stall_events.append((e0, e1))
            g.work.record_stream(cur)
            g.ready_event = None

    def _release(self, i: int) -> None:
        g = self.blocks[i]
        if not g.offload or not g.resident:
            return
        if self.cuda and g.ready_event is not None:  # prefetched, never used: keep stream order safe
            torch.cuda.current_stream(self.device).wait_event(g.ready_event)
        g.release()
        self._resident.remove(i)
        self._stats["releases"] += 1
        self._log("release", i)

    def _top_up(self, order: Iterable[int]) -> None:
        for j in order:
            if len(self._resident) >= self.max_resident:
                break
            if not self.blocks[j].resident:
                self._fetch(j, prefetch=True)

    def _fwd_window(self, i: int) -> list[int]:
        return list(range(i, min(self.num_blocks, i + self.prefetch_blocks + 1)))

    def _bwd_window(self, i: int) -> list[int]:
        return list(range(i, max(-1, i - self.prefetch_blocks - 1), -1))

    def _release_outside(self, window: list[int]) -> None:
        for j in list(self._resident):
            if j not in window and j not in self._bwd_active and j not in self._kept:
                self._release(j)

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.num_blocks:
            raise OffloadError(f"offload block index {i} out of range (engine has {self.num_blocks} blocks)")

    def before_forward(self, i: int) -> None:
        """Block ``i`` is about to run forward: make it resident and prefetch the next blocks."""
        self._check_index(i)
        if not self.offload_params:
            self._wait_group_step(self.blocks[i])
            return
        if _in_backward():  # activation recompute inside backward
            self._log("recompute", i)
            self._queue_backward_end()
            self._ensure(i)
            self._top_up(self._bwd_window(i)[1:])
            return
        if i <= self._last_fwd:  # a new forward pass: blocks kept for the last one's backward go
            self._kept.clear()
        self._last_fwd = i
        self._enter(i, self._fwd_window(i), "forward")

    def ensure_resident(self, i: int) -> None:
        """Block ``i``'s weights are read outside its own fences: a checkpointed segment that starts inside the
        block (before its ``offload_exit``) is recomputed in backward before any fence of the block has run
        there, and ``before_backward(i)`` only fires during that segment's backward. Make ``i`` resident and
        make the compute stream wait for its copy (a prefetched block's copy may still be in flight)."""
        self._check_index(i)
        if not self.offload_params:
            return
        if _in_backward():
            self._log("recompute", i)
            self._queue_backward_end()
        self._ensure(i)

    def _enter(self, i: int, window: list[int], event: str) -> None:
        """Block ``i`` runs now: blocks outside ``window`` go, ``i`` is made resident, the rest of the window
        (the next blocks in this direction) is prefetched."""
        self._release_outside(window)
        self._ensure(i)
        self._log(event, i)
        self._top_up(window[1:])

    def after_forward(self, i: int) -> None:
        """Block ``i``'s forward is done: release it unless its backward comes soon."""
        self._check_index(i)
        if not self.offload_params or _in_backward():
            return
        if torch.is_grad_enabled() and i >= self.num_blocks - 1 - self.prefetch_blocks:
            self._kept.add(i)
            self._log("keep", i)
            return
        self._release(i)

    def before_backward(self, i: int) -> None:
        """Gradients reached block ``i``'s outputs: make it resident, prefetch ``i-1 .. i-p``."""
        self._check_index(i)
        self._queue_backward_end()
        if not self.offload_params:
            return
        if i in self._bwd_active:
            return
        self._kept.clear()
        self._last_fwd = -1
        self._bwd_active.add(i)
        self._bwd_pos = i
        self._enter(i, self._bwd_window(i), "backward")

    def after_backward(self, i: int) -> None:
        """Block ``i``'s backward is done (gradients of its inputs exist): release it."""
        self._check_index(i)
        self.drain(force=False)
        if not self.offload_params:
            return
        self._bwd_active.discard(i)
        self._release(i)
        if self._bwd_pos is not None:
            self._top_up(self._bwd_window(self._bwd_pos)[1:])

    def _queue_backward_end(self) -> None:
        if self._cb_queued or not _in_backward():
            return
        self._cb_queued = True
        ref = weakref.ref(self)

        def _cb():
            eng = ref()
            if eng is not None:
                eng._on_backward_end()

        torch.autograd.Variable._execution_engine.queue_callback(_cb)

    def _on_backward_end(self) -> None:
        self._cb_queued = False
        self._bwd_active.clear()
        self._kept.clear()
        self._last_fwd = -1
        self._bwd_pos = None
        for j in list(self._resident):
            self._release(j)
        self._log("backward_end", -1)
        if self.timing:
            t = time.perf_counter()
            self.wlog.append(("backward_end", -1, t, t, t))
        self.drain(force=False)

    def release_all(self) -> None:
        """Release every offloaded block (e.g. after an eval forward whose backward never comes)."""
        self._bwd_active.clear()
        self._kept.clear()
        self._last_fwd = -1
        for j in list(self._resident):
            self._release(j)

