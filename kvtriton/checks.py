"""Argument checks shared by every layer: integers are ints (numpy integers too), never bools; numbers are
finite unless said otherwise; every error names the argument and what it may be.

``allowed`` overrides the generated description where a caller has a better one ("a positive int or
None (unlimited)").
"""

from __future__ import annotations

import math

import numpy as np


def is_int(v) -> bool:
    """True for ``int`` and numpy integers; False for ``bool`` (an int subclass) and everything else."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_number(v) -> bool:
    """True for ints and floats (numpy's too); False for bools and everything else."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _describe(kind: str, low, high, allow_none: bool, strict_low: bool = False) -> str:
    if low is not None and high is not None:
        text = f"{kind} in {'(' if strict_low else '['}{low}, {high}]"
    elif low is not None:
        text = f"{kind} {'>' if strict_low else '>='} {low}"
    elif high is not None:
        text = f"{kind} <= {high}"
    else:
        text = kind
    return text + (" or None" if allow_none else "")


def check_int(name: str, v, low: int | None = None, high: int | None = None, *, allow_none: bool = False,
              allowed: str | None = None, exc=ValueError):
    """``v`` as an int in ``[low, high]`` (either bound may be None), or None when ``allow_none``."""
    if v is None and allow_none:
        return None
    if not is_int(v) or (low is not None and v < low) or (high is not None and v > high):
        raise exc(f"{name} must be {allowed or _describe('an int', low, high, allow_none)}, got {v!r}")
    return int(v)


def check_number(name: str, v, low: float | None = None, high: float | None = None, *,
                 positive: bool = False, finite: bool = True, allow_none: bool = False,
                 allowed: str | None = None, exc=ValueError):
    """``v`` as a float: ``> 0`` when ``positive``, within ``[low, high]``, finite unless ``finite=False``
    (NaN is never accepted), or None when ``allow_none``."""
    if v is None and allow_none:
        return None
    ok = is_number(v) and not math.isnan(v) and (not finite or math.isfinite(v))
    ok = ok and (not positive or v > 0) and (low is None or v >= low) and (high is None or v <= high)
    if not ok:
        kind = "a positive number" if positive else "a finite number" if finite else "a number"
        raise exc(f"{name} must be {allowed or _describe(kind, low, high, allow_none)}, got {v!r}")
    return float(v)
