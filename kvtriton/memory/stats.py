"""Small statistics helpers for the memory manager (plain numbers, no tensors)."""

from __future__ import annotations

import collections

import numpy as np


class LatencyRecorder:
    """The last ``window`` latencies in nanoseconds; percentiles in microseconds on demand."""

    __slots__ = ("_ns", "add")

    def __init__(self, window: int = 100_000):
        self._ns: collections.deque = collections.deque(maxlen=window)
        self.add = self._ns.append  # one C call on the hot path; thread-safe

    @property
    def count(self) -> int:
        return len(self._ns)

    def percentiles_us(self, qs=(50, 95, 99)) -> dict[str, float]:
        if not self._ns:
            return {f"p{q}_us": 0.0 for q in qs} | {"mean_us": 0.0}
        a = np.array(tuple(self._ns), dtype=np.float64) / 1e3  # one C-level copy: appends may race
        out = {f"p{q}_us": float(v) for q, v in zip(qs, np.percentile(a, qs))}
        out["mean_us"] = float(a.mean())
        return out

    def clear(self) -> None:
        self._ns.clear()


def ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0
