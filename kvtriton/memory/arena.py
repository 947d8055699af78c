"""One device allocation cut into fixed-size chunks that pools borrow and give back.

The arena is a single ``uint8`` tensor; a chunk is a byte range ``[c * chunk_bytes, (c+1) *
chunk_bytes)``. The arena only keeps the ownership table; what lives inside a chunk is the owning
pool's business. Its lock is a leaf: nothing is called back while it is held.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

FREE = -1
DEFAULT_CHUNK_BYTES = 2 << 20


def parse_device(device) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a torch.device; ValueError naming the valid forms."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but no CUDA device is available")
        idx = torch.cuda.current_device() if dev.index is None else dev.index
        if not 0 <= idx < torch.cuda.device_count():
            raise ValueError(f"device index must be in [0, {torch.cuda.device_count()}), got {device!r}")
        dev = torch.device("cuda", idx)
    return dev


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
        if not isinstance(chunk_bytes, int) or chunk_bytes < 1 or chunk_bytes % 256:
            raise ValueError(f"chunk_bytes must be a positive multiple of 256, got {chunk_bytes!r}")
        if budget_bytes is not None and memory_fraction is not None:
            raise ValueError("give budget_bytes or memory_fraction, not both")
        free = device_free_bytes(self.device)
        if budget_bytes is None:
            frac = 0.9 if memory_fraction is None else memory_fraction
            if not isinstance(frac, (int, float)) or not 0.0 < frac <= 1.0:
                raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction!r}")
            budget_bytes = int(free * frac)
        elif not isinstance(budget_bytes, int) or isinstance(budget_bytes, bool) or budget_bytes < chunk_bytes:
            raise ValueError(f"budget_bytes must be an int >= chunk_bytes ({chunk_bytes}), got {budget_bytes!r}")
        elif budget_bytes > free:
            raise ValueError(f"budget_bytes={budget_bytes} exceeds the free memory of {self.device}; "
                             f"the maximum is {free}")
        self.chunk_bytes = chunk_bytes
        self.num_chunks = budget_bytes // chunk_bytes
        if self.num_chunks < 1:
            raise ValueError(f"budget of {budget_bytes} bytes holds no chunk of {chunk_bytes} bytes")
        self.num_bytes = self.num_chunks * chunk_bytes
        self.buffer = torch.empty(self.num_bytes, dtype=torch.uint8, device=self.device)
        self.owner = np.full(self.num_chunks, FREE, dtype=np.int64)
        self.n_free = self.num_chunks  # kept equal to (owner == FREE).sum() by every change
        self.lock = threading.Lock()

    # -- queries (callers hold ``lock`` when they need a consistent view) ----------------------------
    @property
    def free_chunks(self) -> int:
        return self.n_free

    def chunks_of(self, owner_id: int) -> np.ndarray:
        return np.flatnonzero(self.owner == owner_id)

    # -- ownership changes (caller holds ``lock``) -------------------------------------------------
    def claim(self, chunks, owner_id: int) -> None:
        chunks = np.asarray(chunks, dtype=np.int64)
        if (self.owner[chunks] != FREE).any():
            raise RuntimeError(f"chunks {chunks[self.owner[chunks] != FREE].tolist()} are not free")
        self.owner[chunks] = owner_id
        self.n_free -= len(chunks)

    def give_back(self, chunks, owner_id: int) -> None:
        chunks = np.asarray(chunks, dtype=np.int64)
        if (self.owner[chunks] != owner_id).any():
            raise RuntimeError(f"chunks {chunks[self.owner[chunks] != owner_id].tolist()} are not owned "
                               f"by {owner_id}")
        self.owner[chunks] = FREE
        self.n_free += len(chunks)

    def release_all(self, owner_id: int) -> int:
        mask = self.owner == owner_id
        self.owner[mask] = FREE
        n = int(mask.sum())
        self.n_free += n
        return n

    def stats(self) -> dict:
        with self.lock:
            free = self.free_chunks
        return {"device": str(self.device), "arena_bytes": self.num_bytes, "chunk_bytes": self.chunk_bytes,
                "chunks": self.num_chunks, "free_chunks": free, "free_bytes": free * self.chunk_bytes}

    def close(self) -> None:
        self.buffer = None
