"""The memory manager: device arenas cut into chunks, per-model block pools with prefix caching and
eviction policies, per-sequence caches, and the allocator that owns them."""

from .allocator import GPUMemoryAllocator
from .arena import DEFAULT_CHUNK_BYTES, Arena
from .cache import VirtualKVCache
from .hashing import ROOT_HASH, block_hashes_from_tokens, expand_hash_ids, hash_block_tokens
from .pool import CachePool

__all__ = ["GPUMemoryAllocator", "Arena", "CachePool", "VirtualKVCache", "DEFAULT_CHUNK_BYTES",
           "ROOT_HASH", "block_hashes_from_tokens", "expand_hash_ids", "hash_block_tokens"]
