"""Small helpers shared by the policy implementations."""

from __future__ import annotations

from ..checks import check_int, check_number


def check_capacity(capacity):
    """``capacity`` (blocks) as an int, or None; ValueError unless it is a positive integer."""
    return check_int("capacity", capacity, 1, allow_none=True,
                     allowed="a positive integer number of blocks or None")


def check_size(size):
    check_number("size", size, positive=True)
    return size


def not_resident(key):
    return KeyError(f"key {key!r} is not resident")


def already_resident(key):
    return ValueError(f"key {key!r} is already resident; use access() for a hit")


def not_pinned(key):
    return ValueError(f"key {key!r} is not pinned")


def empty():
    return LookupError("no evictable key: every resident key is pinned, or none is resident")
