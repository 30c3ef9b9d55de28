"""No silent hangs: turn a timed-out / broken collective into a :class:`CollectiveTimeoutError` that
names this rank, the collective, and what each peer was last doing.

Every process group rannc_hf creates times out after ``RanncConfig.collective_timeout_s`` (the
runtime passes it to ``init_process_group`` / ``new_group``): gloo then raises a bare
``RuntimeError: ... Timed out waiting 5000ms for recv operation`` and NCCL aborts the
communicator. This module makes that error say what happened and what to do::

    from rannc_hf.reliability import collective_guard, guard_module
    model = guard_module(rannc_hf.RanncModule(model, opt, config=cfg))  # forward = one guarded step
    with collective_guard("all_reduce(loss)"):
        dist.all_reduce(loss)

    rannc_hf.reliability.watchdog.CollectiveTimeoutError:
      rank 0: collective 'RanncModule.forward #3' (pipeline step) over ranks [0, 1] failed after 5.0 s
      (timeout 5 s): ... Timed out waiting 5000ms for recv ...
      peers: rank 1 last entered 'RanncModule.forward #2' 7.1 s ago -> stuck or dead ...

Progress marks go to the rendezvous store torchrun already runs (``rannc_hf/at/<rank>``: the last
guarded collective each rank entered), so no extra port is opened. :func:`install` also wraps the
``torch.distributed`` collectives themselves (``all_reduce``, ``broadcast``, ``barrier``, ...).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from typing import Any, Iterator, Optional

import torch

from ..errors import RanncError

__all__ = ["CollectiveTimeoutError", "collective_guard", "guard_module", "install", "translate"]


class CollectiveTimeoutError(RanncError, TimeoutError):
    """A collective did not complete: a peer is dead, stuck, or slower than ``collective_timeout_s``."""


_MARKERS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe", "closed by peer",
            "connection refused", "socket", "nccl communicator was aborted", "watchdog", "peer")
_seq = 0


def _dist_ready() -> bool:
    d = torch.distributed
    return d.is_available() and d.is_initialized()


def _store():
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # noqa: BLE001
        return None


def _mark(name: str) -> None:
    """Record in the rendezvous store which collective this rank entered, and when."""
    if not _dist_ready() or torch.distributed.get_world_size() < 2:
        return
    st = _store()
    if st is None:
        return
    try:
        st.set(f"rannc_hf/at/{torch.distributed.get_rank()}", f"{time.time():.3f}|{name}")
    except Exception:  # noqa: BLE001 - progress marks are best effort
        pass


def _peer_report(ranks: list[int], me: int) -> str:
    st = _store()
    if st is None:
        return ""
    now, lines = time.time(), []
    for r in ranks:
        if r == me:
            continue
        key = f"rannc_hf/at/{r}"
        try:
            if not st.check([key]):
                lines.append(f"rank {r} never entered a guarded collective")
                continue
            t, name = st.get(key).decode().split("|", 1)
            lines.append(f"rank {r} last entered {name!r} {now - float(t):.1f} s ago")
        except Exception:  # noqa: BLE001 - the store itself may be gone with rank 0
            lines.append(f"rank {r}: unknown (the rendezvous store is unreachable)")
    return "; ".join(lines)


def _group_ranks(group) -> list[int]:
    d = torch.distributed
    try:
        return list(d.get_process_group_ranks(group)) if group is not None else list(range(d.get_world_size()))
    except Exception:  # noqa: BLE001
        return list(range(d.get_world_size())) if _dist_ready() else [0]


def _timeout_s(group=None) -> Optional[float]:
    try:
        from torch.distributed.distributed_c10d import _get_default_group

        pg = group or _get_default_group()
        opts = getattr(pg, "options", None) or getattr(pg, "_get_backend", lambda *_: None)(torch.device("cpu"))
        t = getattr(getattr(opts, "options", opts), "_timeout", None) or getattr(opts, "_timeout", None)
        return t.total_seconds() if t is not None else None
    except Exception:  # noqa: BLE001
        return None


def is_comm_failure(exc: BaseException) -> bool:
    """True when ``exc`` looks like a collective that timed out or lost its peer."""
    if isinstance(exc, CollectiveTimeoutError):
        return False
    name = type(exc).__name__
    if name in ("DistBackendError", "DistNetworkError", "DistStoreError"):
        return True
    if not isinstance(exc, (RuntimeError, TimeoutError, ConnectionError, OSError)):
        return False
    msg = str(exc).lower()
    return any(m in msg for m in _MARKERS)


def translate(exc: BaseException, name: str, group=None, started: Optional[float] = None,
              timeout_s: Optional[float] = None) -> Optional[CollectiveTimeoutError]:
    """A :class:`CollectiveTimeoutError` for a communication failure ``exc`` in ``name``, else ``None``."""
    if not is_comm_failure(exc):
        return None
    rank = torch.distributed.get_rank() if _dist_ready() else int(os.environ.get("RANK", 0))
    ranks = _group_ranks(group) if _dist_ready() else []
    waited = f" after {time.time() - started:.1f} s" if started else ""
    tmo = timeout_s if timeout_s is not None else _timeout_s(group)
    tmo_s = f" (collective_timeout_s={tmo:g})" if tmo else ""
    peers = _peer_report(ranks, rank)
    others = [r for r in ranks if r != rank]
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return CollectiveTimeoutError(
        f"rank {rank}: collective {name!r} over ranks {ranks} failed{waited}{tmo_s}: {first}. "
        f"A peer ({', '.join(f'rank {r}' for r in others) or 'unknown'}) is dead, stuck, or slower than the timeout"
        + (f"; peers: {peers}" if peers else "") +
        ". Check that rank's log for its own error; if a step legitimately takes longer, raise "
        "collective_timeout_s in the rannc config. Under torchrun --max-restarts the job restarts and "
        "resumes from the newest checkpoint.")


@contextlib.contextmanager
def collective_guard(name: str, group=None, timeout_s: Optional[float] = None) -> Iterator[None]:
    """Mark entry into collective ``name``; translate a timeout/peer loss inside into CollectiveTimeoutError."""
    global _seq
    _seq += 1
    label = f"{name} #{_seq}"
    _mark(label)
    t0 = time.time()
    try:
        yield
    except CollectiveTimeoutError:
        raise
    except BaseException as e:
        err = translate(e, label, group, t0, timeout_s)
        if err is None:
            raise
        raise err from e


def guard_module(module: Any, name: Optional[str] = None) -> Any:
    """Run every ``forward`` of ``module`` (a RanncModule: one whole pipeline step) inside
    :func:`collective_guard`; returns the module. Idempotent."""
    if getattr(module, "_rannc_guarded", False):
        return module
    fwd = module.forward
    label = name or f"{type(module).__name__}.forward (pipeline step)"
    timeout = getattr(getattr(module, "config", None), "collective_timeout_s", None)
    group = None

    @functools.wraps(fwd)
    def guarded(*args, **kwargs):
        with collective_guard(label, group, timeout):
            return fwd(*args, **kwargs)

    module.forward = guarded
    module._rannc_guarded = True
    return module


_WRAPPED = ("all_reduce", "broadcast", "barrier", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
            "all_to_all_single", "reduce", "gather", "scatter", "send", "recv", "all_gather_object",
            "broadcast_object_list")


def install() -> None:
    """Wrap the ``torch.distributed`` collectives so their failures become CollectiveTimeoutError. Idempotent."""
    d = torch.distributed
    for fname in _WRAPPED:
        fn = getattr(d, fname, None)
        if fn is None or getattr(fn, "_rannc_guarded", False):
            continue

        def make(fn=fn, fname=fname):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                group = kwargs.get("group")
                with collective_guard(f"torch.distributed.{fname}", group):
                    return fn(*args, **kwargs)

            wrapper._rannc_guarded = True
            return wrapper

        setattr(d, fname, make())
