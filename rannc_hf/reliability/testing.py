"""Fault injection for tests: ``RANNC_HF_TEST_KILL_AT_STEP=5`` makes rank 1 SIGKILL itself once.

    from rannc_hf.reliability.testing import maybe_kill
    for step in range(start, steps):
        maybe_kill(step, marker_dir=output_dir)      # no-op unless the variable is set
        ...

The kill happens only on the first attempt: a marker file ``<marker_dir>/.rannc_test_killed`` is
written (and fsynced) just before, so the restarted job runs through. ``RANNC_HF_TEST_KILL_RANK``
picks another rank (default 1).
"""

from __future__ import annotations

import os
import signal

KILL_ENV = "RANNC_HF_TEST_KILL_AT_STEP"
RANK_ENV = "RANNC_HF_TEST_KILL_RANK"
MARKER = ".rannc_test_killed"


def maybe_kill(step: int, marker_dir: str) -> None:
    at = os.environ.get(KILL_ENV)
    if not at or int(at) != int(step):
        return
    rank = int(os.environ.get("RANK", "0"))
    if rank != int(os.environ.get(RANK_ENV, "1")):
        return
    marker = os.path.join(marker_dir, MARKER)
    if os.path.exists(marker):
        return
    os.makedirs(marker_dir, exist_ok=True)
    with open(marker, "w") as f:
        f.write(f"killed rank {rank} at step {step}, restart {os.environ.get('TORCHELASTIC_RESTART_COUNT', '?')}\n")
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
