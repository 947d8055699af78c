"""One device allocation cut into fixed-size chunks that pools borrow and give back.

The arena is a single ``uint8`` tensor; a chunk is a byte range ``[c * chunk_bytes, (c+1) *
chunk_bytes)``. The arena only keeps the ownership table; what lives inside a chunk is the owning
pool's business.

Every ownership change (``claim``, ``give_back``, ``release_all``) happens inside the arena, under its
lock, which these methods take themselves; ``n_free`` is only ever changed there. The lock is
reentrant so that a pool can hold it across choosing free chunks and claiming them (one atomic
step), and it is a leaf: nothing is called back while it is held.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

from ..devices import parse_device
from ..errors import ArenaClosedError
from .checks import is_int

FREE = -1
DEFAULT_CHUNK_BYTES = 2 << 20


def device_free_bytes(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device`` (CUDA: mem_get_info; CPU: available RAM)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 40


class Arena:
    """A device's KV memory: ``buffer`` uint8 ``[num_chunks * chunk_bytes]``, chunks owned by pools.

    Sized by ``budget_bytes`` or ``memory_fraction`` of the device's free memory (rounded down to
    whole chunks). A budget above the free memory raises ValueError and allocates nothing.
    """

    def __init__(self, device="cpu", budget_bytes: int | None = None, memory_fraction: float | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.device = parse_device(device)
        if not is_int(chunk_bytes) or chunk_bytes < 1 or chunk_bytes % 256:
            raise ValueError(f"chunk_bytes must be a positive multiple of 256, got {chunk_bytes!r}")
        if budget_bytes is not None and memory_fraction is not None:
            raise ValueError("give budget_bytes or memory_fraction, not both")
        free = device_free_bytes(self.device)
        if budget_bytes is None:
            frac = 0.9 if memory_fraction is None else memory_fraction
            if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 < frac <= 1.0:
                raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction!r}")
            budget_bytes = int(free * frac)
        elif not is_int(budget_bytes) or budget_bytes < chunk_bytes:
            raise ValueError(f"budget_bytes must be an int >= chunk_bytes ({chunk_bytes}), got {budget_bytes!r}")
        elif budget_bytes > free:
            raise ValueError(f"budget_bytes={budget_bytes} exceeds the free memory of {self.device}; "
                             f"the maximum is {free}")
        self.chunk_bytes = chunk_bytes = int(chunk_bytes)
        budget_bytes = int(budget_bytes)
        self.num_chunks = budget_bytes // chunk_bytes
        if self.num_chunks < 1:
            raise ValueError(f"budget of {budget_bytes} bytes holds no chunk of {chunk_bytes} bytes")
        self.num_bytes = self.num_chunks * chunk_bytes
        self.buffer = torch.empty(self.num_bytes, dtype=torch.uint8, device=self.device)
        self.owner = np.full(self.num_chunks, FREE, dtype=np.int64)
        self.n_free = self.num_chunks  # == (owner == FREE).sum(); changed only under ``lock``
        self.lock = threading.RLock()
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise ArenaClosedError(f"the arena of {self.device} is closed")

    def _check_chunks(self, chunks, owner_id) -> np.ndarray:
        if not is_int(owner_id) or owner_id < 0:
            raise ValueError(f"owner_id must be an int >= 0, got {owner_id!r}")
        arr = np.asarray(chunks)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise ValueError(f"chunks must be a 1-D sequence of ints in [0, {self.num_chunks}), got {chunks!r}")
        arr = arr.astype(np.int64, copy=False)
        if arr.size and (arr.min() < 0 or arr.max() >= self.num_chunks):
            raise ValueError(f"chunks must be ints in [0, {self.num_chunks}), got {arr.tolist()}")
        if arr.size > 1 and np.unique(arr).size != arr.size:
            raise ValueError(f"chunks must be distinct, got {arr.tolist()}")
        return arr

    # -- queries -------------------------------------------------------------------------------------
    @property
    def free_chunks(self) -> int:
        return self.n_free

    def chunks_of(self, owner_id: int) -> np.ndarray:
        """The chunks ``owner_id`` holds, ascending."""
        with self.lock:
            self._check_open()
            return np.flatnonzero(self.owner == owner_id)

    def count_of(self, owner_id: int) -> int:
        with self.lock:
            self._check_open()
            return int(np.count_nonzero(self.owner == owner_id))

    # -- ownership changes (each takes the lock; hold it around a query to make both one step) -------
    def claim(self, chunks, owner_id: int) -> None:
        """Give the free ``chunks`` to ``owner_id``; RuntimeError (nothing changed) if one is not free."""
        with self.lock:
            self._check_open()
            chunks = self._check_chunks(chunks, owner_id)
            taken = self.owner[chunks] != FREE
            if taken.any():
                raise RuntimeError(f"chunks {chunks[taken].tolist()} are not free")
            self.owner[chunks] = owner_id
            self.n_free -= len(chunks)

    def give_back(self, chunks, owner_id: int) -> None:
        """Free ``chunks``; RuntimeError (nothing changed) if ``owner_id`` does not hold them all."""
        with self.lock:
            self._check_open()
            chunks = self._check_chunks(chunks, owner_id)
            other = self.owner[chunks] != owner_id
            if other.any():
                raise RuntimeError(f"chunks {chunks[other].tolist()} are not owned by {owner_id}")
            self.owner[chunks] = FREE
            self.n_free += len(chunks)

    def release_all(self, owner_id: int) -> int:
        """Free every chunk of ``owner_id``; returns how many."""
        with self.lock:
            self._check_open()
            if not is_int(owner_id) or owner_id < 0:
                raise ValueError(f"owner_id must be an int >= 0, got {owner_id!r}")
            mask = self.owner == owner_id
            self.owner[mask] = FREE
            n = int(mask.sum())
            self.n_free += n
            return n

    def stats(self) -> dict:
        with self.lock:
            self._check_open()
            free = self.n_free
        return {"device": str(self.device), "arena_bytes": self.num_bytes, "chunk_bytes": self.chunk_bytes,
                "chunks": self.num_chunks, "free_chunks": free, "free_bytes": free * self.chunk_bytes}

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Drop the buffer (idempotent); every later use raises ArenaClosedError."""
        with self.lock:
            self._closed = True
            self.buffer = None
