"""Small helpers shared by the policy implementations."""

from __future__ import annotations


def check_capacity(capacity):
    """``capacity`` (blocks) as an int, or None; ValueError unless it is a positive integer."""
    if capacity is None:
        return None
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be a positive integer number of blocks or None, got {capacity!r}")
    return capacity


def check_size(size):
    if isinstance(size, bool) or not isinstance(size, (int, float)) or not size > 0:
        raise ValueError(f"size must be a positive number, got {size!r}")
    return size


def not_resident(key):
    return KeyError(f"key {key!r} is not resident")


def already_resident(key):
    return ValueError(f"key {key!r} is already resident; use access() for a hit")


def not_pinned(key):
    return ValueError(f"key {key!r} is not pinned")


def empty():
    return LookupError("no evictable key: every resident key is pinned, or none is resident")
