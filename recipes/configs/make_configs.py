"""Regenerate the model configs in this folder and print their parameter counts.

    python recipes/configs/make_configs.py            # writes gpt2-*.json, llama-*.json, bert-*.json
    python recipes/configs/make_configs.py --check    # only counts parameters of the committed files

Parameters are counted on the meta device (no memory is allocated), so even 100B counts in seconds.
Every config is a plain Hugging Face config: ``AutoConfig.from_pretrained("recipes/configs/gpt2-tiny.json")``.
Sizes: GPT-2 style models follow GPT-2/GPT-3 shapes (``n_embd`` / ``n_layer``); BERT models above
``large`` are "enlarged BERTs" as trained by RaNNC (the same architecture, wider and deeper).
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

GPT_VOCAB = 50304          # GPT-2's 50257 rounded up to a multiple of 128 (faster GEMMs)
LLAMA_VOCAB = 32000
BERT_VOCAB = 30528         # BERT's 30522 rounded up to a multiple of 64
TINY_VOCAB = 4096          # the default trained tokenizer's size


def gpt2(n_embd: int, n_layer: int, n_head: int, n_positions: int, vocab: int = GPT_VOCAB, dropout: float = 0.0):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                      resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, use_cache=False,
                      bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)


def llama(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, max_pos: int,
          vocab: int = LLAMA_VOCAB):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=max_pos, rms_norm_eps=1e-5, rope_theta=10000.0,
                       tie_word_embeddings=False, use_cache=False, bos_token_id=0, eos_token_id=0,
                       attention_dropout=0.0)


def bert(hidden: int, layers: int, heads: int, max_pos: int = 512, vocab: int = BERT_VOCAB, dropout: float = 0.1):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=4 * hidden, max_position_embeddings=max_pos, type_vocab_size=2,
                      hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, pad_token_id=0,
                      use_cache=False)


def configs() -> dict:
    return {
        # GPT-2 style (tied embeddings, learned positions)
        "gpt2-tiny": gpt2(128, 4, 4, 256, vocab=TINY_VOCAB),
        "gpt2-base": gpt2(768, 12, 12, 1024),                # GPT-2 small, 124M
        "gpt2-1.3b": gpt2(2048, 24, 16, 2048),               # GPT-3 XL shape
        "gpt2-13b": gpt2(5120, 40, 40, 2048),                # GPT-3 13B shape
        "gpt2-100b": gpt2(10240, 80, 80, 2048),              # 12 * d^2 * L ~ 100B; 80 layers split evenly
        # Llama style (RoPE, SwiGLU, RMSNorm, untied head)
        "llama-tiny": llama(128, 4, 4, 2, 352, 256, vocab=TINY_VOCAB),
        "llama-1.3b": llama(2048, 24, 16, 16, 5504, 2048),
        "llama-13b": llama(5120, 40, 40, 40, 13824, 4096),   # Llama-2 13B shape
        # BERT (BertForPreTraining: MLM + NSP heads); enlarged BERTs as in RaNNC
        "bert-tiny": bert(128, 4, 4, 256, vocab=TINY_VOCAB, dropout=0.0),
        "bert-base": bert(768, 12, 12),
        "bert-large": bert(1024, 24, 16),
        "bert-1.3b": bert(2048, 24, 32),
        "bert-13b": bert(5120, 40, 40),
        "bert-100b": bert(10240, 80, 80),
    }


def count_params(config) -> int:
    import torch
    from transformers import AutoModelForCausalLM, BertForPreTraining

    with torch.device("meta"):
        if config.model_type == "bert":
            model = BertForPreTraining(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())   # tied weights counted once


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="do not write; count the committed files")
    args = ap.parse_args(argv)
    from transformers import AutoConfig

    arch = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "bert": "BertForPreTraining"}
    for name, cfg in configs().items():
        path = os.path.join(HERE, f"{name}.json")
        cfg.architectures = [arch[cfg.model_type]]   # what `rannc-hf plan` builds from the file
        if args.check:
            cfg = AutoConfig.from_pretrained(path)
        else:
            cfg.to_json_file(path)
        n = count_params(cfg)
        print(f"{name:12s} {n / 1e9:9.3f} B params  ({n:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
