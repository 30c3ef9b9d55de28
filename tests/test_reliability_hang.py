"""No silent hangs: a stuck peer makes the waiting rank fail within collective_timeout_s, naming
the rank, the collective and the peer (tests/scripts/rel_hang.py, 2 processes, gloo, timeout 5 s)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from rannc_hf.errors import RanncError
from rannc_hf.reliability import CollectiveTimeoutError, collective_guard

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "rel_hang.py")


def test_stuck_peer_fails_fast_with_clear_error():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANNC_HF_")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        SCRIPT, "5"], env=env, capture_output=True, text=True, timeout=150)
    wall = time.time() - t
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert "NO_ERROR" not in out
    m = re.search(r"HANG_DETECTED_AFTER ([0-9.]+)", out)
    assert m, out[-3000:]
    assert 4.0 <= float(m.group(1)) <= 15.0                     # the configured 5 s, not forever
    msg = next(line for line in out.splitlines() if line.startswith("CollectiveTimeoutError:"))
    for part in ("rank 0:", "collective 'RanncModule.forward (pipeline step)", "over ranks [0, 1]",
                 "collective_timeout_s=5", "rank 1 last entered", "raise collective_timeout_s"):
        assert part in msg, (part, msg)
    print(f"stuck peer detected after {m.group(1)} s (whole job {wall:.1f} s)")


def test_translation_in_process():
    with pytest.raises(CollectiveTimeoutError, match=r"rank 0: collective 'all_reduce\(loss\) #\d+'.*Connection reset"):
        with collective_guard("all_reduce(loss)"):
            raise RuntimeError("[gloo/pair.cc:537] Read error [127.0.0.1]:1234: Connection reset by peer")
    with pytest.raises(ValueError, match="unrelated"):            # other errors pass through untouched
        with collective_guard("all_reduce(loss)"):
            raise ValueError("unrelated")
    assert issubclass(CollectiveTimeoutError, RanncError) and issubclass(CollectiveTimeoutError, TimeoutError)
