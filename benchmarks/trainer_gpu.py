"""Trainer overhead and callback accuracy: RanncTrainer vs RanncModule in a plain loop (one GPU).

    python benchmarks/trainer_gpu.py                 # H200: GPT-2 1.3B, 120 steps, seq 1024, bf16
    python benchmarks/trainer_gpu.py --tiny          # CPU smoke test: tiny GPT-2, a few steps

Questions answered side by side in one run (each scenario runs in its own subprocess, so memory
figures do not leak between them):

- ``loop``            RanncModule driven by a hand-written loop (fused AdamW, clip 1.0), no offload
- ``trainer``         RanncTrainer with the same model, batch, optimizer and precision
- ``loop_offload``    RanncModule, ``offload="auto"`` under a 24 GiB cap (``gpu_memory="24GiB"``)
- ``trainer_offload`` RanncTrainer under the same cap

Reported: steady-state tokens/s (steps after ``--warmup`` only), the trainer/loop ratio (goal: >= 0.95),
``torch.cuda.max_memory_allocated`` vs the callback's ``rannc/stage0/peak_mem_gib``, the callback's
tokens/s vs the wall-clock figure, MFU. JSON goes to ``benchmarks/results/trainer_gpu_<date>.json`` with
date, device and versions. Written for torch >= 2.11, transformers >= 5.17 (no ``datasets``, no network).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

SCENARIOS = ("loop", "trainer", "loop_offload", "trainer_offload")


class RandomTokens(torch.utils.data.Dataset):
    """Deterministic random token ids (labels = inputs): the benchmark measures speed, not learning."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build_model(tiny: bool, size: str = "1.3b"):
    import transformers as tf

    if tiny:
        cfg = tf.GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=128, vocab_size=512, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0)
    elif size == "2.7b":  # GPT-2-style 2.7B (issue 4's offload target)
        cfg = tf.GPT2Config(n_embd=2560, n_layer=32, n_head=32, n_positions=1024, vocab_size=50257,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:  # GPT-2 1.3B (GPT-3 XL shape)
        cfg = tf.GPT2Config(n_embd=2048, n_layer=24, n_head=16, n_positions=1024, vocab_size=50257,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg.use_cache = False
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(cfg)
    return model, cfg


def rannc_config(offload: bool, tiny: bool, args):
    from rannc_hf import RanncConfig

    return RanncConfig(num_stages=1, num_microbatches=args.microbatches, dp_size=1,
                       precision="fp32" if tiny else "bf16", offload="auto" if offload else "none",
                       gpu_memory=None if (tiny or not offload) else args.cap, compile="false" if tiny else "auto")


def make_optimizer(model, tiny: bool, lr: float = 1e-4):
    kw = {"fused": True} if (not tiny and torch.cuda.is_available()) else {}
    try:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, **kw)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)


def _cuda_mem() -> dict:
    if not torch.cuda.is_available():
        return {}
    return {"max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "allocated_gib": torch.cuda.memory_allocated() / 2**30,
            "max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_loop(args, offload: bool) -> dict:
    """RanncModule in a hand-written loop: the reference for Trainer overhead."""
    from rannc_hf import RanncModule

    model, cfg = build_model(args.tiny)
    ds = RandomTokens(args.batch * (args.steps + 1), args.seq, cfg.vocab_size)
    opt = make_optimizer(model, args.tiny)
    example = {"input_ids": ds.ids[: args.batch], "labels": ds.ids[: args.batch]}
    m = RanncModule(model, opt, config=rannc_config(offload, args.tiny, args), example_batch=example)
    dev = getattr(m, "device", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps):
        sl = slice(step * args.batch, (step + 1) * args.batch)
        batch = {"input_ids": ds.ids[sl].to(dev), "labels": ds.ids[sl].to(dev)}
        _sync()
        t0 = time.perf_counter()
        loss = m(**batch).loss
        loss.backward()
        m.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        times.append(time.perf_counter() - t0)
    steady = times[args.warmup:] or times
    tokens = args.batch * args.seq
    return {"tokens_per_s": tokens * len(steady) / sum(steady), "step_time_s": sum(steady) / len(steady),
            "first_step_s": times[0], "loss": float(loss), "cuda": _cuda_mem(),
            "plan": _plan_info(m)}


def _plan_info(m) -> dict:
    plan = getattr(m, "plan", None)
    if plan is None:
        return {}
    return {"predicted_step_time_s": float(getattr(plan, "predicted_step_time", 0.0) or 0.0),
            "num_microbatches": int(getattr(plan, "num_microbatches", 0) or 0),
            "stages": [{"offload": getattr(s, "offload", None), "recompute": getattr(s, "recompute", None),
                        "peak_bytes": getattr(s, "peak_bytes", None)} for s in getattr(plan, "stages", [])]}


def run_trainer(args, offload: bool) -> dict:
    """RanncTrainer with the same model/batch/optimizer; throughput from the stats callback and wall clock."""
    from rannc_hf import RanncTrainer, RanncTrainingArguments

    model, cfg = build_model(args.tiny)
    ds = RandomTokens(args.batch * (args.steps + 1), args.seq, cfg.vocab_size)
    out = tempfile.mkdtemp(prefix="rannc_trainer_bench_")
    targs = RanncTrainingArguments(
        output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=1e-4,
        weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant", logging_steps=args.log_every,
        save_strategy="no", report_to=[], disable_tqdm=True, bf16=not args.tiny, use_cpu=args.tiny,
        dataloader_drop_last=True, rannc_config=rannc_config(offload, args.tiny, args), seed=0)
    opt = make_optimizer(model, args.tiny)
    trainer = RanncTrainer(model=model, args=targs, train_dataset=ds, optimizers=(opt, None))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = trainer.train()
    wall = time.perf_counter() - t0
    cb = trainer._rannc_stats
    hist = [h for h in trainer.state.log_history if "rannc/tokens_per_s" in h]
    # steady state: log intervals that start after the warm-up steps
    steady = [h for h in hist if h["step"] - args.log_every >= args.warmup] or hist
    step_times = [h["rannc/step_time_s"] for h in steady]
    tps = args.batch * args.seq / (sum(step_times) / len(step_times)) if step_times else 0.0
    last = hist[-1] if hist else {}
    return {"tokens_per_s": tps, "step_time_s": sum(step_times) / max(1, len(step_times)),
            "callback_tokens_per_s": [h["rannc/tokens_per_s"] for h in steady],
            "callback_peak_mem_gib": last.get("rannc/stage0/peak_mem_gib"),
            "callback_mem_gib": last.get("rannc/stage0/mem_gib"),
            "callback_mfu": last.get("rannc/mfu"), "callback_tflops": last.get("rannc/tflops"),
            "callback_predicted_step_time_s": last.get("rannc/predicted_step_time_s"),
            "wall_s": wall, "train_loss": res.training_loss, "cuda": _cuda_mem(),
            "summary_totals": (cb.summary or {}).get("totals") if cb is not None else None}


def _versions() -> dict:
    import transformers

    v = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    try:
        import accelerate

        v["accelerate"] = accelerate.__version__
    except ImportError:
        pass
    return v


def _device() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"


def child(args) -> None:
    fn = {"loop": lambda: run_loop(args, False), "trainer": lambda: run_trainer(args, False),
          "loop_offload": lambda: run_loop(args, True), "trainer_offload": lambda: run_trainer(args, True)}
    try:
        out = {"ok": True, **fn[args.scenario]()}
    except Exception as e:  # report, don't hide: the parent records the error in the JSON
        import traceback

        out = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    with open(args.child_out, "w") as fh:
        json.dump(out, fh, default=float)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny GPT-2")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None, help="steps excluded from throughput")
    ap.add_argument("--batch", type=int, default=None, help="samples per step")
    ap.add_argument("--microbatches", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--log_every", type=int, default=None)
    ap.add_argument("--cap", default="24GiB", help="GPU memory cap of the offload scenarios")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--scenario", help=argparse.SUPPRESS)
    ap.add_argument("--child_out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    d = (dict(steps=6, warmup=2, batch=4, microbatches=2, seq=32, log_every=2) if args.tiny else
         dict(steps=120, warmup=20, batch=8, microbatches=1, seq=1024, log_every=10))
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.scenario:
        return child(args)

    def write_report() -> tuple[str, dict]:  # after every scenario: a later one may run out of time
        ratios = {}
        for a, b in (("trainer", "loop"), ("trainer_offload", "loop_offload")):
            if results.get(a, {}).get("ok") and results.get(b, {}).get("ok"):
                ratios[f"{a}/{b}_tokens_per_s"] = results[a]["tokens_per_s"] / results[b]["tokens_per_s"]
                cm = results[a]["cuda"].get("max_allocated_gib")
                cb = results[a].get("callback_peak_mem_gib")
                if cm and cb:
                    ratios[f"{a}_callback_peak_mem/cuda_max_allocated"] = cb / cm
        report = {"benchmark": "trainer_gpu", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                  "device": _device(), "versions": _versions(), "tiny": args.tiny,
                  "settings": {k: getattr(args, k) for k in ("steps", "warmup", "batch", "microbatches", "seq",
                                                             "log_every", "cap")},
                  "results": results, "ratios": ratios}
        os.makedirs(args.out, exist_ok=True)
        name = f"trainer_gpu{'_tiny' if args.tiny else ''}_{datetime.date.today().isoformat()}.json"
        path = os.path.join(args.out, name)
        with open(path, "w") as fh:
            json.dump(report, fh, indent=2, default=float)
        return path, ratios

    results = {}
    for sc in [s for s in args.scenarios.split(",") if s]:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        cmd = [sys.executable, os.path.abspath(__file__), "--scenario", sc, "--child_out", path,
               *(["--tiny"] if args.tiny else []), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch", str(args.batch), "--microbatches", str(args.microbatches), "--seq", str(args.seq),
               "--log_every", str(args.log_every), "--cap", args.cap]
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=env)   # its output goes to ours: progress and errors stay in the log
        try:
            with open(path) as fh:
                results[sc] = json.load(fh)
        except (OSError, json.JSONDecodeError):
            results[sc] = {"ok": False, "error": f"exit {p.returncode} (its traceback is in this run's output)"}
        results[sc]["scenario_wall_s"] = time.perf_counter() - t0
        os.unlink(path)
        r = results[sc]
        print(f"{sc:16s} " + (f"{r['tokens_per_s']:.0f} tokens/s, step {r['step_time_s'] * 1e3:.1f} ms"
                                if r.get("ok") else f"FAILED: {r.get('error')}"), flush=True)
        path, ratios = write_report()

    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
