"""GPT (causal LM) pretraining with rannc_hf: tiny on a laptop CPU by default, up to 100B by config.

Quickstart (2 CPU processes, a 2-stage pipeline, offline corpus, a few minutes)::

    rannc-hf launch --rannc_config recipes/configs/rannc_cpu_2proc.yaml \\
        --config_file recipes/configs/accelerate_cpu_2proc.yaml recipes/gpt/pretrain.py

Bigger: ``--model_config gpt2-1.3b --seq_len 1024`` with ``rannc_1gpu_offload.yaml``; Llama-style:
``--model_config llama-tiny``. ``--trainer`` runs the same job through ``RanncTrainer``. Also runs
under ``torchrun --nproc_per_node 2 recipes/gpt/pretrain.py --rannc_config ...``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # recipes/

from common import parse_args  # noqa: E402
from loop import train  # noqa: E402

if __name__ == "__main__":
    train(parse_args("gpt"))
