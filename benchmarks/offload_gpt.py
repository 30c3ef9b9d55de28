"""Benchmark: how fast does a GPT-2-style model train on a GPU too small for it, with rannc_hf offload?

Question: GPT-2-style 2.7B (d 2560, 32 layers, 32 heads), seq 1024, micro-batch 8, bf16 compute,
fp32 master weights, AdamW, the GPU capped at 24 GiB with ``torch.cuda.set_per_process_memory_fraction``
(plain PyTorch needs ~94 GiB). For each offload mode: tokens/s, peak GPU memory, peak host memory,
bytes moved, share of copy time hidden behind compute, CPU optimizer time. Optionally plain PyTorch
uncapped in the same run (``--baseline``) for the ratio. Peers' figures: DESIGN.md section 7.

    python benchmarks/offload_gpt.py                       # H200: modes optimizer and all, accum 1 and 8
    python benchmarks/offload_gpt.py --baseline --accum 1 8
    python benchmarks/offload_gpt.py --tiny                # CPU smoke test, a few seconds

Writes ``benchmarks/results/offload_gpt_<date>.json`` (or ``--out``) with date, device and versions.
Works with torch >= 2.11 and transformers >= 5.17; needs no network and no ``datasets``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import sys
import threading
import time

import psutil
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rannc_hf.offload import offload_cost, offload_module  # noqa: E402

GiB = 2**30


def build_model(tiny: bool, dtype_init=torch.float32):
    import transformers as tf

    if tiny:
        cfg = tf.GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=128, vocab_size=512,
                            bos_token_id=0, eos_token_id=0)
    else:
        cfg = tf.GPT2Config(n_embd=2560, n_layer=32, n_head=32, n_positions=1024, vocab_size=50257)
    for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(cfg, k, 0.0)
    cfg.use_cache = False
    try:
        model = tf.GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa", dtype=dtype_init)
    except TypeError:  # older transformers: torch_dtype
        model = tf.GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa", torch_dtype=dtype_init)
    model.train()
    return model, cfg


class HostPeak:
    """Samples this process's RSS in a thread; ``peak`` is the maximum seen."""

    def __init__(self, interval: float = 0.05):
        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._t.start()

    def _run(self, interval):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(interval)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(args, device, mode: str, accum: int, cap_bytes, dev_blocks: int = 0, threads: int = 0) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        frac = 1.0 if cap_bytes is None else min(1.0, cap_bytes / torch.cuda.get_device_properties(device).total_memory)
        torch.cuda.set_per_process_memory_fraction(frac, device)
    torch.manual_seed(0)
    model, cfg = build_model(args.tiny)
    n_params = sum(p.numel() for p in model.parameters())
    if args.recompute:
        import warnings

        with warnings.catch_warnings():  # renamed activation_checkpointing_enable in newer transformers
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    dtype = torch.bfloat16
    host = HostPeak()
    result = {"mode": mode, "accum": accum, "params": n_params, "gpu_cap_bytes": cap_bytes,
              "device_step_blocks": dev_blocks, "worker_threads": threads or torch.get_num_threads()}
    try:
        if mode == "plain":
            model.to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
            handle = None
            if args.compile_plain:   # the plain peer with torch.compile (its first step compiles)
                model = torch.compile(model)
                result["compiled"] = True
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            handle = offload_module(model, opt, mode, device=device, compute_dtype=dtype,
                                    prefetch_blocks=args.prefetch, timing=device.type == "cuda",
                                    async_step=args.async_step, device_step_blocks=dev_blocks,
                                    cpu_threads=threads or None)
        seq, mb = args.seq, args.micro_batch
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (mb, seq), generator=g).to(device)

        marks = []

        def mark(name):
            if marks is not None and device.type == "cuda" and record[0]:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                marks.append((name, time.perf_counter(), ev))

        record = [False]

        def one_step():
            mark("start")
            for _ in range(accum):
                if mode == "plain":
                    with torch.autocast(device.type, dtype=dtype):
                        loss = model(input_ids=ids, labels=ids).loss / accum
                else:
                    loss = model(input_ids=ids, labels=ids).loss / accum
                mark("forward")
                loss.backward()
                mark("backward")
            if handle is not None:
                handle.clip_grad_norm_(1.0)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            mark("clip")
            opt.step()
            mark("step")
            opt.zero_grad(set_to_none=True)
            return loss

        def finish():  # the background worker may still step the last blocks: count that time too
            if handle is not None:
                handle.engine.synchronize()
            sync(device)

        for _ in range(args.warmup):
            one_step()
        finish()
        if handle is not None:
            handle.engine.reset_stats()
        t0 = time.perf_counter()
        for _ in range(args.steps8 if (accum > 1 and args.steps8) else args.steps):
            loss = one_step()
        finish()
        dt = time.perf_counter() - t0
        tokens = (args.steps8 if (accum > 1 and args.steps8) else args.steps) * accum * mb * seq
        n_steps = args.steps8 if (accum > 1 and args.steps8) else args.steps
        if device.type == "cuda":  # one more step with a timeline: host marks, GPU events, worker tasks
            finish()
            if handle is not None:
                handle.engine.wlog.clear()
            record[0] = True
            one_step()
            mark("next_forward")
            model(input_ids=ids, labels=ids).loss.backward()  # the next forward waits for the blocks' steps
            mark("next_backward")
            finish()
            record[0] = False
            h0, e0 = marks[0][1], marks[0][2]
            result["timeline"] = [(n, round(h - h0, 4), round(e0.elapsed_time(e) / 1e3, 4)) for n, h, e in marks]
            if handle is not None:
                result["worker_log"] = [(k, b, round(a - h0, 4), round(w - h0, 4), round(c - h0, 4))
                                        for k, b, a, w, c in handle.engine.wlog]
                handle.engine.zero_grad()
            print("  timeline (name, host s, gpu s):", result["timeline"], flush=True)
            if handle is not None:
                wl = result["worker_log"]
                folds = [x for x in wl if x[0] == "fold"]
                steps_ = [x for x in wl if x[0] == "step"]
                if folds:
                    print(f"  folds: {len(folds)} from {folds[0][2]} to {folds[-1][4]}, busy "
                          f"{sum(x[4] - x[3] for x in folds):.3f} s, event wait {sum(x[3] - x[2] for x in folds):.3f} s", flush=True)
                if steps_:
                    print(f"  steps: {len(steps_)} from {steps_[0][2]} to {steps_[-1][4]}, busy "
                          f"{sum(x[4] - x[3] for x in steps_):.3f} s", flush=True)
        result.update(ok=True, loss=float(loss.detach()) * accum, step_time_s=dt / n_steps, tokens_per_s=tokens / dt,
                      tflops_per_s=6 * n_params * tokens / dt / 1e12)
        if device.type == "cuda":
            result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
            result["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        if handle is not None:
            st = handle.stats()
            steps = max(1, st["steps"])
            result["cpu_threads"] = torch.get_num_threads()
            result["offload"] = {
                "h2d_bytes_per_step": st["h2d_bytes"] / steps, "d2h_bytes_per_step": st["d2h_bytes"] / steps,
                "copy_time_s_per_step": st["copy_time_s"] / steps, "stall_time_s_per_step": st["stall_time_s"] / steps,
                "hidden_fraction": st["hidden_fraction"], "cpu_step_time_s": st["step_time_s"] / steps,
                "grad_reduce_time_s_per_step": st["grad_reduce_time_s"] / steps,
                "resident_peak_blocks": st["resident_peak_blocks"], "host_store_bytes": st["host_bytes"],
                "pcie_utilisation": ((st["h2d_bytes"] + st["d2h_bytes"]) / steps / (dt / n_steps)) / (args.link_gbps * 1e9),
            }
            predicted = offload_cost(param_bytes=4 * n_params, grad_bytes=2 * n_params, optim_bytes=8 * n_params,
                                     fwd_time=args.fwd_time, bwd_time=args.bwd_time, link_gbps=args.link_gbps,
                                     cpu_adam_params_per_s=args.cpu_adam, mode=mode, num_blocks=cfg.n_layer,
                                     prefetch_blocks=args.prefetch, microbatches=accum, recompute=args.recompute)
            result["predicted"] = predicted.to_dict()
    except torch.OutOfMemoryError as e:  # noqa: PERF203
        result.update(ok=False, error=f"OOM: {str(e).splitlines()[0]}")
    except Exception as e:  # report and go on with the next case
        result.update(ok=False, error=f"{type(e).__name__}: {e}")
    finally:
        result["peak_host_rss_bytes"] = host.stop()
        if "handle" in locals() and handle is not None:
            handle.remove(restore=False)  # the fp32 model would not fit under the cap; it is dropped anyway
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke test)")
    ap.add_argument("--modes", default="optimizer,all", help="comma list of offload modes (optimizer,params,all)")
    ap.add_argument("--baseline", action="store_true", help="also run plain PyTorch, uncapped")
    ap.add_argument("--accum", type=int, nargs="+", default=[1, 8], help="micro-batches per optimizer step")
    ap.add_argument("--gpu-cap", default="24GiB", help="GPU memory cap for the offload runs")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--no-recompute", dest="recompute", action="store_false",
                    help="disable activation checkpointing (it is on by default: activations of mb 8 do not fit 24 GiB)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--link-gbps", type=float, default=55.0, help="host<->GPU GB/s one way, for utilisation/prediction")
    ap.add_argument("--cpu-adam", type=float, default=4.0e9, help="CPU AdamW params/s, for the prediction")
    ap.add_argument("--fwd-time", type=float, default=None, help="GPU fwd s/microbatch for the prediction")
    ap.add_argument("--bwd-time", type=float, default=None, help="GPU bwd s/microbatch for the prediction")
    ap.add_argument("--cases", default=None,
                    help="explicit comma list of MODE:ACCUM[:K] (e.g. plain:1,optimizer:1:12,optimizer:8); K: blocks stepped on the GPU; "
                         "overrides --modes/--accum/--baseline")
    ap.add_argument("--async", dest="async_step", default=None, type=lambda v: v.lower() in ("1", "true", "yes"),
                    help="engine background pipeline (default: on for CUDA)")
    ap.add_argument("--steps8", type=int, default=None, help="timed steps for accum > 1 cases (default --steps)")
    ap.add_argument("--compile-plain", action="store_true", help="plain cases run torch.compile(model)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from rannc_hf.units import parse_bytes

    if args.tiny:
        device = torch.device("cpu")
        args.seq = args.seq or 64
        args.micro_batch = args.micro_batch or 2
        args.warmup = 1 if args.warmup is None else args.warmup
        args.steps = 2 if args.steps is None else args.steps
        args.accum = [a for a in args.accum if a <= 2] or [1]
        cap = None
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --tiny for a CPU smoke test", file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
        args.seq = args.seq or 1024
        args.micro_batch = args.micro_batch or 8
        args.warmup = 2 if args.warmup is None else args.warmup
        args.steps = 5 if args.steps is None else args.steps
        cap = parse_bytes(args.gpu_cap)
    # GPU compute per micro-batch for the prediction: 6*N*tokens at ~40% of 790 TFLOP/s unless given
    n_est = 2.65e9 if not args.tiny else 2.5e5
    t_mb = 6 * n_est * args.seq * args.micro_batch / (0.4 * 790e12)
    args.fwd_time = args.fwd_time or t_mb / 3
    args.bwd_time = args.bwd_time or 2 * t_mb / 3

    cases = []
    if args.cases:
        for c in args.cases.split(","):
            m, a, *k = c.split(":")
            cases.append((m, int(a), None if m == "plain" else cap, int(k[0]) if k else 0,
                          int(k[1]) if len(k) > 1 else 0))
    else:
        if args.baseline:
            cases += [("plain", a, None) for a in args.accum]
        cases += [(m.strip(), a, cap) for m in args.modes.split(",") if m.strip() for a in args.accum]
        cases = [c if len(c) == 5 else (*c, 0, 0) for c in cases]
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}", flush=True)
    def dump():
        import transformers

        out = {
            "benchmark": "offload_gpt",
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "host": {"cpus": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "config": {k: v for k, v in vars(args).items() if k != "out"},
            "results": results,
        }
        path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        f"offload_gpt{'_tiny' if args.tiny else ''}_{_dt.date.today().isoformat()}.json")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(out, f, indent=2, default=str)
        return path

    results = []
    for mode, accum, c, k, th in cases:
        t = time.time()
        r = run_case(args, device, mode, accum, c, k, th)
        results.append(r)
        path = dump()  # after every case: a later one may run out of time
        msg = (f"{r['tokens_per_s']:.0f} tokens/s, step {r['step_time_s']:.2f} s" if r.get("ok") else r.get("error"))
        extra = ""
        if r.get("ok") and "peak_gpu_bytes" in r:
            extra += f", GPU peak {r['peak_gpu_bytes'] / GiB:.1f} GiB"
        if r.get("offload"):
            extra += f", hidden {r['offload']['hidden_fraction']:.0%}"
        print(f"[{mode:9s} accum {accum} gpu-step {k} threads {th}] {msg}{extra}, host peak {r['peak_host_rss_bytes'] / GiB:.1f} GiB "
              f"({time.time() - t:.0f} s)", flush=True)

    path = dump()
    print(f"wrote {path}")
    return 0 if all(r.get("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
