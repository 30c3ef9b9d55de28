"""The recipes end to end: 2 CPU processes as a 2-stage pipeline, real text, a real checkpoint.

Each recipe runs as a user would start it (``rannc-hf launch`` with the shipped CPU configs), for a
short run. The loss must fall by a real margin (not just any decrease), and the saved checkpoint must
load with ``from_pretrained`` in a plain process and reproduce the run's final validation loss.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(ROOT, "recipes", "configs")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("rannc_cache"))


def _launch(recipe: str, out: str, cache: str, steps: int, extra=()) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", RANNC_HF_CACHE=cache, PYTHONUNBUFFERED="1")
    env.pop("RANNC_HF_CONFIG", None)
    cmd = [sys.executable, "-m", "rannc_hf.cli", "launch", "--rannc_config", os.path.join(CFG, "rannc_cpu_2proc.yaml"),
           "--config_file", os.path.join(CFG, "accelerate_cpu_2proc.yaml"), os.path.join(ROOT, "recipes", recipe),
           "--max_steps", str(steps), "--log_every", "10", "--eval_every", "0", "--eval_batches", "8",
           "--corpus_max_chars", "1000000", "--output_dir", out, "--no_plot", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Plan for" in proc.stdout + proc.stderr  # the plan is printed
    with open(os.path.join(out, "history.json")) as f:
        return {"history": json.load(f), "log": proc.stdout + proc.stderr}


def _gpt_loss_of_checkpoint(out: str) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    text = ("The module provides functions for working with files and directories. It returns a list of the "
            "names of the entries in the directory given by path, in arbitrary order. ") * 4
    ids = tok(text, return_tensors="pt", truncation=True, max_length=128)["input_ids"]
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_gpt_recipe_trains_and_saves(tmp_path, cache_dir):
    out = str(tmp_path / "gpt")
    r = _launch("gpt/pretrain.py", out, cache_dir, steps=60)
    train = [h["loss"] for h in r["history"] if "loss" in h]
    evals = [h["eval_loss"] for h in r["history"] if "eval_loss" in h]
    assert train[0] > 7.5                     # ln(4096) = 8.3 at the start
    assert train[-1] < train[0] - 1.0, train  # a real drop, not noise
    assert evals[-1] < 7.3, evals
    assert os.path.exists(os.path.join(out, "model.safetensors"))
    loss = _gpt_loss_of_checkpoint(out)
    assert loss < 7.3, loss                   # the saved weights are the trained ones (untrained: ~8.3)
    assert "stage" in r["log"] and "tokens/s" in r["log"]  # per-stage stats table


def test_bert_recipe_trains_and_saves(tmp_path, cache_dir):
    out = str(tmp_path / "bert")
    r = _launch("bert/pretrain.py", out, cache_dir, steps=40, extra=("--profile_steps", "2", "--profile_start", "5"))
    assert os.path.exists(os.path.join(out, "profile", "steps_5-6.txt")), r["log"][-2000:]
    assert os.path.exists(os.path.join(out, "profile", "steps_5-6.json.gz"))
    assert "profile of steps 5..6" in r["log"]
    train = [h["loss"] for h in r["history"] if "loss" in h]
    assert train[-1] < train[0] - 0.8, train
    from transformers import BertForPreTraining

    model = BertForPreTraining.from_pretrained(out)
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
