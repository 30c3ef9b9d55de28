"""Why the engine's CPU AdamW ran BERT-large's layers at 0.9-1.1e9 parameters/s against 4.2e9 on one 78.6M tensor:
times torch's fused CPU AdamW over one BERT-large layer (16 tensors, 12.6M parameters) and one GPT-2 1.3B layer,
as their own tensors and as one flat tensor, at several thread counts, alone and beside three kinds of
host load: a busy Python thread (the main thread enqueuing kernels), pinned-memory DMA both ways (the engine's
copies) and both. Prints one JSON line per case.

    python benchmarks/h200/adam_shapes.py            # CPU works too (the DMA cases are skipped)
    python benchmarks/h200/adam_shapes.py --layers bert_layer --flat 1 --loads python+dma --threads 8,12,14,16
"""
import argparse
import json
import threading
import time

import torch

LAYERS = {
    "bert_layer": [(1024, 1024), (1024,)] * 4 + [(4096, 1024), (4096,), (1024, 4096), (1024,)] + [(1024,)] * 4,
    "gpt2_1.3b_layer": [(6144, 2048), (6144,), (2048, 2048), (2048,), (8192, 2048), (8192,), (2048, 8192), (2048,)]
    + [(2048,)] * 4,
    # the recipe's resident group: embeddings (50257 x 2048, tied head), positions (2048 x 2048), final norm
    "gpt2_1.3b_rest": [(50257, 2048), (2048, 2048), (2048,), (2048,)],
}


def optimizer(shapes, flat: bool, grad_scale: bool = False):
    n = sum(torch.Size(s).numel() for s in shapes)
    ps = [torch.nn.Parameter(torch.randn(n))] if flat else [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(ps, lr=1e-4, fused=True)
    if grad_scale:   # what the engine binds for a clipped step (the kernel divides the gradients by it)
        opt.grad_scale = torch.tensor(1.25)
    opt.step()
    return opt, n


def median_step_s(opt, seconds=1.5):
    ts = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(ts) < 5:
        t0 = time.perf_counter()
        opt.step()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


class Load:
    """A background host load for the duration of a ``with`` block."""

    def __init__(self, kind: str):
        self.kind, self.stop, self.threads = kind, False, []

    def _python(self):
        x = torch.ones(8, device="cuda" if torch.cuda.is_available() else "cpu")
        while not self.stop:
            for _ in range(50):
                x = x + 1
            if x.is_cuda:
                torch.cuda.current_stream().synchronize()

    def _dma(self):
        n = 256 * 2**20
        h = torch.empty(n, pin_memory=True)
        h2 = torch.empty(n, pin_memory=True)
        d, d2 = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
        s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
        while not self.stop:
            with torch.cuda.stream(s1):
                d.copy_(h, non_blocking=True)
            with torch.cuda.stream(s2):
                h2.copy_(d2, non_blocking=True)
            s1.synchronize()
            s2.synchronize()

    def __enter__(self):
        fns = {"none": [], "python": [self._python], "dma": [self._dma], "python+dma": [self._python, self._dma]}
        for fn in fns[self.kind]:
            t = threading.Thread(target=fn, daemon=True)
            t.start()
            self.threads.append(t)
        time.sleep(0.2)
        return self

    def __exit__(self, *exc):
        self.stop = True
        for t in self.threads:
            t.join()


def main():
    cores = torch.get_num_threads()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default=",".join(LAYERS), help="comma-separated: " + ", ".join(LAYERS))
    ap.add_argument("--flat", default="0,1", help="0 (per tensor), 1 (one flat tensor) or both")
    ap.add_argument("--loads", default=None, help="comma-separated of none, python, dma, python+dma (default: all "
                    "that apply; the thread sweep runs for none and python+dma, the others at all cores)")
    ap.add_argument("--threads", default=None, help="comma-separated thread counts to sweep (default 1,2,4,8,N/2,N)")
    ap.add_argument("--grad-scale", action="store_true", help="step with a grad_scale, as a clipped engine step does")
    a = ap.parse_args()
    loads = (a.loads.split(",") if a.loads else
             ["none", "python"] + (["dma", "python+dma"] if torch.cuda.is_available() else []))
    sweep = ([int(t) for t in a.threads.split(",")] if a.threads else sorted({1, 2, 4, 8, cores // 2, cores} - {0}))
    for layer in a.layers.split(","):
        shapes = LAYERS[layer]
        for flat in (bool(int(f)) for f in a.flat.split(",")):
            opt, n = optimizer(shapes, flat, a.grad_scale)
            for load in loads:
                for th in sweep if (load in ("none", "python+dma") or a.threads) else [cores]:
                    torch.set_num_threads(th)
                    with Load(load):
                        s = median_step_s(opt)
                    print(json.dumps({"layer": layer, "flat": flat, "load": load, "threads": th, "params": n, "grad_scale": a.grad_scale,
                                      "ms": round(s * 1e3, 3), "params_per_s": round(n / s / 1e9, 3)}), flush=True)
            torch.set_num_threads(cores)


if __name__ == "__main__":
    main()
