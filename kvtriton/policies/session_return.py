"""Online estimate of how likely an idle session is to send its next request soon.

A serving system sees, for every session (conversation), when its last request arrived, why that
request's output stopped (``tool_use``: the agent calls back once its tool has run; ``end_turn``: it
waits for a person), how long the server took to answer it (``api_time``: known when it completes) and
the gap before it. :class:`ReturnModel` learns from those alone, with no future: a session's *class* is
the stop reason of its last output, a bucket of its previous gap (its pace) and a bucket of its last
service time, and for an idle time ``e`` (since its last request arrived) and a horizon ``H``::

    P(return within H | class, idle e) ~ returns observed in (e, e + H] / sessions at risk at e

where the sessions at risk are the completed gaps longer than ``e`` plus the sessions idle right now
for longer than ``e`` (they have not returned yet: censored observations, so sessions that never come
back lower the estimate instead of vanishing from it). Classes with few observations are shrunk toward
the pooled estimate of all classes (``prior`` pseudo-observations). The score is a weighted sum over
horizons (default 15 s, 1 min, 5 min and 2 h, with weights 1, 0.5, 0.2 and 0.03): the short horizons rank
sessions in a tool loop, the longer ones order the sessions that are all unlikely to come back soon.
"""

from __future__ import annotations

import bisect
import math

from ..checks import check_number

STOP_CLASSES = ("tool_use", "end_turn", None)


def _edges(name: str, edges) -> tuple:
    try:
        edges = tuple(edges)
    except TypeError:
        raise ValueError(f"{name} must be increasing positive seconds, got {edges!r}") from None
    if list(edges) != sorted(edges) or any(not (isinstance(x, (int, float)) and x > 0) for x in edges):
        raise ValueError(f"{name} must be increasing positive seconds, got {edges!r}")
    return edges


class _Sorted:
    """A sorted list of floats with insert, remove and counts below/above (bisect; n stays small)."""

    __slots__ = ("xs",)

    def __init__(self):
        self.xs: list = []

    def add(self, x: float) -> None:
        bisect.insort(self.xs, x)

    def discard(self, x: float) -> None:
        i = bisect.bisect_left(self.xs, x)
        if i < len(self.xs) and self.xs[i] == x:
            self.xs.pop(i)

    def count_above(self, x: float) -> int:
        return len(self.xs) - bisect.bisect_right(self.xs, x)

    def count_in(self, lo: float, hi: float) -> int:
        """Values in ``(lo, hi]``."""
        return bisect.bisect_right(self.xs, hi) - bisect.bisect_right(self.xs, lo)

    def count_below(self, x: float) -> int:
        return bisect.bisect_left(self.xs, x)


class _Stats:
    """Completed gaps and the last-request times of the idle sessions of one class."""

    __slots__ = ("gaps", "idle")

    def __init__(self):
        self.gaps = _Sorted()
        self.idle = _Sorted()

    def returns_and_at_risk(self, e: float, now: float, horizon: float) -> tuple[int, int]:
        returns = self.gaps.count_in(e, e + horizon)
        at_risk = self.gaps.count_above(e) + self.idle.count_below(now - e)
        return returns, at_risk


class ReturnModel:
    """Per-session state and the return-probability score (see the module docstring).

    ``observe(session, now, stop, service_s)`` records a request of ``session`` at time ``now`` whose
    output stopped for ``stop`` after ``service_s`` seconds of server time (None: unknown);
    ``score(session, now)`` is the session's weighted return probability at ``now`` (higher: keep).
    ``pace_edges`` and ``service_edges``: bucket edges in seconds for the previous gap and the service
    time.
    """

    def __init__(self, horizons=(15.0, 60.0, 300.0, 7200.0), weights=(1.0, 0.5, 0.2, 0.03),
                 pace_edges=(10, 20, 40, 80, 160, 320, 640), service_edges=(5, 10, 20, 40), prior: float = 5.0):
        horizons, weights = tuple(horizons), tuple(weights)
        if not horizons or len(horizons) != len(weights):
            raise ValueError(f"horizons and weights must be non-empty and of equal length, got {len(horizons)} "
                             f"horizons and {len(weights)} weights")
        for i, h in enumerate(horizons):
            check_number(f"horizons[{i}]", h, positive=True, allowed="a positive number of seconds")
        for i, w in enumerate(weights):
            check_number(f"weights[{i}]", w, 0.0, allowed="a finite number >= 0")
        self.pace_edges = _edges("pace_edges", pace_edges)
        self.service_edges = _edges("service_edges", service_edges)
        check_number("prior", prior, positive=True, allowed="a positive number of pseudo-observations")
        self.terms = tuple(zip((float(h) for h in horizons), (float(w) for w in weights)))
        self.prior = float(prior)
        self.last: dict = {}        # session -> time of its last request
        self.klass: dict = {}       # session -> (stop, pace bucket) of its last request
        self._prev_gap: dict = {}
        self._stats: dict = {}      # class -> _Stats
        self._all = _Stats()

    def _class_stats(self, k) -> _Stats:
        s = self._stats.get(k)
        if s is None:
            s = self._stats[k] = _Stats()
        return s

    def observe(self, session, now: float, stop, service_s: float | None = None) -> None:
        """``session`` sent a request at ``now``; its output stopped for ``stop`` after ``service_s``."""
        last = self.last.get(session)
        if last is not None:
            gap = max(0.0, now - last)
            old = self._class_stats(self.klass[session])
            old.idle.discard(last)
            old.gaps.add(gap)
            self._all.idle.discard(last)
            self._all.gaps.add(gap)
            self._prev_gap[session] = gap
        pg = self._prev_gap.get(session)
        sv = -1 if service_s is None else bisect.bisect(self.service_edges, service_s)
        k = (stop, -1 if pg is None else bisect.bisect(self.pace_edges, pg), sv)
        self.last[session] = now
        self.klass[session] = k
        self._class_stats(k).idle.add(now)
        self._all.idle.add(now)

    def score(self, session, now: float) -> float:
        e = max(0.0, now - self.last[session])
        own = self._stats[self.klass[session]]
        total = 0.0
        for h, w in self.terms:
            r0, n0 = self._all.returns_and_at_risk(e, now, h)
            pooled = (r0 + 0.5) / (n0 + 1.0)
            r, n = own.returns_and_at_risk(e, now, h)
            total += w * (r + self.prior * pooled) / (n + self.prior)
        return total

    def return_probability(self, stop, horizon: float, idle: float = 0.0) -> float:
        """What the model has learned: P(return within ``horizon`` s | stop reason, idle ``idle`` s),
        over every pace (completed gaps only; nan before any)."""
        ret = risk = 0
        for (s, _, _), st in self._stats.items():
            if s == stop:
                ret += st.gaps.count_in(idle, idle + horizon)
                risk += st.gaps.count_above(idle)
        return ret / risk if risk else math.nan
