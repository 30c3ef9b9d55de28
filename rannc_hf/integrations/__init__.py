"""Integrations with the Hugging Face stack.

    from rannc_hf.integrations.accelerate import RanncAccelerator, RanncPlugin   # Accelerate
    from rannc_hf.integrations.checkpoint import save_full_model                  # HF checkpoints
    # shell: rannc-hf launch --rannc_config rannc.yaml --num_processes 4 train.py

Modules: ``accelerate`` (RanncPlugin, RanncAccelerator), ``launch`` (``rannc-hf launch``),
``checkpoint`` (full-model save in ``save_pretrained`` layout), ``trainer`` (RanncTrainer), ``stats``
(RanncStatsCallback), ``step_profiler`` (StepProfilerCallback: torch.profiler over a few training steps).
"""
