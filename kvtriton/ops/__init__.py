"""Paged KV-cache ops (Triton kernels with plain-PyTorch references), in vLLM/FlashInfer conventions.

Public names and argument order are a stable contract; see each function's docstring for shapes.
"""

from ._backend import backend, debug_checks, use_triton
from .append import append_kv
from .attention import paged_decode_attention
from .batch_attention import PagedAttentionPlan
from .compact import compact_tokens
from .gather import gather_blocks, gather_kv, scatter_blocks
from .move import copy_blocks, move_blocks
from .prefill import paged_prefill_attention
from .scores import paged_attention_scores

__all__ = [
    "append_kv", "gather_kv", "gather_blocks", "scatter_blocks", "move_blocks", "copy_blocks",
    "compact_tokens", "paged_decode_attention", "paged_prefill_attention", "paged_attention_scores",
    "PagedAttentionPlan", "backend", "debug_checks", "use_triton",
]
