"""The benchmark tools that diagnose GPU runs, on CPU: they must work before a GPU call depends on them."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_multi_gpu_profile_reports_every_rank(tmp_path):
    """``multi_gpu.py run --profile`` (what found the two-GPU run's pageable copy): each rank's offload engine
    counters, its kernel table, and rank 0's trace, from a 2-stage pipeline under gloo."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           os.path.join(ROOT, "benchmarks", "multi_gpu.py"), "run", "--tiny", "--partitioners", "auto",
           "--num-stages", "2", "--offload", "optimizer", "--steps", "1", "--warmup", "1", "--profile"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
    (res,) = [f for f in os.listdir(tmp_path) if f.startswith("multi_gpu_") and f.endswith(".json")]
    r = json.load(open(tmp_path / res))["results"][0]
    ranks = r["profile_per_rank"]
    assert [p["rank"] for p in ranks] == [0, 1]
    for p in ranks:
        e = p["engine_per_step"]
        assert e["mode"] == "optimizer" and e["h2d_bytes"] > 0 and e["d2h_bytes"] > 0
    for rank in (0, 1):
        assert "Self CPU" in (tmp_path / f"profile_rank{rank}.txt").read_text()
    assert (tmp_path / "trace_rank0.json.gz").stat().st_size > 0
