"""How much host (CPU) time a training step spends dispatching kernels, and what the optimizer implementations cost.

Two probes, each timed on the current device (CUDA when present):

* **dispatch**: GPT-2 1.3B's and BERT-large's *structure* (24 layers, same ops) at width 64 and a few tokens, so
  the GPU has nearly nothing to do and a step's wall time is the host's: Python, the dispatcher, autograd,
  autocast and kernel launches. Timed for plain eager PyTorch and for ``RanncModule`` (eager) at 1 and 8
  micro-batches; ``(t8 - t1) / 7`` is the host time of one micro-batch's forward and backward. Divided by the
  graph's op count, it is the planner's question: when a micro-batch's kernels are shorter than this, the step
  is bound by the host, not by the GPU.
* **optimizer**: one step of AdamW over GPT-2 1.3B's real parameter shapes (bf16 autocast keeps fp32 weights),
  ``fused=True`` against the default (``foreach``), and ``clip_grad_norm_`` over the same gradients.

    python benchmarks/host_dispatch.py                 # both probes; writes host_dispatch.json under $OUT
    python benchmarks/host_dispatch.py --probes optimizer
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from benchmarks.common import seconds_per_call  # noqa: E402

STRUCTURES = {"gpt2-1.3b": ("gpt", 24, 1024), "bert-large": ("bert", 24, 512)}   # family, layers, positions


def _timed(fn, dev, steps: int, warmup: int) -> float:
    return seconds_per_call(fn, steps, warmup, cuda=dev.type == "cuda")


def _narrow(structure: str):
    import transformers as tf

    fam, layers, pos = STRUCTURES[structure]
    torch.manual_seed(0)
    if fam == "gpt":
        cfg = tf.GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=pos, vocab_size=512, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)
        cfg._attn_implementation = "sdpa"
        return tf.GPT2LMHeadModel(cfg), 512
    cfg = tf.BertConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=256,
                        max_position_embeddings=pos, vocab_size=512, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "sdpa"
    return tf.BertForMaskedLM(cfg), 512


def dispatch(dev, steps: int, warmup: int, seq: int = 16) -> dict:
    from rannc_hf import RanncConfig, RanncModule

    out = {}
    for structure in STRUCTURES:
        row = {}
        model, vocab = _narrow(structure)
        model = model.to(dev)
        ids = torch.randint(0, vocab, (8, seq), device=dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")

        def plain_step(m: int):
            for chunk in ids.split(8 // m):
                with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
                    loss = model(input_ids=chunk, labels=chunk).loss
                (loss / m).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for m in (1, 8):
            row[f"plain_m{m}"] = _timed(lambda: plain_step(m), dev, steps, warmup)
        for m in (1, 8):
            model2, _ = _narrow(structure)
            opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-4)
            r = RanncModule(model2, opt2, example_batch={"input_ids": ids, "labels": ids},
                            config=RanncConfig(num_stages=1, num_microbatches=m, compile="false", offload="none",
                                               recompute="none",
                                               precision="bf16" if dev.type == "cuda" else "fp32"))
            for g in opt2.param_groups:   # the optimizer's own kernels are not what this probe is after
                g["fused"] = dev.type == "cuda"
                g["foreach"] = False if dev.type == "cuda" else None

            def rannc_step():
                loss = r(input_ids=ids, labels=ids)
                (loss.loss if hasattr(loss, "loss") else loss).backward()
                opt2.step()
                opt2.zero_grad(set_to_none=True)

            row[f"rannc_m{m}"] = _timed(rannc_step, dev, steps, warmup)
            row["graph_ops"] = r.plan.num_ops
            del r, model2, opt2
        for sysname in ("plain", "rannc"):
            row[f"{sysname}_per_microbatch_s"] = (row[f"{sysname}_m8"] - row[f"{sysname}_m1"]) / 7
        out[structure] = row
        print(structure, {k: round(v * 1e3, 2) if isinstance(v, float) else v for k, v in row.items()}, "(ms)",
              flush=True)
    return out


def optimizer(dev, steps: int, warmup: int) -> dict:
    import transformers as tf

    cfg = tf.GPT2Config(n_embd=2048, n_layer=24, n_head=16, n_positions=1024, vocab_size=50304)
    with torch.device("meta"):
        shapes = [p.shape for p in tf.GPT2LMHeadModel(cfg).parameters()]
    params = [torch.nn.Parameter(torch.randn(s, device=dev) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    out = {"params": n}
    for name, kw in (("adamw_fused", {"fused": True}), ("adamw_foreach", {"foreach": True})):
        if name == "adamw_fused" and dev.type != "cuda":
            continue
        opt = torch.optim.AdamW(params, lr=1e-6, **kw)
        out[name + "_s"] = _timed(opt.step, dev, steps, warmup)
        del opt
    out["clip_grad_norm_s"] = _timed(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0), dev, steps, warmup)
    print("optimizer", {k: round(v * 1e3, 2) if isinstance(v, float) else v for k, v in out.items()}, "(ms)",
          flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probes", nargs="*", default=["dispatch", "optimizer"], choices=["dispatch", "optimizer"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = {}
    if "dispatch" in args.probes:
        res["dispatch"] = dispatch(dev, args.steps, args.warmup)
    if "optimizer" in args.probes:
        res["optimizer"] = optimizer(dev, args.steps, args.warmup)
    from benchmarks.common import write_result

    path = write_result("host_dispatch" + ("" if dev.type == "cuda" else "_cpu"), res, out_dir=args.out)
    print(json.dumps(res, indent=1))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
