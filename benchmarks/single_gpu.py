"""One GPU, one stage: rannc_hf's RanncModule against plain PyTorch on the same model and batch.

    python benchmarks/single_gpu.py                       # all variants (needs a CUDA GPU)
    python benchmarks/single_gpu.py --variants plain:1.3b:16 rannc:1.3b:16 --steps 8
    python benchmarks/single_gpu.py --tiny                # CPU smoke test of the script itself

Variants are ``SYSTEM:SIZE:MICROBATCH`` (SIZE: a GPT-2 size, or ``bert-large`` / ``bert-tiny`` for BERT MLM) with SYSTEM in ``plain`` (eager, bf16 autocast, fused AdamW),
``plain-compile`` (``torch.compile(model)``), ``rannc`` (RanncModule, one stage, compile off) and
``rannc-compile`` (RanncModule with ``compile: true``). Each variant runs in its own subprocess so
peak-memory figures do not mix. GPT-2-style models at seq 1024, vocab 50304 (DESIGN.md section 7); BERT-large at seq 512.
Writes ``benchmarks/results/single_gpu.json`` (or under ``$OUT`` when set) with ratios rannc/plain.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SIZES = {"tiny": (64, 2, 4, 128, 1000), "350m": (1024, 24, 16, 1024, 50304), "1.3b": (2048, 24, 16, 1024, 50304),
         "2.7b": (2560, 32, 32, 1024, 50304),
         # BERT (masked LM): d, layers, heads, seq, vocab
         "bert-tiny": (64, 2, 4, 128, 1000), "bert-large": (1024, 24, 16, 512, 30522)}
DEFAULT_VARIANTS = ["plain:1.3b:16", "rannc:1.3b:16", "plain-compile:1.3b:16", "rannc-compile:1.3b:16",
                    "plain:2.7b:8", "rannc:2.7b:8"]


def build(size: str, device):
    import torch
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    d, L, h, seq, vocab = SIZES[size]
    if size.startswith("bert"):
        cfg = BertConfig(hidden_size=d, num_hidden_layers=L, num_attention_heads=h, intermediate_size=4 * d,
                         max_position_embeddings=seq, vocab_size=vocab, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        return BertForMaskedLM(cfg).to(device), cfg, seq
    cfg = GPT2Config(n_embd=d, n_layer=L, n_head=h, n_positions=seq, vocab_size=vocab, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).to(device)
    return model, cfg, seq


def run_variant(variant: str, steps: int, warmup: int) -> dict:
    import torch

    system, size, mb = variant.split(":")
    mb = int(mb)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model, cfg, seq = build(size, device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    x = torch.randint(0, cfg.vocab_size, (mb, seq), device=device)
    batch = {"input_ids": x, "labels": x}
    predicted_peak = None
    if system.startswith("rannc"):
        import rannc_hf

        rcfg = rannc_hf.RanncConfig(num_stages=1, num_microbatches=1, precision="bf16" if cuda else "fp32",
                                    compile="true" if system.endswith("compile") else "false", offload="none",
                                    recompute="none")
        model = rannc_hf.RanncModule(model, opt, config=rcfg, example_batch=batch)
        plan = getattr(model, "plan", None)
        if plan is not None and plan.stages and plan.stages[0].memory:
            predicted_peak = plan.stages[0].peak_bytes
    elif system == "plain-compile":
        model = torch.compile(model)
    dtype = torch.bfloat16 if cuda else torch.float32

    def step():
        if system.startswith("rannc"):
            loss = model(**batch).loss
        else:
            with torch.autocast(device.type, dtype=dtype, enabled=cuda):
                loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_first = time.perf_counter()
    for _ in range(warmup):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    t_warm = time.perf_counter() - t_first
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    d, L = SIZES[size][0], SIZES[size][1]
    flops_per_token = 6 * n_params + 12 * L * d * seq
    tok = mb * seq / dt
    out = {"variant": variant, "system": system, "size": size, "microbatch": mb, "seq": seq, "params": n_params,
           "step_s": dt, "tokens_per_s": tok, "warmup_s": t_warm, "loss": float(loss.detach()),
           "mfu_vs_790": tok * flops_per_token / 790e12 if cuda else None}
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if predicted_peak:
            out["predicted_peak_gib"] = predicted_peak / 2**30
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="*", default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny model")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: run one variant
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_variant(args.one, args.steps, args.warmup)), flush=True)
        return 0
    variants = args.variants or (["plain:tiny:4", "rannc:tiny:4"] if args.tiny else DEFAULT_VARIANTS)
    results = []
    for v in variants:
        t = time.time()
        proc = subprocess.run([sys.executable, __file__, "--one", v, "--steps", str(args.steps),
                               "--warmup", str(args.warmup)], capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            err = (proc.stderr or proc.stdout).strip().splitlines()[-25:]
            results.append({"variant": v, "error": "\n".join(err)})
            print(f"{v}: FAILED\n" + "\n".join(err), flush=True)
            continue
        r = json.loads(line[7:])
        r["wall_s"] = time.time() - t
        results.append(r)
        print(f"{v}: {r['tokens_per_s']:,.0f} tok/s, step {r['step_s'] * 1e3:.0f} ms, "
              f"peak {r.get('peak_gib', 0):.1f} GiB, predicted {r.get('predicted_peak_gib') or 0:.1f} GiB", flush=True)
    ratios = {}
    by = {r["variant"]: r for r in results if "error" not in r}
    for v, r in by.items():
        system, size, mb = v.split(":")
        peer = {"rannc": "plain", "rannc-compile": "plain-compile"}.get(system)
        p = by.get(f"{peer}:{size}:{mb}") if peer else None
        if p:
            ratios[v] = {"vs": p["variant"], "tokens_per_s_ratio": r["tokens_per_s"] / p["tokens_per_s"],
                         "peak_mem_ratio": (r.get("peak_gib") or 0) / p["peak_gib"] if p.get("peak_gib") else None}
        if r.get("predicted_peak_gib") and r.get("peak_gib"):
            ratios.setdefault(v, {})["memory_prediction_error"] = r["predicted_peak_gib"] / r["peak_gib"] - 1
    from benchmarks.common import write_result

    path = write_result("single_gpu" + ("_tiny" if args.tiny else ""), {"results": results, "ratios": ratios},
                        out_dir=os.environ.get("OUT") and os.path.join(os.environ["OUT"]))
    print(json.dumps(ratios, indent=1))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
