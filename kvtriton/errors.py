"""Exceptions raised by kvtriton."""


class KVTritonError(Exception):
    """Base class of kvtriton's own errors."""


class PoolExhaustedError(KVTritonError, MemoryError):
    """A pool could not provide the blocks asked for, even after evicting everything evictable.

    The pool is left exactly as it was before the call.
    """

    def __init__(self, pool: str, requested: int, free: int, evictable: int = 0, message: str | None = None):
        self.pool, self.requested, self.free, self.evictable = pool, requested, free, evictable
        super().__init__(message or (
            f"pool {pool!r} exhausted: {requested} blocks requested, {free} free and "
            f"{evictable} evictable"))


class CacheReleasedError(KVTritonError, RuntimeError):
    """A VirtualKVCache was used (or released again) after it was released."""


class ClosedError(KVTritonError, RuntimeError):
    """An allocator, arena or pool was used after ``close()`` (or ``destroy_pool``)."""


class PoolClosedError(ClosedError, CacheReleasedError):
    """A CachePool was used after it was closed or destroyed (its caches were released with it)."""

    def __init__(self, pool: str, message: str | None = None):
        self.pool = pool
        super().__init__(message or f"pool {pool!r} is closed")


class ArenaClosedError(ClosedError):
    """An Arena was used after it was closed."""


class AllocatorClosedError(ClosedError):
    """A GPUMemoryAllocator was used after it was closed."""
