"""Sizing the device replay's arena: an allocator of exactly the requested blocks (one model) or of a byte
budget in whole chunks (several models sharing it), and the chunks a compaction could give back."""

from __future__ import annotations

import math

import torch

from .device_config import DeviceReplayConfig

__all__ = ["make_allocator", "reclaimable_chunks"]


def _chunk_blocks(capacity: int, block_bytes: int, target_bytes: int) -> int:
    """Blocks per arena chunk: the largest divisor ``k`` of ``capacity`` with ``k * block_bytes`` at most
    ``target_bytes`` (at least one block) and a multiple of 256, so the arena holds exactly ``capacity``
    blocks. 0 when no divisor gives a multiple of 256."""
    limit = max(1, target_bytes // block_bytes)
    best = 0
    i = 1
    while i * i <= capacity:
        if capacity % i == 0:
            for k in (i, capacity // i):
                if k <= limit and (k * block_bytes) % 256 == 0 and k > best:
                    best = k
        i += 1
    return best


def make_allocator(allocator_cls, specs: dict, capacity_blocks, budget_bytes, cfg: DeviceReplayConfig,
                   device: torch.device):
    """``(started allocator, chunk bytes)``: an arena of exactly ``capacity_blocks`` blocks of the one
    model, or of ``budget_bytes`` (whole chunks) shared by several."""
    from ..memory import DEFAULT_CHUNK_BYTES
    if capacity_blocks is not None:
        bb = next(iter(specs.values())).bytes_per_block
        if cfg.chunk_bytes is not None:
            chunk = cfg.chunk_bytes
            budget = -(-capacity_blocks * bb // chunk) * chunk
        else:
            k = _chunk_blocks(capacity_blocks, bb, DEFAULT_CHUNK_BYTES)
            if k == 0:  # odd block sizes: round the arena up to whole 256-byte-aligned chunks
                k = max(1, DEFAULT_CHUNK_BYTES // bb)
                while (k * bb) % 256:
                    k += 1
            chunk = k * bb
            budget = -(-capacity_blocks // k) * chunk
    else:
        chunk = cfg.chunk_bytes or DEFAULT_CHUNK_BYTES
        budget = max(chunk, budget_bytes // chunk * chunk)
    return allocator_cls(devices=[str(device)], budget_bytes=budget, chunk_bytes=chunk).start(), chunk


def reclaimable_chunks(stats: dict, chunk_bytes: int) -> int:
    """Chunks a compaction could give back: held chunks beyond those the live (used and cached) blocks
    need when packed (from a pool's ``stats()``)."""
    per_chunk = max(1.0, chunk_bytes / stats["block_bytes"])
    live = stats["used_blocks"] + stats["cached_blocks"]
    return stats["chunks_held"] - int(math.ceil(live / per_chunk))
