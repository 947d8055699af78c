"""Page-granular selection: ``<name>_page`` eviction variants and Quest (read-only page selection).

A page is ``page_size`` consecutive positions (the cache's block size): page ``j`` holds positions
``[j * page_size, (j + 1) * page_size)``, the last page possibly partial.
"""

from __future__ import annotations

import math

import torch

from ..checks import check_int
from .base import (TokenEvictionStrategy, kept_positions, make_token_strategy, register_token_strategy,
                   resolve_budget)


def page_scores(token_scores: torch.Tensor, page_size: int) -> torch.Tensor:
    """float64 ``[num_pages]``: the sum of ``token_scores`` ``[seq_len]`` over each page's tokens."""
    n = token_scores.shape[0]
    pages = -(-n // page_size)
    padded = token_scores.double().new_zeros(pages * page_size)
    padded[:n] = token_scores.double()
    return padded.view(pages, page_size).sum(1)


def pages_to_mask(pages: torch.Tensor, seq_len: int, page_size: int) -> torch.Tensor:
    """bool ``[seq_len]``: True on every position of the listed pages."""
    page_of = torch.arange(seq_len, device=pages.device) // page_size
    sel = torch.zeros(-(-seq_len // page_size), dtype=torch.bool, device=pages.device)
    sel[pages.long()] = True
    return sel[page_of]


def _top_pages(scores: torch.Tensor, n_pages: int, protected: torch.Tensor) -> torch.Tensor:
    """int64 sorted page ids: ``protected`` plus the best-scoring others, ``n_pages`` in all (ties to
    the earlier page); never fewer than the protected pages."""
    keep = protected.clone()
    rest = n_pages - int(keep.sum())
    if rest > 0:
        cand = torch.nonzero(~protected).flatten()
        s = scores[cand]
        s = torch.where(torch.isnan(s), torch.full_like(s, -math.inf), s)
        keep[cand[torch.sort(s, descending=True, stable=True).indices[:rest]]] = True
    return kept_positions(keep)


class PageEviction(TokenEvictionStrategy):
    """``<name>_page``: the scorer ``base`` ranks whole pages by the SUM of their tokens' scores and keeps
    whole pages, so dropped pages go back to the pool without compaction. The pages holding a sink or a
    window token, and the last page (where new tokens go), are always kept. The budget in tokens is
    rounded UP to whole pages (``ceil(n_keep / page_size)`` pages, never fewer than the protected ones),
    so up to ``page_size - 1`` tokens more than the budget may stay.
    """

    def __init__(self, base: TokenEvictionStrategy, page_size: int = 16):
        super().__init__(sink=base.sink, window=base.window)
        self.base = base
        self.page_size = check_int("page_size", page_size, 1)
        self.name = f"{base.name}_page"
        self.needs = base.needs

    def token_scores(self, seq_len: int, **inputs) -> torch.Tensor:
        return self.base.token_scores(seq_len, **inputs)

    def _check_inputs(self, inputs: dict) -> None:
        self.base._check_inputs(inputs)

    def select_pages(self, seq_len: int, budget, **inputs) -> torch.Tensor:
        """int64 sorted ids of the pages to keep (logical pages of the sequence's block table)."""
        self._check_inputs(inputs)
        n_keep = resolve_budget(budget, seq_len, self.sink, self.window)
        num_pages = -(-seq_len // self.page_size)
        scores = page_scores(self.token_scores(seq_len, **inputs), self.page_size)
        protected = torch.zeros(num_pages, dtype=torch.bool)
        if num_pages:
            pos = torch.arange(seq_len)
            tok = (pos < self.sink) | (pos >= seq_len - self.window)
            protected[(pos[tok] // self.page_size)] = True
            protected[-1] = True
        return _top_pages(scores.cpu(), -(-n_keep // self.page_size), protected)

    def select(self, seq_len: int, budget, **inputs) -> torch.Tensor:
        """Keep mask bool ``[seq_len]``, True on whole pages only."""
        return pages_to_mask(self.select_pages(seq_len, budget, **inputs), seq_len, self.page_size)

    def __repr__(self) -> str:
        return f"PageEviction({self.base!r}, page_size={self.page_size})"


def _page_factory(base_name: str):
    def factory(page_size: int = 16, **kwargs) -> PageEviction:
        return PageEviction(make_token_strategy(base_name, **kwargs), page_size=page_size)
    factory.__name__ = f"make_{base_name}_page"
    return factory


for _name in ("streaming_llm", "h2o", "snapkv", "tova", "key_norm"):
    register_token_strategy(f"{_name}_page")(_page_factory(_name))


def page_key_minmax(keys: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest's page metadata: elementwise min and max over each page's keys.

    keys ``[seq_len, num_kv_heads, head_dim]`` -> ``(key_min, key_max)``, each float32
    ``[num_pages, num_kv_heads, head_dim]`` (a partial last page over its real tokens only)."""
    page_size = check_int("page_size", page_size, 1)
    n, h, d = keys.shape
    pages = -(-n // page_size)
    k = keys.float()
    lo = k.new_full((pages * page_size, h, d), math.inf)
    hi = k.new_full((pages * page_size, h, d), -math.inf)
    lo[:n], hi[:n] = k, k
    return lo.view(pages, page_size, h, d).amin(1), hi.view(pages, page_size, h, d).amax(1)


def quest_bound(query: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor) -> torch.Tensor:
    """Upper bound of ``q . k`` over each page: ``sum_d max(q_d * min_d, q_d * max_d)``.

    query ``[num_q_heads, head_dim]``; key_min/key_max ``[num_pages, num_kv_heads, head_dim]`` with
    ``num_q_heads`` a multiple of ``num_kv_heads`` (GQA: query head ``i`` reads KV head
    ``i // (num_q_heads // num_kv_heads)``). Returns float32 ``[num_q_heads, num_pages]``."""
    hq, hkv = query.shape[0], key_min.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of the KV heads ({hkv})")
    g = hq // hkv
    q = query.float().view(hkv, g, 1, -1)                                 # [hkv, g, 1, d]
    lo = key_min.float().permute(1, 0, 2)[:, None]                          # [hkv, 1, pages, d]
    hi = key_max.float().permute(1, 0, 2)[:, None]
    return torch.maximum(q * lo, q * hi).sum(-1).reshape(hq, -1)


@register_token_strategy("quest")
class Quest(TokenEvictionStrategy):
    """Quest (Tang et al. 2024): query-aware selection of the pages to READ for the current decode step.
    It EVICTS NOTHING: every page stays cached; ``select_pages`` returns the pages attention should read
    (the top pages by ``quest_bound`` reduced over query heads by max, plus the last page), and
    ``select`` the matching READ mask bool ``[seq_len]`` (not a keep mask for ``compact_tokens``).

    Inputs: ``page_minmax=(key_min, key_max)`` from ``page_key_minmax`` and ``query`` ``[num_q_heads,
    head_dim]``. The budget (tokens or fraction) is rounded up to whole pages.
    """

    needs = ("page_minmax", "query")
    evicts = False

    def __init__(self, page_size: int = 16):
        super().__init__(sink=0, window=0)
        self.page_size = check_int("page_size", page_size, 1)

    def token_scores(self, seq_len: int, **inputs) -> torch.Tensor:
        raise NotImplementedError("quest scores pages, not tokens: use select_pages")

    def page_bounds(self, page_minmax, query) -> torch.Tensor:
        """float32 ``[num_pages]``: the bound reduced over query heads by max."""
        key_min, key_max = page_minmax
        return quest_bound(query, key_min, key_max).amax(0)

    def select_pages(self, seq_len: int, budget, **inputs) -> torch.Tensor:
        """int64 sorted ids of the pages to read this step."""
        self._check_inputs(inputs)
        n_keep = resolve_budget(budget, seq_len)
        num_pages = -(-seq_len // self.page_size)
        bounds = self.page_bounds(inputs["page_minmax"], inputs["query"]).cpu()
        if bounds.shape[0] != num_pages:
            raise ValueError(f"page_minmax covers {bounds.shape[0]} pages, seq_len {seq_len} needs {num_pages}")
        protected = torch.zeros(num_pages, dtype=torch.bool)
        if num_pages:
            protected[-1] = True
        return _top_pages(bounds, -(-n_keep // self.page_size), protected)

    def select(self, seq_len: int, budget, **inputs) -> torch.Tensor:
        """READ mask bool ``[seq_len]`` of the pages to attend to (nothing is evicted)."""
        return pages_to_mask(self.select_pages(seq_len, budget, **inputs), seq_len, self.page_size)
