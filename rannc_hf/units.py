"""Parse and format byte sizes: ``parse_bytes("24GiB") == 24 * 2**30``.

    >>> parse_bytes("80GB"), format_bytes(3 * 2**30)
    (80000000000, '3.00 GiB')
"""

from __future__ import annotations

import re

from .errors import ConfigError

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_bytes(value: int | float | str | None, what: str = "size") -> int | None:
    """Return ``value`` in bytes; accepts ints and strings like ``"24GiB"``, ``"80 GB"``, ``"1.5TiB"``."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size like '24GiB' or a number of bytes, got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ConfigError(f"{what}: must be positive, got {value!r}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(
            f"{what}: cannot read {value!r} as a size; write e.g. '24GiB', '80GB', '512MiB' or a number of bytes"
        )
    n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if n <= 0:
        raise ConfigError(f"{what}: must be positive, got {value!r}")
    return int(n)


def format_bytes(n: float) -> str:
    """Human-readable binary size, e.g. ``'3.00 GiB'``."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
