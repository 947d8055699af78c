"""The prefix-cache step shared by the fast replay and by policies that simulate caches of their own.

A request's hits are the longest prefix of its keys already resident; then each key is hit
(``access_and_pin``) or inserted (``insert_and_pin``, evicting the policy's victim while the cache is
full), and at the end all of them are released (``unpin_many``), last key first in ``"prefix"`` order
so that a cached prefix is never cut in the middle. Keys only: no tensors, no pools.
"""

from __future__ import annotations

from .base import EvictionPolicy

RELEASE_ORDERS = ("prefix", "forward")


class PrefixCacheReplay:
    """A key-only prefix cache of ``capacity`` keys (None: unlimited) driven by ``policy``.

    ``step(keys, request)`` replays one request and returns its prefix hits; ``evictions`` counts the
    victims so far and ``resident`` is the set of resident keys. ``context``: call the policy's
    ``on_request`` hook before each request (skip it for policies that ignore it: it is per request,
    not per key, but the fast replay saves even that). ``release``: ``"prefix"`` (last key first) or
    ``"forward"``.
    """

    __slots__ = ("policy", "resident", "capacity", "evictions", "_ops", "_context", "_reverse")

    def __init__(self, policy: EvictionPolicy, capacity: int | None = None, *, context: bool = True,
                 release: str = "prefix"):
        if release not in RELEASE_ORDERS:
            raise ValueError(f"release must be one of {RELEASE_ORDERS}, got {release!r}")
        self.policy = policy
        self.resident: set = set()
        self.capacity = capacity
        self.evictions = 0
        self._ops = (policy.on_request, policy.access_and_pin, policy.insert_and_pin, policy.victim,
                     policy.unpin_many)
        self._context = context
        self._reverse = release == "prefix"

    def step(self, keys, request=None) -> int:
        """Replay one request of ``keys`` (prefix-chained, a sequence); return its prefix hits."""
        res = self.resident
        on_request, access_pin, insert_pin, victim, unpin_many = self._ops
        h = 0
        for k in keys:
            if k in res:
                h += 1
            else:
                break
        if self._context:
            on_request(keys, h, request)
        limit = self.capacity if self.capacity is not None else float("inf")
        n = len(res)
        add, discard = res.add, res.discard
        for k in keys:
            if k in res:
                access_pin(k)
            else:
                if n >= limit:
                    discard(victim())
                    self.evictions += 1
                    n -= 1
                insert_pin(k)
                add(k)
                n += 1
        unpin_many(reversed(keys) if self._reverse else keys)
        return h
