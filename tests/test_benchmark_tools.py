"""The benchmark tools that diagnose GPU runs, on CPU: they must work before a GPU call depends on them."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_multi_gpu_profile_reports_every_rank(tmp_path):
    """``multi_gpu.py run --profile`` (what found the two-GPU run's pageable copy): each rank's offload engine
    counters, its kernel table, and rank 0's trace, from a 2-stage pipeline under gloo."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           os.path.join(ROOT, "benchmarks", "multi_gpu.py"), "run", "--tiny", "--partitioners", "auto",
           "--num-stages", "2", "--offload", "optimizer", "--steps", "1", "--warmup", "1", "--profile"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    (res,) = [f for f in os.listdir(tmp_path) if f.startswith("multi_gpu_") and f.endswith(".json")]
    r = json.load(open(tmp_path / res))["results"][0]
    ranks = r["profile_per_rank"]
    assert [p["rank"] for p in ranks] == [0, 1]
    for p in ranks:
        e = p["engine_per_step"]
        assert e["mode"] == "optimizer" and e["h2d_bytes"] > 0 and e["d2h_bytes"] > 0
        assert "gpu_gaps" in p and p["gpu_gaps"] is None   # trace_gaps.py's summary; a CPU run has no GPU side
    for rank in (0, 1):
        assert "Self CPU" in (tmp_path / f"profile_rank{rank}.txt").read_text()
    assert (tmp_path / "trace_rank0.json.gz").stat().st_size > 0


def test_trace_gaps_attributes_idle_gpu_time_to_the_host_op_running(tmp_path):
    """``trace_gaps.py``: busy time is the union over streams, short gaps are summed, and a long gap is charged to
    the outermost and innermost host ops of the launching thread that were running when it began."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import trace_gaps

    def x(cat, name, ts, dur, tid=1):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": tid}

    events = [
        x("user_annotation", "phase: backward", 0, 1000),
        x("cpu_op", "CheckpointRecompute", 100, 400),
        x("cpu_op", "aten::mm", 150, 10),
        x("cuda_runtime", "cudaLaunchKernel", 152, 5),
        x("cuda_runtime", "cudaLaunchKernel", 600, 5),
        x("cpu_op", "a thread that launches nothing", 0, 2000, tid=2),
        x("kernel", "gemm", 0, 100, tid=7),
        x("kernel", "gemm2", 50, 100, tid=8),        # overlaps the first on another stream: busy 0..150
        x("kernel", "small", 160, 40, tid=7),        # 10 us gap: launch latency
        x("gpu_memcpy", "copy", 700, 300, tid=9),    # 500 us gap, starts at 200 inside the recompute
    ]
    r = trace_gaps.analyze(events, min_gap_us=20)
    assert r["span_ms"] == 1.0 and r["gpu_busy_ms"] == 0.49 and abs(r["gpu_idle_ms"] - 0.51) < 1e-12
    assert r["kernels"] == 3 and r["long_gaps"] == 1 and abs(r["idle_in_short_gaps_ms"] - 0.01) < 1e-12
    assert r["idle_by_outer_host_op_ms"] == [("phase: backward", 0.5)]
    assert r["idle_by_inner_host_op_ms"] == [("CheckpointRecompute", 0.5)]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    assert trace_gaps.summarize_trace(str(path)) == trace_gaps.analyze(events, min_gap_us=20)
    path.write_text(json.dumps({"traceEvents": [e for e in events if e["cat"] in ("cpu_op", "user_annotation")]}))
    assert trace_gaps.summarize_trace(str(path)) is None    # a CPU run: nothing to say about the GPU


def test_trace_gaps_inside_breaks_down_one_host_op():
    """``trace_gaps.py --inside OP``: per call of OP, the time its direct children take (nested ones count once, in
    their parent) and the rest, on the thread each call ran on."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import trace_gaps

    def x(name, ts, dur, tid=1, cat="cpu_op"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": tid}

    events = [
        x("evaluate_function: AccumulateGrad", 0, 120),   # an op around the call, starting with it: not a child
        x("AccumulateGrad", 0, 100), x("aten::norm", 10, 30), x("aten::empty", 15, 5), x("aten::to", 50, 35),
        x("AccumulateGrad", 200, 50), x("aten::to", 210, 10),
        x("aten::to", 20, 60, tid=2),                  # another thread: not a child
        x("AccumulateGrad", 300, 40, tid=2),           # a call on another thread, no children
        x("gemm", 0, 500, tid=7, cat="kernel"),
    ]
    r = trace_gaps.inside(events, "AccumulateGrad")
    assert r["calls"] == 3 and r["mean_us"] == (100 + 50 + 40) / 3
    assert r["children_per_call"] == [("aten::to", 15.0, round(2 / 3, 3)), ("aten::norm", 10.0, round(1 / 3, 3))]
    assert r["uncovered_us_per_call"] == ((100 - 30 - 35) + (50 - 10) + 40) / 3
    with pytest.raises(ValueError, match="no host op"):
        trace_gaps.inside(events, "nothing")
