"""kvtriton: paged KV-cache management for LLM inference on GPUs."""

from .errors import CacheReleasedError, KVTritonError, PoolExhaustedError
from .spec import PRESETS, ModelSpec, get_spec

__version__ = "0.1.0"

__all__ = ["ModelSpec", "PRESETS", "get_spec", "PoolExhaustedError", "CacheReleasedError",
           "KVTritonError", "__version__"]
