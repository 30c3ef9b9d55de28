"""Reliability: verified atomic checkpoints, restart/resume, no silent hangs, bucketed shapes.

    from rannc_hf.reliability import save_checkpoint, load_checkpoint, find_latest_checkpoint
    from rannc_hf.reliability import guard_module, collective_guard, CollectiveTimeoutError
    from rannc_hf.reliability import BucketCollator, pad_to_bucket

See docs/reliability.md for what survives what.
"""

from .bucketing import BucketCollator, bucket_length, pad_to_bucket, trim_batch
from .checkpoint import (MANIFEST, check_fingerprint, find_latest_checkpoint, list_checkpoints, load_checkpoint,
                         model_fingerprint, resolve_checkpoint, save_checkpoint, verify_checkpoint, write_manifest)
from .watchdog import CollectiveTimeoutError, collective_guard, guard_module, install

__all__ = ["save_checkpoint", "load_checkpoint", "find_latest_checkpoint", "resolve_checkpoint", "verify_checkpoint",
           "list_checkpoints", "model_fingerprint", "check_fingerprint", "write_manifest", "MANIFEST",
           "CollectiveTimeoutError", "collective_guard", "guard_module", "install",
           "BucketCollator", "pad_to_bucket", "bucket_length", "trim_batch"]
