"""Errors raised by the data layer of the recipes.

    from rannc_hf.data.errors import DataError
    try:
        ds = build_clm_dataset(tok, 128, train_file="missing.txt")
    except DataError as e:
        print(e)   # says what was wrong and what to pass instead
"""

from __future__ import annotations

from ..errors import RanncError


class DataError(RanncError, ValueError):
    """A data source cannot be loaded or used (unknown dataset, bad file, no text column)."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A ``--train_file`` / ``--validation_file`` / tokenizer path does not exist."""
