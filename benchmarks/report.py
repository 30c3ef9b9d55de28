"""Render the benchmark results (``benchmarks/results/*.json``) into README tables and plots.

    python benchmarks/report.py            # rewrites the <!-- bench:NAME --> blocks of README.md
    python benchmarks/report.py --check    # exit 1 if README.md is out of date

Each table is generated from the JSON files alone (which carry date, device and versions), so the
README never quotes a number that is not in a committed result file.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")


def _load(name: str):
    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _env_line(d: dict) -> str:
    e = d.get("environment") or {"device": d.get("device"), "date": d.get("date"), **(d.get("versions") or {})}
    return (f"*{e.get('device', '?')}, torch {e.get('torch', '?')}, transformers {e.get('transformers', '?')}, "
            f"{e.get('date', '?')[:10]}; source: `benchmarks/results/{d.get('_file', '')}`*")


def single_gpu() -> str:
    files = sorted(glob.glob(os.path.join(RESULTS, "single_gpu_h200*.json")))
    if not files:
        return "_no results yet_"
    d = _load(os.path.basename(files[-1]))
    d["_file"] = os.path.basename(files[-1])
    rows = ["| variant | tokens/s | MFU | peak GiB | vs peer (tokens/s) | vs peer (memory) |", "|---|---|---|---|---|---|"]
    ratios = d.get("ratios", {})
    for r in d["results"]:
        if "error" in r:
            rows.append(f"| {r['variant']} | failed | | | | |")
            continue
        rt = ratios.get(r["variant"], {})
        tr = f"{rt['tokens_per_s_ratio']:.3f}x {rt['vs'].split(':')[0]}" if "tokens_per_s_ratio" in rt else ""
        mr = f"{rt['peak_mem_ratio']:.3f}x" if rt.get("peak_mem_ratio") else ""
        mfu = f"{r['mfu_vs_790']:.0%}" if r.get("mfu_vs_790") else ""
        rows.append(f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {mfu} | {r.get('peak_gib', 0):.1f} | {tr} | {mr} |")
    return "\n".join(rows) + "\n\n" + _env_line(d)


def plan_tables() -> str:
    out = []
    speed = _load("plan_speed.json")
    if speed:
        speed["_file"] = "plan_speed.json"
        out.append("| model | GPUs | params | capture s | plan s | total s | stages x dp x microbatches |")
        out.append("|---|---|---|---|---|---|---|")
        for c in speed.get("cases", []):
            layout = f"{c.get('num_stages', '?')} x {c.get('dp_size', '?')} x {c.get('num_microbatches', '?')}"
            out.append(f"| {c.get('name', '?')} | {c.get('gpus', '?')} | {c.get('params_b', 0):.1f}B | "
                       f"{c.get('capture_s', 0):.1f} | {c.get('plan_s', 0):.1f} | {c.get('total_s', 0):.1f} | {layout} |")
        out.append("\n" + _env_line(speed))
    quality = _load("plan_quality.json")
    if quality:
        quality["_file"] = "plan_quality.json"
        out.append("\n| model | GPUs | auto ms | even ms | params ms | auto vs even | auto vs params |")
        out.append("|---|---|---|---|---|---|---|")
        for c in quality.get("cases", []):
            a, e, p = c.get("auto_ms"), c.get("even_ms"), c.get("params_ms")

            def f(x):
                return f"{x:.1f}" if isinstance(x, (int, float)) else "does not fit"

            def r(x):
                return f"{x / a:.2f}x" if isinstance(x, (int, float)) and a else "-"
            out.append(f"| {c.get('name', '?')} | {c.get('gpus', '?')} | {f(a)} | {f(e)} | {f(p)} | {r(e)} | {r(p)} |")
        out.append("\n" + _env_line(quality))
    return "\n".join(out) if out else "_no results yet_"


def offload() -> str:
    d = _load("offload_gpt_h200.json") or _load("offload_gpt_h200_first.json")
    if not d:
        return "_no results yet_"
    d["_file"] = "offload_gpt_h200.json" if _load("offload_gpt_h200.json") else "offload_gpt_h200_first.json"
    rows = ["| system | tokens/s | GPU peak GiB | note |", "|---|---|---|---|"]
    for r in d.get("results", d.get("runs", [])):
        name = r.get("name") or r.get("system") or r.get("mode") or "?"
        if r.get("accum"):
            name += f" (accum {r['accum']})"
        tok = r.get("tokens_per_s")
        peak = r.get("gpu_peak_gib", r.get("peak_gib"))
        if peak is None and r.get("peak_gpu_bytes"):
            peak = r["peak_gpu_bytes"] / 2**30
        note = r.get("note", "") or ("failed: " + str(r["error"])[:60] if r.get("error") else "")
        peak_s = f"{peak:.1f}" if isinstance(peak, (int, float)) else "-"
        rows.append(f"| {name} | {tok:,.0f} | {peak_s} | {note} |" if tok else f"| {name} | - | - | {note} |")
    ratios = d.get("ratios")
    tail = ("\n\nratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items() if isinstance(v, (int, float)))) if ratios else ""
    return "\n".join(rows) + tail + "\n\n" + _env_line(d)


SECTIONS = {"single_gpu": single_gpu, "plan": plan_tables, "offload": offload}


def render(readme: str) -> str:
    for name, fn in SECTIONS.items():
        pat = re.compile(rf"(<!-- bench:{name} -->\n)(.*?)(<!-- /bench:{name} -->)", re.S)
        readme = pat.sub(lambda m: m.group(1) + fn() + "\n" + m.group(3), readme)
    return readme


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="render benchmark tables into README.md")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    path = os.path.join(ROOT, "README.md")
    with open(path) as f:
        old = f.read()
    new = render(old)
    if args.check:
        return 0 if new == old else 1
    with open(path, "w") as f:
        f.write(new)
    print("README.md tables updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
