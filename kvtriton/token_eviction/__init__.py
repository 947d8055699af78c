"""Token-level KV eviction strategies: which tokens of a sequence stay in the paged cache.

Torch only and not imported by ``kvtriton``: ``import kvtriton.token_eviction``. Every strategy is
chosen by name with ``make_token_strategy`` and returns a keep mask bool ``[seq_len]`` over original
positions for ``ops.compact_tokens`` (one sequence, shared by its KV heads); see ``base`` for budgets
and positions.

Names: streaming_llm, h2o, snapkv, tova, key_norm, their page-granular ``<name>_page`` variants, and
quest (selects pages to READ, evicts nothing). ``pyramid_budgets`` / ``select_per_layer`` split a total
budget across layers, PyramidKV-style, on top of any of them.
"""

from .base import (NEEDS, TokenEvictionStrategy, available_token_strategies, canonical_token_strategy, keep_top,
                   kept_positions, make_token_strategy, protected_mask, register_token_strategy, resolve_budget)
from .budgets import pyramid_budgets, select_per_layer
from .pages import PageEviction, Quest, page_key_minmax, page_scores, pages_to_mask, quest_bound
from .strategies import H2O, TOVA, KeyNorm, SnapKV, StreamingLLM

__all__ = [
    "NEEDS", "TokenEvictionStrategy", "available_token_strategies", "canonical_token_strategy", "keep_top",
    "kept_positions", "make_token_strategy", "protected_mask", "register_token_strategy", "resolve_budget",
    "pyramid_budgets", "select_per_layer", "PageEviction", "Quest", "page_key_minmax", "page_scores",
    "pages_to_mask", "quest_bound", "H2O", "TOVA", "KeyNorm", "SnapKV", "StreamingLLM",
]
