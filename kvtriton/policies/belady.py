"""Belady's OPT: the offline oracle that evicts the key whose next use is farthest in the future."""

from __future__ import annotations

from ._util import already_resident, check_capacity, not_resident
from ._heap import HeapPolicy
from .base import register_policy

NEVER = float("inf")


@register_policy("belady")
class BeladyPolicy(HeapPolicy):
    """Belady/OPT (MIN), given the future; O(log n) per operation with lazy heap deletion.

    ``future`` is the whole sequence of key references the caller will make, in order. Time advances on
    references: every ``insert``/``access`` (and ``insert_and_pin``/``access_and_pin``) consumes the
    next position of ``future``, and its key must be the key found there (a mismatch raises ValueError,
    since a desynchronised oracle would be silently wrong). ``pin``, ``unpin``, ``remove`` and ``victim``
    do not consume positions. A caller that references keys in another order may instead call
    ``seek(t)`` to set the position of the next reference; ``next_use(key)`` tells when a resident key is
    needed next (``inf``: never).

    ``victim`` returns the unpinned resident key whose next use is farthest, keys never used again first
    (among those, the one released earliest). The fast replay calls it exactly this way: the flattened
    ``hash_ids`` of all requests in order (``future_from_requests``).
    """

    offline = True

    def __init__(self, future=None, capacity: int | None = None):
        check_capacity(capacity)
        super().__init__()
        self._future: list = []
        self._next: list = []
        self._t = 0
        self._use: dict = {}
        if future is not None:
            self.set_future(future)

    @staticmethod
    def future_from_requests(requests) -> list:
        """The reference sequence of a prefix-cache replay: every request's ``hash_ids`` in order."""
        out: list = []
        for r in requests:
            out.extend(r.hash_ids)
        return out

    def set_future(self, future) -> None:
        """Give the oracle the reference sequence (before any reference); restarts at position 0."""
        future = list(future)
        nxt = [0] * len(future)
        last: dict = {}
        for i in range(len(future) - 1, -1, -1):
            k = future[i]
            nxt[i] = last.get(k, NEVER)
            last[k] = i
        self._future, self._next, self._t = future, nxt, 0
        # The priority is the negated next use: the heap's minimum is the farthest.
        for key in self._prio:
            self._use[key] = last.get(key, NEVER)
            self._prio[key] = -self._use[key]
        self._rebuild_all()

    def _rebuild_all(self):
        self._heap = []
        for key in self._prio:
            if key not in self._pinned:
                self._push(key)

    def seek(self, t: int) -> None:
        """Set the position in ``future`` of the next reference."""
        if not isinstance(t, int) or not 0 <= t <= len(self._future):
            raise ValueError(f"t must be an int in [0, {len(self._future)}], got {t!r}")
        self._t = t

    @property
    def position(self) -> int:
        """The position in ``future`` of the next reference."""
        return self._t

    def next_use(self, key) -> float:
        if key not in self._prio:
            raise not_resident(key)
        return self._use[key]

    def _consume(self, key):
        t = self._t
        try:
            expected = self._future[t]
        except IndexError:
            raise ValueError(f"reference {t} of key {key!r} is past the end of the future sequence "
                             f"({len(self._future)} references); give it with set_future()") from None
        if expected != key:
            raise ValueError(f"reference {t} is to key {key!r} but the future sequence has {expected!r} "
                             "there; reference keys in the order of the future, or seek()")
        self._t = t + 1
        nu = self._next[t]
        self._use[key] = nu
        self._prio[key] = -nu

    def access_and_pin(self, key) -> None:
        if key not in self._prio:
            raise not_resident(key)
        t = self._t
        if t >= len(self._future) or self._future[t] != key:
            self._consume(key)  # raises with the details
        self._t = t + 1
        nu = self._next[t]
        self._use[key] = nu
        self._prio[key] = -nu
        self._pinned[key] = self._pinned.get(key, 0) + 1

    def insert_and_pin(self, key, size: int = 1) -> None:
        if key in self._prio:
            raise already_resident(key)
        t = self._t
        if t >= len(self._future) or self._future[t] != key:
            self._consume(key)
        self._t = t + 1
        nu = self._next[t]
        self._use[key] = nu
        self._prio[key] = -nu
        self._stamp[key] = 0
        self._pinned[key] = 1

    def _on_insert(self, key, size):
        self._consume(key)

    def _on_access(self, key):
        self._consume(key)

    def _on_forget(self, key):
        del self._use[key]

    def _drop(self, key, prio):
        del self._use[key]
