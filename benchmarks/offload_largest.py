"""The largest GPT that trains on one GPU box with offload (issue 4: at least 12.7B on one H200 with ~125 GiB
of host RAM; plain PyTorch's largest, measured, is 9.07B).

    python benchmarks/offload_largest.py                       # GPT-2-style 12.85B (d 5120, 40 layers), 4 steps
    python benchmarks/offload_largest.py --layers 44 --k 38    # bigger, 38 layers stepped on the GPU
    python benchmarks/offload_largest.py --tiny                # CPU smoke test, seconds

How it fits: the model is built on the meta device and materialised one block at a time inside
``offload_module`` (``materialize=model._init_weights``), so no full fp32 copy ever sits in host RAM. Mode
``all``: only a few blocks' bf16 weights are on the GPU at once. The first ``k`` layers keep their AdamW
state and (``device_grads``) their fp32 gradients on the GPU, 12 bytes per parameter there and 6 on the
host (fp32 master, bf16 shadow). The other layers and the embeddings keep everything on the host (20 bytes
per parameter) and step on the CPU. Default ``k``: as many layers as fit in the GPU's free memory after a
reserve for activations and the blocks in flight. Activation checkpointing per layer, micro-batch 1.

Writes ``offload_largest_<date>.json`` under ``--out`` (default ``$OUT`` or benchmarks/results/): parameters,
tokens/s, per-step losses, GPU peak, host RSS peak, the engine's counters. Measured on one H200 with 125 GiB of
host RAM (fifth 2026-11-30 session): 12.85B, 35 GPU-stepped layers, 3.6 s/step, GPU peak 126 GiB, host RSS 97 GiB.
``--repeat-batch`` trains on one batch over and over, so a few steps show the loss fall.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import psutil
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rannc_hf.offload import offload_module  # noqa: E402

GiB = 2**30


def build(args):
    import transformers as tf

    cfg = tf.GPT2Config(n_embd=args.d, n_layer=args.layers, n_head=args.heads, n_positions=args.seq,
                        vocab_size=args.vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                        bos_token_id=0, eos_token_id=0)
    with torch.device("meta"):
        model = tf.GPT2LMHeadModel(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, cfg


def default_k(args, per_layer: int, cuda: bool) -> int:
    """Layers whose state and gradients (12 bytes per parameter) fit in the free GPU memory after a reserve."""
    if not cuda:
        return max(1, args.layers // 2)
    free, _ = torch.cuda.mem_get_info()
    return max(0, min(args.layers, int((free - args.reserve_gib * GiB) // (12 * per_layer))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=5120)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--k", type=int, default=None, help="layers stepped on the GPU (default: as many as fit)")
    ap.add_argument("--reserve-gib", type=float, default=14.0, help="GPU memory kept for activations and blocks")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeat-batch", action="store_true", help="the same random batch every step (the loss falls)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)
    if args.tiny:
        args.d, args.layers, args.heads, args.vocab, args.seq = 64, 4, 4, 256, 64
    cuda = torch.cuda.is_available() and not args.tiny
    dev = torch.device("cuda" if cuda else "cpu")

    rss_peak = [psutil.Process().memory_info().rss]
    stop = threading.Event()

    def watch():  # the RSS peak, and a line every 15 s so that a run the kernel kills shows where it stood
        ticks = 0
        while not stop.wait(0.5):
            rss = psutil.Process().memory_info().rss
            rss_peak[0] = max(rss_peak[0], rss)
            ticks += 1
            if ticks % 30 == 0:
                print(f"[host] rss {rss / GiB:.1f} GiB, available {psutil.virtual_memory().available / GiB:.1f} GiB",
                      flush=True)

    threading.Thread(target=watch, daemon=True).start()
    t0 = time.perf_counter()
    model, cfg = build(args)
    n_params = sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for p in model.transformer.h[0].parameters())
    k = args.k if args.k is not None else default_k(args, per_layer, cuda)
    print(f"GPT-2-style {n_params / 1e9:.2f}B parameters ({args.layers} layers x d {args.d}); {k} layers stepped "
          f"on the {'GPU' if cuda else 'CPU stand-in'}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    h = offload_module(model, opt, "all", device=dev, compute_dtype=torch.bfloat16 if cuda else torch.float32,
                       prefetch_blocks=2, async_step=True, device_step_blocks=k, device_grads=True,
                       materialize=model._init_weights)
    build_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator().manual_seed(0)
    times, losses = [], []
    for step in range(args.steps):
        if step == 0 or not args.repeat_batch:
            ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(dev)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        h.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        print(f"step {step}: loss {losses[-1]:.4f}, {times[-1]:.2f} s", flush=True)
    stop.set()
    steady = times[1:] or times
    res = {"benchmark": "offload_largest", "params": n_params, "layers": args.layers, "d": args.d,
           "gpu_stepped_layers": k, "seq": args.seq, "batch": args.batch, "build_s": build_s,
           "step_times_s": times, "tokens_per_s": args.batch * args.seq * len(steady) / sum(steady),
           "losses": losses, "gpu_peak_gib": torch.cuda.max_memory_allocated() / GiB if cuda else None,
           "host_rss_peak_gib": rss_peak[0] / GiB, "engine": h.stats(), "device": str(dev)}
    from benchmarks.common import write_result

    path = write_result("offload_largest" + ("_tiny" if args.tiny else ""), res, out_dir=args.out)
    print(json.dumps({k_: v for k_, v in res.items() if k_ != "engine"}, indent=1, default=str))
    print("wrote", path)
    h.remove(restore=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
