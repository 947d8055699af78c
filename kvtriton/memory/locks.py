"""The per-pool "moves" lock: many users of block ids at once, or one mover of blocks.

Users of block ids (``write_kv``, ``read_kv``, code inside ``pool.stable_blocks()``) hold it shared
from taking the ids to launching the kernel that uses them; operations that move or free live
blocks (``shrink``, ``compact``, ``close``) hold it exclusively. Movers are preferred: once one
waits, new shared holders wait behind it, so a steady stream of writes cannot starve a compaction.
Shared holds are reentrant per thread (a thread already inside may enter again even while a mover
waits); a thread holding it shared cannot take it exclusively (it would wait for itself), which
raises RuntimeError instead of deadlocking.
"""

from __future__ import annotations

import threading


class MovesLock:
    __slots__ = ("_cond", "_shared", "_mover", "_mover_depth", "_waiting", "_local", "_on_wait")

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._shared = 0           # shared holds, threads counted once
        self._mover = None         # ident of the thread holding it exclusively
        self._mover_depth = 0
        self._waiting = 0          # movers waiting
        self._local = threading.local()
        self._on_wait = None       # test hook: called with "shared" or "exclusive" before blocking

    # ---------------------------------------------------------------- shared
    def acquire_shared(self) -> None:
        loc = self._local
        depth = getattr(loc, "depth", 0)
        if depth:
            loc.depth = depth + 1
            return
        me = threading.get_ident()
        with self._cond:
            if self._mover == me:     # a mover may use the ids it is about to rewrite
                loc.depth = 1
                loc.as_mover = True
                return
            while self._mover is not None or self._waiting:
                if self._on_wait is not None:
                    self._on_wait("shared")
                self._cond.wait()
            self._shared += 1
        loc.depth = 1
        loc.as_mover = False

    def release_shared(self) -> None:
        loc = self._local
        depth = loc.depth - 1
        loc.depth = depth
        if depth or loc.as_mover:
            return
        with self._cond:
            self._shared -= 1
            if not self._shared and self._waiting:
                self._cond.notify_all()

    # ---------------------------------------------------------------- exclusive
    def acquire_exclusive(self, what: str = "this operation") -> None:
        me = threading.get_ident()
        with self._cond:
            if self._mover == me:
                self._mover_depth += 1
                return
            if getattr(self._local, "depth", 0):
                raise RuntimeError(f"{what} waits for every holder of the pool's stable_blocks(), and this "
                                   f"thread is one (inside pool.stable_blocks(), write_kv or read_kv)")
            self._waiting += 1
            try:
                while self._mover is not None or self._shared:
                    if self._on_wait is not None:
                        self._on_wait("exclusive")
                    self._cond.wait()
            except BaseException:
                self._waiting -= 1
                self._cond.notify_all()  # shared holders queued behind this mover may go
                raise
            self._waiting -= 1
            self._mover = me
            self._mover_depth = 1

    def release_exclusive(self) -> None:
        with self._cond:
            self._mover_depth -= 1
            if not self._mover_depth:
                self._mover = None
                self._cond.notify_all()

    @property
    def held_shared_by_me(self) -> bool:
        return bool(getattr(self._local, "depth", 0))


class SharedHold:
    """``with pool.stable_blocks():`` — a shared hold of a MovesLock as a context manager. ``check``
    runs once the hold is taken (e.g. "the pool is open"); if it raises, the hold is let go first.
    Entering returns ``value``."""

    __slots__ = ("_lock", "_check", "_value")

    def __init__(self, lock: MovesLock, check=None, value=None):
        self._lock, self._check, self._value = lock, check, value

    def __enter__(self):
        self._lock.acquire_shared()
        if self._check is not None:
            try:
                self._check()
            except BaseException:
                self._lock.release_shared()
                raise
        return self._value

    def __exit__(self, *exc):
        self._lock.release_shared()
        return False
