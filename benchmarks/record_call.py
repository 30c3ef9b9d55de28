"""Record one H200 call's offload results in ``benchmarks/results/offload_rannc_h200.json`` (the README's offload
tables are rendered from it by ``report.py``): each ``offload_profile.py`` JSON becomes a row, each peer line
(``offload_peers.py``'s JSONL) a peer row of the same call.

    python benchmarks/record_call.py step_in_backward_call5 \\
        --command "benchmarks/h200/next16.sh (eighth session, call 1, nvidia-h200)" \\
        --run rannc_step_in_backward=out/next16/results/sib/offload_profile_rannc.json:"GPT-2 2.7B ..." \\
        --peers out/next16/results/ds.jsonl --note "..."

A run's label after the second ``:`` is the table's plan column. Ratios against every peer of the call are
added for the first 2.7B run (``ratio_vs_deepspeed``, ``ratio_vs_fsdp2``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "offload_rannc_h200.json")
_PEER_KEYS = {"deepspeed_zero3_offload": "ratio_vs_deepspeed", "fsdp2_cpuoffload": "ratio_vs_fsdp2",
              "plain_pytorch_uncapped": "ratio_vs_plain", "plain_pytorch_uncapped_compiled": "ratio_vs_plain_compiled"}


def run_entry(profile: dict, label: str) -> dict:
    """The row fields of one ``offload_profile.py`` result."""
    e = profile.get("engine_per_step", {})
    return {"step_time_s": profile["step_time_s"], "tokens_per_s": profile["tokens_per_s"],
            "predicted_step_time_s": profile["predicted_step_time_s"],
            "gpu_peak_gib": profile.get("max_allocated_gib"), "blocks": profile.get("blocks"),
            "clip_grad_norm": profile.get("clip_grad_norm"), "step_in_backward": profile.get("step_in_backward"),
            "h2d_gb_per_step": e.get("h2d_bytes", 0.0) / 1e9, "d2h_gb_per_step": e.get("d2h_bytes", 0.0) / 1e9,
            "engine_cpu_step_s": e.get("step_time_s", 0.0), "early_block_steps_per_step": e.get("early_block_steps"),
            "copy_hidden_fraction": e.get("hidden_fraction"), "stall_time_s": e.get("stall_time_s"),
            "step_times_s": profile.get("step_times_s"), "losses": profile.get("losses"), "plan": label}


def peer_entries(path: str) -> dict:
    out = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out[r["section"]] = {"step_time_s": r["step_s"], "tokens_per_s": r["tokens_per_s"],
                                     "gpu_peak_gib": r.get("peak_gib")}
    return out


def plain_entries(path: str, name: str = "plain_pytorch_uncapped") -> dict:
    """``offload_gpt.py``'s plain (uncapped, no offload) case as a peer row: ``name``, or ``name_accumN`` for each
    further accumulation the file holds."""
    with open(path) as f:
        d = json.load(f)
    out = {}
    for r in d["results"]:
        if r.get("mode") != "plain" or not r.get("ok"):
            continue
        key = name if not out else f"{name}_accum{r['accum']}"
        out[key] = {"step_time_s": r["step_time_s"], "tokens_per_s": r["tokens_per_s"],
                    "gpu_peak_gib": r["peak_gpu_bytes"] / 2**30, "accum": r["accum"],
                    "micro_batch": d["config"].get("micro_batch")}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("key", help="the call's key in the results file (e.g. step_in_backward_call5)")
    ap.add_argument("--command", required=True, help="script, session, call and machine")
    ap.add_argument("--run", action="append", default=[], help="NAME=PATH:LABEL, an offload_profile.py JSON")
    ap.add_argument("--peers", action="append", default=[], help="offload_peers.py JSONL of the same call")
    ap.add_argument("--plain", action="append", default=[],
                    help="offload_gpt.py JSON of plain PyTorch in the same call ([NAME=]PATH)")
    ap.add_argument("--note", required=True, help="what the call showed (rendered under the table)")
    ap.add_argument("--results", default=RESULTS)
    args = ap.parse_args(argv)
    block: dict = {"command": args.command}
    first_27b = None
    for spec in args.run:
        name, rest = spec.split("=", 1)
        path, label = rest.split(":", 1)
        with open(path) as f:
            block[name] = run_entry(json.load(f), label)
        if first_27b is None and "1.3b" not in name:
            first_27b = block[name]
    for path in args.peers:
        block.update(peer_entries(path))
    for spec in args.plain:
        name, path = spec.split("=", 1) if "=" in spec else ("plain_pytorch_uncapped", spec)
        block.update(plain_entries(path, name))
    if first_27b is not None:
        for peer, ratio in _PEER_KEYS.items():
            if peer in block:
                block[ratio] = first_27b["tokens_per_s"] / block[peer]["tokens_per_s"]
    block["note"] = args.note
    with open(args.results) as f:
        d = json.load(f)
    d[args.key] = block
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(args.results), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(d, f, indent=1)
        f.write("\n")
    os.replace(tmp, args.results)
    print(json.dumps({k: (v if not isinstance(v, dict) else {kk: v[kk] for kk in ("step_time_s", "tokens_per_s")
                                                                if kk in v}) for k, v in block.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
