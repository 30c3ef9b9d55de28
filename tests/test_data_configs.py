"""Recipe configs (model JSONs, rannc and accelerate YAMLs) and the recipes' shared argument parsing."""

from __future__ import annotations

import glob
import os
import sys

import pytest

from rannc_hf.config import RanncConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "recipes", "configs")
sys.path.insert(0, os.path.join(REPO, "recipes"))


def _count(path):
    sys.path.insert(0, CONFIGS)
    from make_configs import count_params
    from transformers import AutoConfig

    return count_params(AutoConfig.from_pretrained(path))


def test_rannc_yamls_validate():
    paths = sorted(glob.glob(os.path.join(CONFIGS, "rannc_*.yaml")))
    names = {os.path.basename(p) for p in paths}
    assert {"rannc_cpu_2proc.yaml", "rannc_1gpu_offload.yaml", "rannc_8gpu.yaml", "rannc_multinode.yaml"} <= names
    cfgs = {os.path.basename(p): RanncConfig.from_yaml(p) for p in paths}
    cpu = cfgs["rannc_cpu_2proc.yaml"]
    assert (cpu.num_stages, cpu.precision, cpu.offload) == (2, "fp32", "none")
    gpu = cfgs["rannc_1gpu_offload.yaml"]
    assert gpu.gpu_memory_bytes == 24 * 2**30 and gpu.offload == "auto"


def test_accelerate_yamls_load():
    from accelerate.commands.config.config_args import load_config_from_file

    expect = {"accelerate_cpu_2proc.yaml": (2, True, 1), "accelerate_1gpu.yaml": (1, False, 1),
              "accelerate_8gpu.yaml": (8, False, 1), "accelerate_multinode.yaml": (64, False, 8)}
    for name, (procs, cpu, machines) in expect.items():
        c = load_config_from_file(os.path.join(CONFIGS, name))
        assert (c.num_processes, c.use_cpu, c.num_machines) == (procs, cpu, machines), name
    assert str(load_config_from_file(os.path.join(CONFIGS, "accelerate_cpu_2proc.yaml")).distributed_type) \
        .endswith("MULTI_GPU")   # MULTI_CPU would start a single process (DESIGN.md section 6)


@pytest.mark.parametrize("name,lo,hi", [
    ("gpt2-tiny", 1e6, 3e6), ("gpt2-base", 120e6, 130e6), ("gpt2-1.3b", 1.2e9, 1.4e9),
    ("gpt2-13b", 12e9, 14e9), ("gpt2-100b", 95e9, 105e9),
    ("llama-tiny", 1e6, 3e6), ("llama-1.3b", 1.2e9, 1.4e9),
    ("bert-tiny", 1e6, 3e6), ("bert-base", 105e6, 115e6), ("bert-large", 330e6, 345e6),
    ("bert-1.3b", 1.2e9, 1.4e9), ("bert-13b", 12e9, 14e9), ("bert-100b", 95e9, 105e9),
])
def test_model_config_sizes(name, lo, hi):
    n = _count(os.path.join(CONFIGS, f"{name}.json"))
    assert lo <= n <= hi, f"{name}: {n:,}"


def test_tiny_configs_match_default_tokenizers():
    from transformers import AutoConfig

    for name in ("gpt2-tiny", "llama-tiny", "bert-tiny"):
        cfg = AutoConfig.from_pretrained(os.path.join(CONFIGS, f"{name}.json"))
        assert cfg.vocab_size == 4096
        assert getattr(cfg, "use_cache", False) is False
    assert AutoConfig.from_pretrained(os.path.join(CONFIGS, "bert-tiny.json")).pad_token_id == 0  # [PAD] is id 0


def test_common_parse_args_defaults_and_errors(tmp_path):
    from common import DataError, DataFileNotFoundError, load_model_config, parse_args

    args = parse_args("gpt", [])
    assert args.model_config.endswith("gpt2-tiny.json") and args.seq_len == 128 and args.kind == "gpt"
    assert args.warmup_steps == 15 and not args.trainer
    cfg = load_model_config(args)
    assert cfg.model_type == "gpt2" and cfg.use_cache is False
    b = parse_args("bert", ["--model_config", "bert-large", "--no-nsp", "--seq_len", "256"])
    assert b.model_config.endswith("bert-large.json") and b.nsp is False and b.mlm_probability == 0.15
    with pytest.raises(DataFileNotFoundError, match="gpt2-tiny"):
        parse_args("gpt", ["--model_config", "gpt-7"])                # lists the shipped names
    with pytest.raises(DataFileNotFoundError, match="does not exist"):
        parse_args("gpt", ["--train_file", str(tmp_path / "missing.txt")])
    with pytest.raises(DataError, match="positions"):
        load_model_config(parse_args("gpt", ["--seq_len", "4096"]))
    with pytest.raises(SystemExit):
        parse_args("gpt", ["--nsp"])                                  # BERT-only option


def test_common_tokenizer_and_data_from_train_file(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    from common import load_model_config, load_raw_text, parse_args, prepare_datasets, prepare_tokenizer

    monkeypatch.setenv("RANNC_HF_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "train.txt"
    f.write_text("\n\n".join(f"Paragraph {i}. The parser reads the next record and returns it to the caller. "
                             f"Each record holds a name and a value." for i in range(300)))
    args = parse_args("gpt", ["--train_file", str(f), "--seq_len", "32", "--vocab_size", "512"])
    cfg = load_model_config(args)
    raw = load_raw_text(args)
    tok = prepare_tokenizer(args, cfg, raw)
    assert len(tok) <= 512 and cfg.eos_token_id == tok.eos_token_id
    data = prepare_datasets(args, tok, raw)
    assert {len(x) for x in data["train"]["input_ids"]} == {32}
