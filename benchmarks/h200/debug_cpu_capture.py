"""Debug (H200 call 5): a model captured on the host, run on the GPU with offload and/or compile.
Prints which combination fails and, on failure, the stage graph lines that still name the CPU."""
import traceback
import torch, transformers as tf
import rannc_hf

for offload, comp in [("optimizer", "true"), ("optimizer", "false"), ("none", "true")]:
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_embd=128, n_layer=2, n_head=4, n_positions=256, vocab_size=1000, use_cache=False)
    model = tf.GPT2LMHeadModel(cfg)   # on the CPU, as the recipes build it
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 1000, (8, 256))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    rc = rannc_hf.RanncConfig(num_stages=1, num_microbatches=2, precision="bf16", offload=offload, compile=comp)
    try:
        m = rannc_hf.RanncModule(model, opt, config=rc)
        for _ in range(2):
            loss = m(**{k: v.cuda() for k, v in batch.items()}).loss
            loss.backward(); opt.step(); opt.zero_grad()
        print(f"OK offload={offload} compile={comp} loss={float(loss):.4f} fast={m._fast}", flush=True)
    except Exception as e:
        print(f"FAIL offload={offload} compile={comp}: {type(e).__name__}: {str(e).splitlines()[-1][:300]}", flush=True)
        try:
            for st in m._primary.pipe.modules:
                for line in st.gm.code.splitlines():
                    if "cpu" in line:
                        print("   ", line.strip()[:250])
                for n, t in list(st.gm.named_buffers()) + list(st.gm.named_parameters()):
                    if t.device.type != "cuda":
                        print("    host tensor:", n, t.device, tuple(t.shape))
        except Exception:
            traceback.print_exc()
