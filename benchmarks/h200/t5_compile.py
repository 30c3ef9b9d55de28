"""T5-base-sized (12 + 12 layers, d 768) through RanncModule on one GPU, bf16: compile auto (the captured graph,
compiled) against compile off, same batches: step time, peak memory and per-step losses.

    python benchmarks/h200/t5_compile.py [--batch 16] [--steps 10]
"""
import argparse
import time

import torch
import transformers as tf

import rannc_hf


def run(compile_mode: str, batch: int, steps: int, warmup: int = 3):
    torch.manual_seed(0)
    cfg = tf.T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12,
                      num_heads=12, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    model = tf.T5ForConditionalGeneration(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rm = rannc_hf.RanncModule(model, opt, config=rannc_hf.RanncConfig(num_stages=1, precision="bf16", compile=compile_mode))
    losses, times = [], []
    for step in range(steps + warmup):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(2, 32128, (batch, 512), generator=g).cuda()
        labels = torch.randint(2, 32128, (batch, 128), generator=g).cuda()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = rm(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(round(float(loss), 4))
    st = sorted(times[warmup:])[len(times[warmup:]) // 2]
    print(f"compile={compile_mode} enabled={rm.compile_enabled} path={'fast path' if rm._fast else 'captured graph'} "
          f"step {st * 1e3:.1f} ms (first {times[0]:.1f} s) peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB "
          f"losses {losses}", flush=True)
    return losses


ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--steps", type=int, default=10)
a = ap.parse_args()
le = run("false", a.batch, a.steps)
torch.cuda.reset_peak_memory_stats()
lc = run("auto", a.batch, a.steps)
print("max abs loss diff", max(abs(x - y) for x, y in zip(le, lc)))
