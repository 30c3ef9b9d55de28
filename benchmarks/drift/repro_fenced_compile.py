"""Compiled + checkpointed + offload-fenced segments vs plain training: the CPU repro attempt of the H200 drift
(GPT-2 1.3B, params offload, recompute full, compiled segments holding fences: per-step losses off by up to 0.045).

Runs the same tiny GPT-2 on the same batches as ``--modes`` (default ``plain,false,true``):
``plain`` (no rannc), ``false`` (RanncModule, compile off) and ``true`` (RanncModule, compile on), and prints
per-step losses and the largest loss / parameter difference to the first mode. Compiled segments that hold an
offload fence are compiled only with ``RANNC_HF_COMPILE_FENCED_SEGMENTS=1``; the backend is
``RANNC_HF_COMPILE_BACKEND`` (default inductor: needs a C++ compiler on the CPU)::

    RANNC_HF_COMPILE_FENCED_SEGMENTS=1 RANNC_HF_COMPILE_BACKEND=aot_eager PYTHONPATH=. \\
        python benchmarks/drift/repro_fenced_compile.py --steps 10 --layers 10 --offload all --prefetch 1 --clip 1

Switches for the bisection: ``--dropout`` (RNG replay in recompute), ``--precision bf16`` (autocast),
``--seg-every K`` (checkpoint segments start at every K-th valid cut instead of the plan's), ``--bwd-thread``
(backward, and so the recompute, on another thread, as on CUDA's autograd device thread), ``--sync-fences``
(on CUDA: synchronize the device in every fence, to tell a stream race from a compile bug).
On a CUDA machine the same script runs there (plain = the model on the GPU under bf16 autocast when asked).
"""
import argparse
import os
import threading

import torch

import rannc_hf
from rannc_hf.zoo import loss_of


def build(args, seed: int = 0):
    import transformers as tf
    torch.manual_seed(seed)
    d = args.dropout
    cfg = tf.GPT2Config(n_embd=args.n_embd, n_layer=args.layers, n_head=4, n_positions=max(64, args.seq),
                        resid_pdrop=d, embd_pdrop=d, attn_pdrop=d, bos_token_id=0, eos_token_id=0,
                        vocab_size=args.vocab)
    m = tf.GPT2LMHeadModel(cfg)
    m.config.use_cache = False
    m.train()
    return m


def batch(args, s, device):
    g = torch.Generator().manual_seed(s)   # learnable rows: arithmetic sequences of token ids
    start = torch.randint(0, args.vocab, (args.batch, 1), generator=g)
    stride = torch.randint(1, 16, (args.batch, 1), generator=g)
    ids = ((start + stride * torch.arange(args.seq)) % args.vocab).to(device)
    return {"input_ids": ids, "labels": ids.clone()}


def run(mode, args):
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    model = build(args)
    fwd = model
    if mode == "plain":
        model.to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        fwd = rannc_hf.RanncModule(model, opt, config=rannc_hf.RanncConfig(
            num_stages=1, num_microbatches=args.m, precision=args.precision, offload=args.offload,
            recompute=args.recompute, compile=mode, prefetch_blocks=args.prefetch))
        dev = fwd.device
    losses = []
    for step in range(args.steps):
        torch.manual_seed(1000 + step)
        b = batch(args, step, dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=(mode == "plain" and args.precision == "bf16")):
            loss = loss_of(fwd(**b))
        if args.bwd_thread:   # backward (and so the recompute) on another thread, as on CUDA's device thread
            t = threading.Thread(target=loss.backward)
            t.start()
            t.join()
        else:
            loss.backward()
        if args.clip:
            if mode == "plain":
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            else:
                fwd.clip_grad_norm_(args.clip)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    sd = fwd.state_dict() if mode != "plain" else model.state_dict()
    sd = {k: v.detach().float().cpu().clone() for k, v in sd.items()}
    info = None
    if mode != "plain":
        from rannc_hf.runtime.stages import _fence_kinds
        st = fwd._primary.pipe.modules[0]
        segs = st.segments() if st.recompute == "full" else []
        kinds = "".join({(True, True): "F", (True, False): "f", (False, True): "C", (False, False): "e"}[
            (_fence_kinds(s)[0], not isinstance(s.gm, torch.fx.GraphModule))] for s in segs)
        info = {"segments (F fenced+compiled, f fenced eager, C compiled, e eager)": kinds}
        if fwd._offload is not None:
            es = fwd._offload.engine.stats()
            info.update({k: es.get(k) for k in ("fetches", "releases")})
    return losses, sd, info


def _patch(args):
    if args.seg_every:   # checkpoint segments at every K-th valid cut (instead of the plan's)
        import rannc_hf.runtime.pipeline as pl_
        import rannc_hf.runtime.stages as st_

        def starts(graph, specs, precision="fp32"):
            out = []
            for spec in specs:
                lo, hi = spec.op_range
                ok = [c for c in range(lo, hi) if graph.valid_cuts[c]][args.seg_offset::args.seg_every]
                out.append([graph.ops[c + 1].name for c in ok])
            return out

        st_.recompute_segment_starts = starts
        _bs = pl_.build_stages

        def build_stages(*a, **k):
            k["recompute_starts"] = None
            return _bs(*a, **k)

        pl_.build_stages = build_stages
    if args.sync_fences and torch.cuda.is_available():   # every fence's engine call between two device syncs
        from rannc_hf.offload.residency import _ResidencyMixin

        for meth in ("before_forward", "after_forward", "before_backward", "after_backward"):
            def wrapped(self, i, _orig=getattr(_ResidencyMixin, meth)):
                torch.cuda.synchronize()
                _orig(self, i)
                torch.cuda.synchronize()
            setattr(_ResidencyMixin, meth, wrapped)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=128)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--m", type=int, default=1, help="micro-batches")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--clip", type=float, default=0.0)
    ap.add_argument("--offload", default="all")
    ap.add_argument("--prefetch", type=int, default=1)
    ap.add_argument("--recompute", default="full")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--modes", default="plain,false,true")
    ap.add_argument("--seg-every", type=int, default=0)
    ap.add_argument("--seg-offset", type=int, default=0)
    ap.add_argument("--bwd-thread", action="store_true")
    ap.add_argument("--sync-fences", action="store_true")
    ap.add_argument("--emulate-async", action="store_true", help="CPU: a fetched block reads NaN until ensured")
    args = ap.parse_args()
    _patch(args)
    if args.emulate_async:
        from rannc_hf.offload.emulation import emulate_async_fetch

        emulate_async_fetch().__enter__()   # for the rest of the run
    print("env:", {k: v for k, v in os.environ.items() if k.startswith("RANNC_HF")}, vars(args), flush=True)
    modes = args.modes.split(",")
    res = {m: run(m, args) for m in modes}
    for m, (losses, _, info) in res.items():
        print(f"{m:6s} losses:", " ".join(f"{x:.6f}" for x in losses))
        if info:
            print("      ", info)
    bl, bsd, _ = res[modes[0]]
    for m, (losses, sd, _) in res.items():
        if m != modes[0]:
            dl = max(abs(a - b) for a, b in zip(losses, bl))
            dp = max(float((sd[k] - bsd[k]).abs().max()) for k in bsd if k in sd)
            print(f"{m} vs {modes[0]}: max |dloss| {dl:.3e}  max |dparam| {dp:.3e}")


if __name__ == "__main__":
    main()
