"""Where does an offloaded training step spend its time? GPT-2 1.3B, seq 1024, micro-batch 8, bf16,
under a 24 GiB cap, the recipe's path (``RanncModule``, plan chosen by the planner) next to the engine
alone (``offload_module`` on the HF model, every block stepped on the GPU), same model and batch.

The batches are learnable (each row an arithmetic sequence of token ids with its own start and stride,
fresh every step), so the per-step losses of two variants show whether they train the same model.
For each variant: per-step wall times and losses, the plan's predicted step time, the engine's counters (bytes each
way, copy time, stalls, hidden fraction, CPU step time) and a ``torch.profiler`` table of two steps
(top ops by device and by host time); a Chrome trace of one step is written gzipped under ``--out``.

    python benchmarks/offload_profile.py rannc            # RanncModule, compile as configured (auto)
    python benchmarks/offload_profile.py rannc-eager      # RanncModule, compile off
    python benchmarks/offload_profile.py engine           # offload_module alone
    python benchmarks/offload_profile.py plain --no-profile --steps 30   # no offload, uncapped: the loss
                                                          # curve to compare an offloaded run's with
    python benchmarks/offload_profile.py rannc --model 2.7b --batch 64 --microbatches 8   # 64k tokens per step
    python benchmarks/offload_profile.py rannc --model 2.7b --step-in-backward   # blocks step inside backward
    python benchmarks/offload_profile.py rannc --model 2.7b --batch 64 --microbatches 64 --offload optimizer \
        --recompute none --step-in-backward     # 64k tokens: resident weights, 1-sample micro-batches, no recompute
    python benchmarks/offload_profile.py rannc --tiny     # CPU smoke test
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import common  # noqa: E402  (SIGUSR1 stack dumps, versions)
from trainer_gpu import build_model  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _allocator_counters() -> dict:
    """The caching allocator's cumulative retries and device mallocs/frees: under a cap, retries mean the allocator
    freed its cache and synchronized to make room."""
    if not torch.cuda.is_available():
        return {}
    st = torch.cuda.memory_stats()
    return {k: st.get(k, 0) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_ooms")}


def build(variant: str, tiny: bool, cap: str, batch: int, seq: int, size: str = "1.3b", offload: str = "auto",
          microbatches=None, gpu_step_blocks="auto", step_in_backward=False, clip_norm=1.0, mem_margin=None,
          recompute="auto", padded: bool = False, compile_mode: str = "auto", decay_groups: bool = False):
    """(step function, engine or None, predicted step time or None) for ``variant``."""
    if size == "bert-large" and not tiny:   # BERT MLM, seq 512 (single_gpu.py's)
        from single_gpu import build as build_single

        model, cfg, _ = build_single(size, "cpu")
    else:
        model, cfg = build_model(tiny, size)
    g = torch.Generator().manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab = cfg.vocab_size

    def batch_of(i: int) -> torch.Tensor:
        gi = torch.Generator().manual_seed(1000 + i)
        start = torch.randint(0, vocab, (batch, 1), generator=gi)
        stride = torch.randint(1, 64, (batch, 1), generator=gi)
        return (start + stride * torch.arange(seq)) % vocab

    def extra(ids: torch.Tensor) -> dict:
        """``--padded``: an attention_mask whose last eighth of every sequence is padding."""
        if not padded:
            return {}
        mask = torch.ones_like(ids)
        mask[:, -(ids.shape[1] // 8):] = 0
        return {"attention_mask": mask}

    ids = batch_of(0)
    if variant.startswith("rannc") or variant == "plain":
        from rannc_hf import RanncConfig, RanncModule

        opt = torch.optim.AdamW(common.decay_param_groups(model, 0.01) if decay_groups else model.parameters(), lr=2e-4)
        cfg_r = RanncConfig(num_stages=1, precision="fp32" if tiny else "bf16",
                            offload="none" if variant == "plain" else ("all" if tiny else offload),
                            gpu_memory=None if (tiny or variant == "plain") else cap,
                            compile="false" if (tiny or variant == "rannc-eager") else compile_mode,
                            num_microbatches=microbatches, gpu_step_blocks=gpu_step_blocks,
                            step_in_backward=step_in_backward, recompute=recompute,
                            **({} if mem_margin is None else {"mem_margin": mem_margin}))
        m = RanncModule(model, opt, config=cfg_r, example_batch={"input_ids": ids, "labels": ids, **extra(ids)})
        dev = m.device
        eng = m._offload.engine if m._offload is not None else None
        print(m.plan.summary(), flush=True)
        predicted = float(m.plan.predicted_step_time)
        clip = m.clip_grad_norm_
        fwd = m
    else:
        from rannc_hf.offload import offload_module

        if cap and dev.type == "cuda":
            from rannc_hf.units import parse_bytes

            torch.cuda.set_per_process_memory_fraction(parse_bytes(cap) / torch.cuda.get_device_properties(0).total_memory)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
        h = offload_module(model, opt, "all", device=dev, compute_dtype=torch.float32 if tiny else torch.bfloat16,
                           prefetch_blocks=2, device_step_blocks=cfg.n_layer)
        eng, predicted, clip, fwd = h.engine, None, h.clip_grad_norm_, model
    counter = [0]

    from torch.profiler import record_function   # phases, for trace_gaps.py's attribution of idle GPU time

    def step():
        ids = batch_of(counter[0]).to(dev)
        counter[0] += 1
        with record_function("phase: model call"):   # RanncModule runs forward and backward in it
            loss = fwd(input_ids=ids, labels=ids, **extra(ids)).loss
        with record_function("phase: backward"):
            loss.backward()
        if clip_norm is not None:
            with record_function("phase: clip"):
                clip(clip_norm)
        with record_function("phase: optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    return step, eng, predicted


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variant", choices=["rannc", "rannc-eager", "engine", "plain"])
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the torch.profiler pass")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--cap", default="24GiB")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/offload_profile"))
    ap.add_argument("--model", choices=["1.3b", "2.7b", "bert-large"], default="1.3b",
                    help="GPT-2-style size, or BERT-large MLM (seq 512)")
    ap.add_argument("--batch", type=int, default=8, help="samples per optimizer step (seq 1024)")
    ap.add_argument("--microbatches", type=int, default=None, help="RanncModule micro-batches (default: the plan's)")
    ap.add_argument("--offload", default="auto", help="RanncModule offload mode (default: the plan's)")
    ap.add_argument("--gpu-step-blocks", default="auto", help="RanncModule gpu_step_blocks (default: auto)")
    ap.add_argument("--step-in-backward", action="store_true",
                    help="RanncModule step_in_backward (implies --no-clip: the step runs before clipping could)")
    ap.add_argument("--mem-margin", type=float, default=None, help="RanncModule mem_margin (default: the config's)")
    ap.add_argument("--recompute", default="auto", help="RanncModule recompute: auto (the plan's) | none | full | selective")
    ap.add_argument("--padded", action="store_true", help="pass an attention_mask with padding (BERT's padded batches)")
    ap.add_argument("--decay-groups", action="store_true", help="AdamW with the Trainer's decay / no-decay param "
                    "groups (weight decay 0.01 on matrices; RanncModule variants) instead of one group")
    ap.add_argument("--no-clip", action="store_true", help="no clip_grad_norm_(1.0) (DeepSpeed's anchor does not clip)")
    ap.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                    help="RanncModule compile for the rannc variant (rannc-eager: always false)")
    args = ap.parse_args(argv)
    clip_norm = None if (args.no_clip or args.step_in_backward) else 1.0
    batch, seq = (2, 64) if args.tiny else (args.batch, 512 if args.model == "bert-large" else 1024)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    step, eng, predicted = build(args.variant, args.tiny, args.cap, batch, seq, args.model, args.offload,
                                 args.microbatches, args.gpu_step_blocks, args.step_in_backward, clip_norm,
                                 args.mem_margin, args.recompute, args.padded, args.compile, args.decay_groups)
    build_s = time.perf_counter() - t0
    if eng is not None:
        eng.timing = torch.cuda.is_available()
    times, losses, starts, enqueued = [], [], [], []
    alloc0 = {}
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            if eng is not None:
                eng.reset_stats()
            alloc0 = _allocator_counters()
        _sync()
        t = time.perf_counter()
        starts.append(t)
        loss = step()
        enqueued.append(time.perf_counter() - t)   # the host's share: ~the step time when the host is the bound
        _sync()
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    if eng is not None:   # the last step's background CPU work counts too
        t = time.perf_counter()
        eng.synchronize()
        _sync()
        times[-1] += time.perf_counter() - t
    steady = times[args.warmup:]
    st = eng.stats() if eng is not None else {}
    n = max(1, st.get("steps", 1))
    res = {"variant": args.variant, "lr": 2e-4, "clip_grad_norm": clip_norm, "step_in_backward": args.step_in_backward,
           "decay_groups": args.decay_groups,
           "build_s": build_s, "step_times_s": times, "step_time_s": sum(steady) / len(steady),
           "tokens_per_s": batch * seq * len(steady) / sum(steady), "predicted_step_time_s": predicted,
           "losses": losses, "host_enqueue_s": sum(enqueued[args.warmup:]) / len(steady),
           "allocator_per_step": {k: (v - alloc0.get(k, 0)) / len(steady) for k, v in _allocator_counters().items()},
           "engine_per_step": {k: (v / n if isinstance(v, (int, float)) and k not in ("hidden_fraction", "num_blocks",
                                                                                      "resident_peak_blocks", "steps")
                                   else v) for k, v in st.items()},
           "environment": common.environment()}
    if eng is not None and eng.wlog:   # the worker's tasks (fold/step, block, queued-at, start, end), s from timed step 1
        t_ref = starts[args.warmup]
        res["timed_step_starts_s"] = [x - t_ref for x in starts[args.warmup:]]
        res["worker_log"] = [(k, b, round(q - t_ref, 5), round(a - t_ref, 5), round(z - t_ref, 5)) for k, b, q, a, z in eng.wlog]
    if eng is not None:
        res["blocks"] = {"gpu_stepped": eng.device_step_blocks, "streamed": eng.stream_step_blocks,
                         "cpu_stepped": eng.num_blocks - eng.device_step_blocks - eng.stream_step_blocks,
                         "device_grads": eng.device_grads, "rest_on_gpu": eng.gpu_step_rest}
    if torch.cuda.is_available():
        res["max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps({k: v for k, v in res.items() if k != "step_times_s"}, indent=1, default=str), flush=True)
    print("step times:", [round(x, 3) for x in times], flush=True)
    print("losses:", [round(x, 4) for x in losses], flush=True)
    with open(os.path.join(args.out, f"offload_profile_{args.variant}.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    if not args.profile:
        return 0

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            step()
        _sync()
    dev_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=dev_key, row_limit=30), flush=True)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30), flush=True)
    from trace_gaps import summarize_trace

    trace = os.path.join(args.out, f"trace_{args.variant}.json")
    prof.export_chrome_trace(trace)
    gaps = summarize_trace(trace)   # GPU busy vs idle over the two profiled steps (None on CPU)
    if gaps is not None:
        print("GPU busy vs idle (trace_gaps.py):", json.dumps(gaps, indent=1), flush=True)
        res["gpu_gaps_two_steps"] = gaps
        with open(os.path.join(args.out, f"offload_profile_{args.variant}.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
    with open(trace, "rb") as f, gzip.open(trace + ".gz", "wb") as g:
        shutil.copyfileobj(f, g)
    os.remove(trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
