"""Peers of the offload benchmark, same model and batch, in the same call: GPT-2-style 2.7B, seq 1024,
micro-batch 8. Wraps the anchor scripts copied into ``.peer/`` (see ../shared/anchors/README.md):

    python benchmarks/offload_peers.py plain ds3 fsdp2off     # each prints one JSON line, $OUT/peers.jsonl

plain: plain PyTorch uncapped (bf16 autocast, fused AdamW); ds3: DeepSpeed ZeRO-3 with param and
optimizer offload (needs the wheels of .peer/whl on PYTHONPATH); fsdp2off: FSDP2 + CPUOffloadPolicy.
"""
import importlib.util
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(HERE, "..", ".peer")
OUT = os.environ.get("OUT", "/tmp")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(PEER, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    argv, sys.argv = sys.argv, [name]  # the deepspeed script loops over argv at import
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.argv = argv
    return mod


def main():
    steps = int(os.environ.get("PEER_STEPS", "3"))
    for w in sys.argv[1:]:
        t = time.time()
        try:
            if w == "plain":
                _load("h200_baseline").plain("2.7b", 8, steps=max(steps, 4))
            elif w == "fsdp2off":
                _load("h200_baseline").fsdp2off("2.7b", 8, steps=steps)
            elif w == "ds3":
                _load("h200_deepspeed_offload").run("2.7b", 8, 3, steps=steps)
        except Exception as e:  # report and go on
            print(json.dumps({"section": w, "error": repr(e)[:600]}), flush=True)
        print(f"[{w}] {time.time() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
