"""Argument checks shared by the memory manager: integers are ints (numpy integers too), never bools,
and every error names the argument and the allowed range."""

from __future__ import annotations

import numpy as np


def is_int(v) -> bool:
    """True for ``int`` and numpy integers; False for ``bool`` (an int subclass) and everything else."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_count(name: str, v, minimum: int = 0, exc=ValueError) -> int:
    """``v`` as an int ``>= minimum``; else ``exc`` naming ``name`` and the range."""
    if not is_int(v) or v < minimum:
        raise exc(f"{name} must be an int >= {minimum}, got {v!r}")
    return int(v)


def check_index(name: str, v, lo: int, hi: int, exc=IndexError) -> int:
    """``v`` as an int in ``[lo, hi)``; else ``exc`` naming ``name`` and the range."""
    if not is_int(v) or not lo <= v < hi:
        raise exc(f"{name} must be an int in [{lo}, {hi}), got {v!r}")
    return int(v)


def check_token_ids(token_ids, name: str = "token_ids") -> list[int]:
    """``token_ids`` as a list of ints; ValueError naming the first entry that is not an integer."""
    if isinstance(token_ids, (str, bytes)) or not hasattr(token_ids, "__iter__"):
        raise ValueError(f"{name} must be a sequence of ints, got {type(token_ids).__name__}")
    toks = list(token_ids)
    if all(type(t) is int for t in toks):  # the common case, one C-speed pass
        return toks
    for i, t in enumerate(toks):
        if not is_int(t):
            raise ValueError(f"{name}[{i}] must be an int (a token id), got {t!r}")
    return [int(t) for t in toks]


def check_block_hashes(block_hashes, name: str = "block_hashes") -> list:
    """``block_hashes`` as a list of distinct hashable keys other than ``None`` (the pool's "no hash"
    marker); ValueError naming the first bad index."""
    if isinstance(block_hashes, (str, bytes)) or not hasattr(block_hashes, "__iter__"):
        raise ValueError(f"{name} must be a sequence of hashable keys (one per block), got "
                         f"{type(block_hashes).__name__}")
    hashes = list(block_hashes)
    try:
        distinct = len(set(hashes)) == len(hashes)
    except TypeError:
        distinct = False
    if distinct and None not in hashes:
        return hashes
    seen: dict = {}
    for i, h in enumerate(hashes):
        if h is None:
            raise ValueError(f"{name}[{i}] is None; None marks a block without a hash, so every block "
                             f"hash must be a hashable key other than None")
        try:
            first = seen.setdefault(h, i)
        except TypeError:
            raise ValueError(f"{name}[{i}] must be hashable, got {type(h).__name__} {h!r}") from None
        if first != i:
            raise ValueError(f"{name}[{i}] repeats {name}[{first}]; block hashes are prefix-chained, so "
                             f"they must be distinct")
    return hashes  # pragma: no cover - one of the checks above fires
