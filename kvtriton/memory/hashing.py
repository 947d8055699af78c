"""Prefix-chained block hashes, as vLLM computes them: a block's hash covers its own tokens and,
through its parent's hash, every token before it, so equal hashes mean equal prefixes.

Python's ``hash`` of a tuple of ints is deterministic across runs (no per-process salt for ints),
which keeps traces and replays reproducible.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from .checks import is_int

# The parent hash of a sequence's first block (vLLM's NONE_HASH role).
ROOT_HASH = hash(("kvtriton", "root"))


def hash_block_tokens(parent_hash: int | None, tokens: Iterable[int]) -> int:
    """The hash of one block: ``hash((parent_hash, tuple(tokens)))`` (``None`` parent = first block)."""
    return hash((ROOT_HASH if parent_hash is None else parent_hash, tuple(int(t) for t in tokens)))


def block_hashes_from_tokens(token_ids: Sequence[int], block_size: int,
                             parent_hash: int | None = None) -> list[int]:
    """Chained hashes of the FULL blocks of ``token_ids`` (a trailing partial block gets none)."""
    if not is_int(block_size) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    block_size = int(block_size)
    toks = list(token_ids)
    out: list[int] = []
    h = parent_hash
    for start in range(0, len(toks) - block_size + 1, block_size):
        h = hash_block_tokens(h, toks[start:start + block_size])
        out.append(h)
    return out


def expand_hash_ids(hash_ids: Sequence[int], hash_block_tokens_: int, block_size: int,
                    num_tokens: int | None = None) -> list[int]:
    """Per-pool-block hashes from coarser prefix-chained ids (e.g. Mooncake's ``hash_ids``, one per
    ``hash_block_tokens_`` = 512 tokens).

    Pool block ``k`` covers tokens ``[k*block_size, (k+1)*block_size)``; it gets a hash only if it is
    full (ends at or before ``num_tokens``, default ``len(hash_ids) * hash_block_tokens_``). Its hash
    combines the id covering its last token (which, being prefix-chained, identifies every earlier
    token) with its end position, so blocks inside one coarse id differ and equal prefixes agree.
    """
    for arg, v in (("hash_block_tokens", hash_block_tokens_), ("block_size", block_size)):
        if not is_int(v) or v < 1:
            raise ValueError(f"{arg} must be an int >= 1, got {v!r}")
    if num_tokens is not None and (not is_int(num_tokens) or num_tokens < 0):
        raise ValueError(f"num_tokens must be None or an int >= 0, got {num_tokens!r}")
    hash_block_tokens_, block_size = int(hash_block_tokens_), int(block_size)
    covered = len(hash_ids) * hash_block_tokens_
    n = covered if num_tokens is None else min(int(num_tokens), covered)
    out = []
    for k in range(n // block_size):
        end = (k + 1) * block_size
        out.append(hash((ROOT_HASH, int(hash_ids[(end - 1) // hash_block_tokens_]), end)))
    return out
