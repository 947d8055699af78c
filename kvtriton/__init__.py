"""kvtriton: paged KV-cache management for LLM inference on GPUs."""

__version__ = "0.1.0"

from .errors import CacheReleasedError, KVTritonError, PoolExhaustedError  # noqa: E402
from .spec import PRESETS, ModelSpec, get_spec  # noqa: E402
from .memory import (BlockPool, CachePool, GPUMemoryAllocator, VirtualKVCache,  # noqa: E402
                     block_hashes_from_tokens, expand_hash_ids)

__all__ = ["ModelSpec", "PRESETS", "get_spec", "PoolExhaustedError", "CacheReleasedError",
           "KVTritonError", "GPUMemoryAllocator", "CachePool", "BlockPool", "VirtualKVCache",
           "block_hashes_from_tokens", "expand_hash_ids", "__version__"]
