"""Multi-GPU: automatic plans against hand splits (`even`, `params`) on 2, 4 and 8 GPUs (issue 9).

Two modes:

    python benchmarks/multi_gpu.py predict            # CPU: the planner's predicted step times
    torchrun --nproc_per_node 8 benchmarks/multi_gpu.py run --model gpt-2.7b --partitioners auto even params
    torchrun --nproc_per_node 2 benchmarks/multi_gpu.py run --model gpt-2.7b --num-stages 2 --gpu-memory 12GiB \
        --offload auto --partitioners auto      # offload inside a 2-stage pipeline, each GPU capped
    ... run ... --profile   # also per rank: engine counters and worker log, one step under torch.profiler

``predict`` plans every (model, GPU count, partitioner) on the meta device with the H200 cost
profile and writes ``benchmarks/results/multi_gpu_predicted.json``: what the real run has to
confirm or correct. ``run`` trains the same model with RanncModule under each partitioner (same
runtime, same batch) for a few steps and records measured vs predicted step time, tokens/s, MFU
and per-rank peak memory to ``$OUT/multi_gpu_<model>_<N>gpu.json`` (or benchmarks/results/).
``run --tiny`` works on CPU with gloo (2 processes) as a smoke test of the script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * 4
        self.c1, self.b1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.c2, self.b2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.c3, self.b3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.skip = None if (stride == 1 and cin == cout) else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        h = F.relu(self.b2(self.c2(h)))
        h = self.b3(self.c3(h))
        return F.relu(h + (x if self.skip is None else self.skip(x)))


class WideResNet(nn.Module):
    """ResNet with bottleneck blocks and a width multiplier (RaNNC trained ResNet152x8); returns the loss."""

    def __init__(self, layers=(3, 8, 36, 3), width: int = 8, classes: int = 1000):
        super().__init__()
        base = 64 * width
        self.stem = nn.Sequential(nn.Conv2d(3, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], base
        for i, n in enumerate(layers):
            w = base * 2**i
            for j in range(n):
                blocks.append(Bottleneck(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w * 4
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, pixel_values, labels):
        h = self.blocks(self.stem(pixel_values))
        return F.cross_entropy(self.fc(h.mean((2, 3))), labels)


def build(name: str, batch: int, device="meta"):
    """(model, example batch, tokens-or-images per sample) for a benchmark model name."""
    import transformers as tf

    with torch.device(device):
        if name.startswith("gpt-"):
            d, L, h = {"gpt-tiny": (64, 4, 4), "gpt-2.7b": (2560, 32, 32), "gpt-6.7b": (4096, 32, 32)}[name]
            seq = 128 if name == "gpt-tiny" else 1024
            cfg = tf.GPT2Config(n_embd=d, n_layer=L, n_head=h, n_positions=seq, vocab_size=50304, resid_pdrop=0.0,
                                embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
            model = tf.GPT2LMHeadModel(cfg)
            ids = torch.randint(0, 50304, (batch, seq), device=device if device != "meta" else "cpu")
            return model, {"input_ids": ids, "labels": ids}, seq
        if name.startswith("bert-"):
            L = {"bert-48l": 48, "bert-96l": 96}[name]
            cfg = tf.BertConfig(hidden_size=1024, num_hidden_layers=L, num_attention_heads=16, intermediate_size=4096,
                                max_position_embeddings=1024, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)
            model = tf.BertForMaskedLM(cfg)
            ids = torch.randint(0, cfg.vocab_size, (batch, 512), device=device if device != "meta" else "cpu")
            return model, {"input_ids": ids, "labels": ids}, 512
        if name == "wrn-152x8":
            model = WideResNet((3, 8, 36, 3), 8)
            dev = device if device != "meta" else "cpu"
            return model, {"pixel_values": torch.randn(batch, 3, 224, 224, device=dev),
                           "labels": torch.randint(0, 1000, (batch,), device=dev)}, 1
    raise KeyError(name)


MODELS = {"gpt-2.7b": 64, "gpt-6.7b": 64, "bert-48l": 128, "bert-96l": 128, "wrn-152x8": 64}


def predict(args) -> int:
    import rannc_hf
    from benchmarks.common import write_result

    cases = []
    for name in args.models:
        for n in args.gpus:
            model, batch, per_sample = build(name, MODELS[name])
            row = {"model": name, "gpus": n, "batch": MODELS[name],
                   "params_b": sum(p.numel() for p in model.parameters()) / 1e9}
            for part in ("auto", "even", "params"):
                t = time.time()
                try:
                    p = rannc_hf.plan(model, batch, cluster=rannc_hf.Cluster(num_gpus=n, gpu_memory="141GB",
                                                                            device="h200"),
                                      config=rannc_hf.RanncConfig(partitioner=part, precision="bf16"),
                                      progress=False)
                    row[part] = {"step_ms": p.predicted_step_time * 1e3, "stages": p.num_ranks_pp, "dp": p.dp_size,
                                 "microbatches": p.num_microbatches, "schedule": p.schedule,
                                 "peak_gib": max(s.peak_bytes for s in p.stages) / 2**30,
                                 "tokens_per_s": MODELS[name] * per_sample / p.predicted_step_time,
                                 "plan_s": time.time() - t}
                except rannc_hf.RanncError as e:
                    row[part] = {"error": str(e).splitlines()[0]}
            cases.append(row)
            a = row["auto"].get("step_ms")
            print(name, n, {k: round(v["step_ms"], 1) if "step_ms" in v else v.get("error", "")[:40]
                            for k, v in row.items() if isinstance(v, dict)}, flush=True)
            if a:
                for k in ("even", "params"):
                    if "step_ms" in row[k]:
                        row[f"auto_vs_{k}"] = row[k]["step_ms"] / a
    path = write_result("multi_gpu_predicted", {"cases": cases, "note": "planner predictions (H200 profile); "
                                                "no multi-GPU measurement yet"})
    print("wrote", path)
    return 0


def run(args) -> int:
    import torch.distributed as dist

    import rannc_hf

    dev = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if dev != "cpu":  # each rank builds on its own GPU (initialising a 6.7B model on the CPU takes minutes)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dev = f"cuda:{torch.cuda.current_device()}"
    # under a GPU cap the model may not fit its GPU whole: build it on the host, the runtime places it
    # (and for runs whose losses are compared with a capped run's: the host and the GPU draw different weights)
    build_on = "cpu" if (args.gpu_memory or args.build_on == "cpu") else dev
    name = "gpt-tiny" if args.tiny else args.model
    args.batch = args.batch or (8 if name == "gpt-tiny" else 32)
    results = []
    for part in args.partitioners:
        torch.manual_seed(0)  # same weights and batch on every rank
        model, batch, per_sample = build(name, args.batch, device=build_on)
        batch = {k: v.to(dev) for k, v in batch.items()}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=build_on.startswith("cuda"))
        cfg = rannc_hf.RanncConfig(partitioner=part, precision=args.precision or ("bf16" if dev != "cpu" else "fp32"),
                                   gpu_step_blocks=args.gpu_step_blocks if args.gpu_step_blocks == "auto"
                                   else int(args.gpu_step_blocks),
                                   num_stages=args.num_stages, offload=args.offload, gpu_memory=args.gpu_memory,
                                   step_in_backward=args.step_in_backward)
        m = rannc_hf.RanncModule(model, opt, config=cfg, example_batch=batch)
        if dev != "cpu":
            torch.cuda.reset_peak_memory_stats()
        eng = m._offload.engine if (args.profile and m._offload is not None) else None
        if eng is not None:
            eng.timing = dev != "cpu"

        def train_step():
            loss = m(**batch)
            loss = loss.loss if hasattr(loss, "loss") else loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        times, losses, starts = [], [], []
        for i in range(args.warmup + args.steps):
            if i == args.warmup and eng is not None:
                eng.reset_stats()
            if dev != "cpu":
                torch.cuda.synchronize()
            dist.barrier()
            t = time.perf_counter()
            starts.append(t)
            loss = train_step()
            if dev != "cpu":
                torch.cuda.synchronize()
            dist.barrier()
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
            losses.append(float(loss.detach()))
        profile = _profile_ranks(args, m, eng, train_step, starts[args.warmup], dev) if args.profile else None
        step = sorted(times)[len(times) // 2]
        peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if dev != "cpu" else 0.0], device=dev)
        peaks = [torch.zeros(1, device=dev) for _ in range(dist.get_world_size())]
        dist.all_gather(peaks, peak)
        results.append({"partitioner": part, "step_s": step, "predicted_step_s": m.plan.predicted_step_time,
                        "tokens_per_s": args.batch * per_sample / step, "stages": m.num_stages, "dp": m.dp_size,
                        "microbatches": m.num_microbatches, "peak_gib_per_rank": [float(p) for p in peaks],
                        "offload": [s.offload for s in m.plan.stages], "gpu_memory": args.gpu_memory,
                        "step_in_backward": args.step_in_backward, "plan": m.plan.summary(),
                        "step_times_s": times, "losses": losses, "loss": losses[-1]})
        if profile is not None:
            results[-1]["profile_per_rank"] = profile
        del m, model, opt, loss, batch
        import gc

        gc.collect()  # the next partitioner's peak must not include this one's leftovers
        if dev != "cpu":
            torch.cuda.empty_cache()
    if dist.get_rank() == 0:
        from benchmarks.common import write_result

        out = os.environ.get("OUT")
        pp = f"_pp{args.num_stages}" if args.num_stages else ""
        pp += f"_cap{args.gpu_memory}" if args.gpu_memory else ""
        pp += f"_{args.offload}" if args.offload != "auto" else ""
        pp += f"_gsb{args.gpu_step_blocks}" if args.gpu_step_blocks != "auto" else ""
        path = write_result(f"multi_gpu_{name}_{dist.get_world_size()}{'gpu' if dev != 'cpu' else 'cpu'}{pp}",
                            {"results": results}, out_dir=out)
        print(json.dumps(results, indent=1))
        print("wrote", path)
    return 0


def _profile_ranks(args, m, eng, train_step, t_ref: float, dev: str) -> list:
    """Per rank: the offload engine's counters and worker log over the timed steps (seconds from the first timed
    step's start), then one more step under ``torch.profiler`` whose kernel table each rank writes to
    ``$OUT/profile_rank<r>.txt`` (rank 0 also its Chrome trace, gzipped). Gathered to every rank."""
    import gzip
    import shutil

    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    rank, out = dist.get_rank(), os.environ.get("OUT") or os.path.join(HERE, "results")
    mine = {"rank": rank}
    if eng is not None:
        st = eng.stats()
        n = max(1, st.get("steps", 1))
        whole = ("hidden_fraction", "num_blocks", "resident_peak_blocks", "steps")
        mine["engine_per_step"] = {k: v / n if isinstance(v, (int, float)) and k not in whole else v
                                   for k, v in st.items()}
        mine["worker_log"] = [(k, b, round(q - t_ref, 5), round(a - t_ref, 5), round(z - t_ref, 5))
                              for k, b, q, a, z in eng.wlog]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev != "cpu" else [])
    dist.barrier()
    with profile(activities=acts) as prof:
        train_step()
        if dev != "cpu":
            torch.cuda.synchronize()
        if eng is not None:
            eng.synchronize()
    key = "self_cuda_time_total" if dev != "cpu" else "self_cpu_time_total"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"profile_rank{rank}.txt"), "w") as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=40) + "\n")
        f.write(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40) + "\n")
    from trace_gaps import summarize_trace

    trace = os.path.join(out, f"trace_rank{rank}.json")
    prof.export_chrome_trace(trace)
    mine["gpu_gaps"] = summarize_trace(trace)   # GPU busy vs idle, idle charged to host ops (None on CPU)
    if rank == 0:   # one rank's trace is kept
        with open(trace, "rb") as f, gzip.open(trace + ".gz", "wb") as g:
            shutil.copyfileobj(f, g)
    os.remove(trace)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("predict")
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--gpus", nargs="*", type=int, default=[2, 4, 8])
    r = sub.add_parser("run")
    r.add_argument("--model", default="gpt-2.7b", choices=list(MODELS) + ["gpt-tiny"])
    r.add_argument("--batch", type=int, default=None, help="global batch (default 32; 8 for gpt-tiny)")
    r.add_argument("--partitioners", nargs="*", default=["auto", "even", "params"])
    r.add_argument("--num-stages", type=int, default=None)
    r.add_argument("--steps", type=int, default=5)
    r.add_argument("--warmup", type=int, default=2)
    r.add_argument("--tiny", action="store_true")
    r.add_argument("--precision", default=None, help="fp32 | bf16 (default: bf16 on GPUs, fp32 on CPU)")
    r.add_argument("--gpu-step-blocks", default="auto", help="RanncConfig.gpu_step_blocks (offload)")
    r.add_argument("--offload", default="auto", help="RanncConfig.offload (auto: the plan's per-stage choice)")
    r.add_argument("--gpu-memory", default=None, help="per-GPU cap, e.g. 12GiB (the model is then built on the host)")
    r.add_argument("--step-in-backward", action="store_true", help="offloaded blocks step inside backward")
    r.add_argument("--build-on", default="auto", choices=["auto", "cpu"],
                   help="where the model is initialised (auto: its GPU, or the host under --gpu-memory); cpu: "
                        "the same weights as a --gpu-memory run")
    r.add_argument("--profile", action="store_true",
                   help="per rank: the offload engine's counters and worker log, and one step under torch.profiler")
    args = ap.parse_args(argv)
    return predict(args) if args.cmd == "predict" else run(args)


if __name__ == "__main__":
    sys.exit(main())
