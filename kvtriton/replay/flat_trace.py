"""A request trace as flat numpy arrays, validated once and shared by every run of a miss-ratio curve.

``prepare_trace(requests)`` checks the records and keeps, per request (int64 arrays of length
``requests``): ``lengths`` (blocks), ``block_tokens`` and ``token_refs`` (the prompt's tokens, counted as
the replay weighs them), plus ``offsets`` (int64, ``requests + 1``: request ``r``'s blocks are
``offsets[r]:offsets[r + 1]`` of the flat key sequence). ``dense_keys()`` builds, on first use, the flat
key sequence itself with the block ids remapped to dense ids ``0..num_keys-1`` (int32), which the
compiled kernels index their state arrays with. It is built straight from the records' ``hash_ids``
with ``np.fromiter`` (no per-reference Python objects): non-negative integer ids that are already
nearly dense are kept as they are, other integers go through ``np.unique``, and non-integer ids through
a dict. The arrays are plain numpy, so worker processes forked after they are built share them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from ..checks import check_int

_INT32_MAX = 2**31 - 1


class FlatTrace:
    """A validated trace: the records, per-request arrays and (lazily) the dense key sequence."""

    __slots__ = ("requests", "lengths", "block_tokens", "token_refs", "offsets", "max_blocks", "_dense",
                 "_dense_error")

    def __init__(self, requests, lengths, block_tokens, token_refs):
        self.requests = requests
        self.lengths = lengths
        self.block_tokens = block_tokens
        self.token_refs = token_refs
        self.offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.max_blocks = int(lengths.max()) if len(lengths) else 0
        self._dense = None
        self._dense_error = None

    @property
    def num_references(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return len(self.lengths)

    def ids(self, idx: int) -> tuple:
        """Request ``idx``'s block ids as a tuple (the record's own tuple when it is one)."""
        return tuple(self.requests[idx].hash_ids)

    def dense_keys(self):
        """``(keys, num_keys)``: int32 dense ids of every reference in order, and how many distinct ids.

        Built once; ValueError (kept for later calls) when the ids cannot be remapped (more than 2**31
        distinct ids)."""
        if self._dense is None and self._dense_error is None:
            try:
                self._dense = _dense_keys(self.requests, self.num_references)
            except ValueError as e:
                self._dense_error = str(e)
        if self._dense is None:
            raise ValueError(self._dense_error)
        return self._dense


def _dense_keys(requests, total):
    chain = itertools.chain.from_iterable(r.hash_ids for r in requests)
    if total == 0:
        return np.zeros(0, np.int32), 0
    try:
        raw = np.fromiter(chain, dtype=np.int64, count=total)
    except (TypeError, ValueError, OverflowError):
        raw = None
    if raw is None:  # ids that are not 64-bit integers: number them in order of first use
        seen: dict = {}
        chain = itertools.chain.from_iterable(r.hash_ids for r in requests)
        keys = np.fromiter((seen.setdefault(k, len(seen)) for k in chain), dtype=np.int64, count=total)
        num = len(seen)
    else:
        lo, hi = int(raw.min()), int(raw.max())
        if lo >= 0 and hi < _INT32_MAX and hi < 4 * total + 1024:
            return raw.astype(np.int32), hi + 1  # already dense enough to index by
        uniq, keys = np.unique(raw, return_inverse=True)
        del raw
        num = len(uniq)
        del uniq
    if num > _INT32_MAX:
        raise ValueError(f"the trace has {num} distinct block ids; the compiled kernels take at most 2**31 - 1")
    return keys.reshape(-1).astype(np.int32), num


def prepare_trace(requests) -> FlatTrace:
    """Validate ``requests`` (Request records: ``hash_ids``, ``input_length``, optional ``block_tokens``,
    default 512) and return them as a ``FlatTrace``. A record whose length disagrees with its blocks
    counts whole blocks for its tokens."""
    if isinstance(requests, (str, bytes)) or not isinstance(requests, Sequence):
        try:
            requests = list(requests)
        except TypeError:
            raise ValueError("requests must be a sequence of Request records") from None
    if len(requests) == 0:
        raise ValueError("requests is empty: the trace has no requests to replay")
    m = len(requests)
    lengths = np.zeros(m, np.int64)
    bts = np.zeros(m, np.int64)
    toks = np.zeros(m, np.int64)
    for i, r in enumerate(requests):
        try:
            n = len(r.hash_ids)
            length = r.input_length
            bt = getattr(r, "block_tokens", 512)
        except (AttributeError, TypeError):
            raise ValueError(f"requests[{i}] is not a Request record (needs hash_ids and input_length)") from None
        check_int(f"requests[{i}].input_length", length, 0, allowed="a non-negative int")
        check_int(f"requests[{i}].block_tokens", bt, 1, allowed="a positive int")
        last = length - bt * (n - 1) if n else 0
        if n and not 1 <= last <= bt:
            last = bt  # the record's length disagrees with its blocks: count whole blocks
        lengths[i] = n
        bts[i] = bt
        toks[i] = bt * (n - 1) + last if n else 0
    return FlatTrace(requests, lengths, bts, toks)
