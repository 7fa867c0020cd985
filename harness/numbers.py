"""The one way numbers are shown: criterion lines, RESULTS.md and `harness compare`."""

from __future__ import annotations

import math

MISSING = "–"


def format_number(value: float | int | None, missing: str = MISSING) -> str:
    """4 significant digits, whole numbers as integers, scientific notation for tiny
    magnitudes (p-values < 1e-3), `missing` for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4g}"


def format_percent(share: float | None) -> str:
    """A share (0..1) as a whole percentage, `MISSING` where missing."""
    if share is None or math.isnan(share):
        return MISSING
    return f"{share:.0%}"
