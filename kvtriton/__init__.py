"""kvtriton: paged KV-cache management for LLM inference on GPUs."""

__version__ = "0.1.0"

from .errors import (AllocatorClosedError, ArenaClosedError, CacheReleasedError, ClosedError,  # noqa: E402
                     KVTritonError, PoolClosedError, PoolExhaustedError)
from .spec import PRESETS, ModelSpec, get_spec  # noqa: E402
from .memory import (CachePool, GPUMemoryAllocator, VirtualKVCache,  # noqa: E402
                     block_hashes_from_tokens, expand_hash_ids)

__all__ = ["ModelSpec", "PRESETS", "get_spec", "PoolExhaustedError", "CacheReleasedError", "ClosedError",
           "PoolClosedError", "ArenaClosedError", "AllocatorClosedError",
           "KVTritonError", "GPUMemoryAllocator", "CachePool", "VirtualKVCache",
           "block_hashes_from_tokens", "expand_hash_ids", "__version__"]
