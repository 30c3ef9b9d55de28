"""Why does RanncModule's compiled BERT run math attention (next57) when a compiled sdpa alone runs cuDNN's
(sdpa_compile.py)? Isolated sdpa under autocast (bf16 and fp32 inputs), then a 2-layer BERT-large-width model
through RanncModule with compile on: the attention kernels of one step, with dropout 0.1 and 0.

    python benchmarks/h200/sdpa_rannc.py
"""
import re
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, "benchmarks")
PAT = "flash|fmha|cudnn|sdpa|attention|xmma_gemm_f32|safe_softmax|efficient"


def kernels(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.name[:60] for e in prof.events() if re.search(PAT, e.name, re.I)})


def isolated(dtype):
    q, k, v = (torch.randn(32, 16, 512, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    f = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, None, 0.1, scale=0.125))

    def once():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            o = f(q, k, v)
        o.float().sum().backward()
    once(); once()
    print(f"isolated under autocast, {dtype} inputs:", kernels(once), flush=True)
    torch._dynamo.reset()


def rannc(dropout, compile_mode="true"):
    from transformers import BertConfig, BertForMaskedLM

    from rannc_hf import RanncConfig, RanncModule

    cfg = BertConfig(vocab_size=30522, hidden_size=1024, num_hidden_layers=2, num_attention_heads=16,
                     intermediate_size=4096, attention_probs_dropout_prob=dropout, hidden_dropout_prob=dropout)
    model = BertForMaskedLM(cfg).train()
    ids = torch.randint(0, 30522, (32, 512))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    m = RanncModule(model, opt, config=RanncConfig(num_stages=1, precision="bf16", compile=compile_mode, offload="none"),
                    example_batch={"input_ids": ids, "labels": ids})
    print(m.plan.summary(), flush=True)
    ids = ids.to(m.device)

    def once():
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step(); opt.zero_grad()
    for _ in range(3):
        once()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        once()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / 5
    print(f"rannc compile={compile_mode} dropout={dropout}: {dt * 1e3:.1f} ms", kernels(once), flush=True)
    torch._dynamo.reset()


isolated(torch.bfloat16)
isolated(torch.float32)
for a in sys.argv[1:] or ["0.1:true", "0.0:true", "0.1:false"]:
    d, c = a.split(":")
    rannc(float(d), c)
