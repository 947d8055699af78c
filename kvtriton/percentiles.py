"""Percentiles of a sample: the one place the library summarises latencies and times (the replay's
TTFT and queueing delay, a pool's request latencies) and that the benchmark scripts build on
(``experiments/_bench_utils.py``).

Every percentile here is ``np.percentile``'s default, linear interpolation between the two samples
around the rank (``method="linear"``), so the figures of a replay, a pool and a benchmark agree.

- :func:`percentile_summary`: a sample -> ``{key: float}`` (mean and ``p<q>``; with ``spread`` also
  ``n``, std, min and max), keys named by :func:`summary_key`: ``<prefix>_<stat>_<unit>``, the parts
  that are empty left out (``ttft_s_p99``, ``p50_us``).
- :func:`sorted_percentiles`: the same percentiles read off an already sorted array at their ranks
  (two samples per percentile, no pass over the array): for a window kept sorted as it changes.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

__all__ = ["percentile_summary", "sorted_percentiles", "summary_key"]


def summary_key(stat: str, prefix: str = "", unit: str = "") -> str:
    """``<prefix>_<stat>_<unit>``, empty parts left out: ``("p50", "ttft_s")`` -> ``ttft_s_p50``,
    ``("p50", unit="us")`` -> ``p50_us``."""
    return "_".join(part for part in (prefix, stat, unit) if part)


def percentile_summary(values: Iterable[float], qs: Sequence[float] = (50, 95, 99), *, prefix: str = "",
                       unit: str = "", scale: float = 1.0, spread: bool = False) -> dict:
    """Summary of a sample, each value multiplied by ``scale`` first (e.g. ns with ``unit="us",
    scale=1e-3``).

    Keys (:func:`summary_key` of ``prefix``, the statistic and ``unit``), in this order: the mean, then
    ``p<q>`` for each of ``qs`` (linear interpolation); with ``spread``: ``n`` (never prefixed or
    suffixed) first, ``std`` (sample standard deviation, 0 for one value) and ``min`` after the mean, and
    ``max`` last. Values are Python floats (``n`` an int); an empty sample gives 0.0 everywhere (``n`` 0).
    """
    if not isinstance(values, (np.ndarray, Sequence)):
        values = list(values)
    a = np.asarray(values, dtype=np.float64)
    if scale != 1.0:
        a = a * scale
    qs = tuple(qs)

    def key(stat: str) -> str:
        return summary_key(stat, prefix, unit)

    empty = a.size == 0
    out: dict = {"n": int(a.size)} if spread else {}
    out[key("mean")] = 0.0 if empty else float(a.mean())
    if spread:
        out[key("std")] = float(a.std(ddof=1)) if a.size > 1 else 0.0
        out[key("min")] = 0.0 if empty else float(a.min())
    pcts = [0.0] * len(qs) if empty else np.percentile(a, list(qs)).tolist()
    for q, v in zip(qs, pcts):
        out[key(f"p{q}")] = float(v)
    if spread:
        out[key("max")] = 0.0 if empty else float(a.max())
    return out


def sorted_percentiles(s: np.ndarray, qs: Sequence[float], divisor: float = 1.0) -> list[float]:
    """``np.percentile(s / divisor, qs)`` (linear interpolation) of a sorted, non-empty 1-D ``s``, reading
    only the two samples around each rank."""
    n = s.size
    q = np.true_divide(np.asarray(qs, dtype=np.float64), 100)
    vi = (n - 1) * q                                 # numpy's virtual index for 'linear'
    prev = np.floor(vi)
    gamma = vi - prev
    prev = prev.astype(np.int64)
    nxt = prev + 1
    top = vi >= n - 1
    prev[top], nxt[top] = n - 1, n - 1
    low = vi < 0
    prev[low], nxt[low] = 0, 0
    a, b = s[prev] / divisor, s[nxt] / divisor
    diff = b - a
    # numpy's _lerp: from the upper sample when gamma >= 0.5, so the result never overshoots it
    out = a + diff * gamma
    hi = gamma >= 0.5
    out[hi] = (b - diff * (1 - gamma))[hi]
    return [float(v) for v in out]
