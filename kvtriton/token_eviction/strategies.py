"""Token scorers: StreamingLLM, H2O, SnapKV, TOVA and key norm (one sequence, heads aggregated).

Inputs (keyword arguments of ``select``, named by each class's ``needs``):

- ``attention_window``: float ``[num_heads, w, seq_len]``, attention probabilities of the last ``w``
  queries of the prompt over all ``seq_len`` keys (causal: zeros above the diagonal).
- ``decode_attention`` (``H2O.update``): float ``[num_heads, n]`` (one query) or ``[num_heads, q, n]``.
- ``last_query``: float ``[num_heads, seq_len]``, attention probabilities of the newest query.
- ``keys``: ``[seq_len, num_kv_heads, head_dim]``, the cached (post-RoPE) keys.

``num_heads`` may be query heads or KV heads: every scorer reduces over it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_int
from .base import TokenEvictionStrategy, register_token_strategy


def _check_scores(name: str, t, ndim: int, seq_len: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.ndim != ndim or t.shape[-1] != seq_len:
        shape = ["num_heads", "w", "seq_len"][3 - ndim:] if ndim <= 3 else "?"
        raise ValueError(f"{name} must be a tensor of shape [{', '.join(shape)}] with seq_len = {seq_len}, "
                         f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    return t.double()


def _reduce_heads(x: torch.Tensor, how: str) -> torch.Tensor:
    return x.mean(0) if how == "mean" else x.amax(0)


def _check_reduce(name: str, how: str, allowed=("mean", "max")) -> str:
    if how not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {how!r}")
    return how


@register_token_strategy("streaming_llm", "streamingllm", "sink")
class StreamingLLM(TokenEvictionStrategy):
    """Attention sinks + recent window (Xiao et al. 2023): the first ``sink`` tokens and the most recent
    ``budget - sink`` ones. Needs no scores."""

    needs = ()

    def __init__(self, sink: int = 4):
        super().__init__(sink=sink, window=0)

    def token_scores(self, seq_len: int) -> torch.Tensor:
        return torch.arange(seq_len, dtype=torch.float64)        # later = more recent = kept first


@register_token_strategy("h2o", "heavy_hitter")
class H2O(TokenEvictionStrategy):
    """Heavy hitters (Zhang et al. 2023): each token's attention received, accumulated over the queries
    seen so far (summed over queries, averaged over heads), plus the ``window`` most recent tokens.

    Stateful, one object per sequence and layer: ``update(attn)`` after each step; ``select`` ranks by
    the accumulated scores; after evicting, ``apply_keep(keep)`` drops the evicted tokens' scores so the
    state lines up with the compacted cache. ``select`` also takes ``decode_attention=attn``: the same as
    ``update(attn)`` before selecting.
    """

    needs = ("decode_attention",)

    def __init__(self, sink: int = 0, window: int = 32):
        super().__init__(sink=sink, window=window)
        self.scores = torch.zeros(0, dtype=torch.float64)

    def update(self, attn: torch.Tensor) -> None:
        """Add ``attn`` float ``[num_heads, n]`` or ``[num_heads, q, n]`` (probabilities over the ``n``
        cached tokens, ``n`` >= the tokens seen before; new tokens start at 0)."""
        if not isinstance(attn, torch.Tensor) or attn.ndim not in (2, 3):
            raise ValueError(f"attn must be a tensor [num_heads, n] or [num_heads, q, n], got {attn!r}")
        a = attn.double()
        if a.ndim == 3:
            a = a.sum(1)
        a = a.mean(0).cpu()
        n = a.shape[0]
        if n < self.scores.shape[0]:
            raise ValueError(f"attn covers {n} tokens, fewer than the {self.scores.shape[0]} already tracked")
        self.scores = torch.cat([self.scores, self.scores.new_zeros(n - self.scores.shape[0])]) + a

    def apply_keep(self, keep: torch.Tensor) -> None:
        """Keep only the accumulated scores of tokens kept by ``keep`` bool ``[n]`` (after eviction)."""
        if keep.shape != self.scores.shape:
            raise ValueError(f"keep must have shape {tuple(self.scores.shape)}, got {tuple(keep.shape)}")
        self.scores = self.scores[keep.cpu().bool()]

    def reset(self) -> None:
        self.scores = torch.zeros(0, dtype=torch.float64)

    def _check_inputs(self, inputs: dict) -> None:       # decode_attention is optional here
        extra = sorted(set(inputs) - {"decode_attention"})
        if extra:
            raise ValueError(f"h2o takes only decode_attention (optional), unexpected {extra}")

    def token_scores(self, seq_len: int, decode_attention=None) -> torch.Tensor:
        if decode_attention is not None:
            self.update(decode_attention)
        if self.scores.shape[0] != seq_len:
            raise ValueError(f"h2o tracks {self.scores.shape[0]} tokens but seq_len is {seq_len}; call update() "
                             f"with attention over every cached token")
        return self.scores.clone()


@register_token_strategy("snapkv")
class SnapKV(TokenEvictionStrategy):
    """SnapKV (Li et al. 2024), at the end of prefill: each prefix token's attention from the observation
    window (the last ``w`` queries, summed over them), pooled over positions with a 1-D ``pool`` ("max" or
    "avg", odd ``kernel_size``, zero padding counted in the average), reduced over heads (``head_reduce``
    "mean" or "max"), plus the ``window`` most recent tokens (the observation window itself; pass
    ``window = w``). The pooling runs over the prefix ``[0, seq_len - window)`` only, as in the paper.
    """

    needs = ("attention_window",)

    def __init__(self, sink: int = 0, window: int = 32, kernel_size: int = 7, pool: str = "max",
                 head_reduce: str = "mean"):
        super().__init__(sink=sink, window=window)
        self.kernel_size = check_int("kernel_size", kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd int >= 1, got {kernel_size!r}")
        self.pool = _check_reduce("pool", pool, ("max", "avg"))
        self.head_reduce = _check_reduce("head_reduce", head_reduce)

    def token_scores(self, seq_len: int, attention_window=None) -> torch.Tensor:
        a = _check_scores("attention_window", attention_window, 3, seq_len).sum(1)   # [heads, seq_len]
        prefix = max(seq_len - self.window, 0)
        out = a.new_zeros(a.shape)
        if prefix and self.kernel_size > 1:
            p, k = a[None, :, :prefix], self.kernel_size
            pooled = (F.max_pool1d(p, k, 1, k // 2) if self.pool == "max"
                      else F.avg_pool1d(p, k, 1, k // 2, count_include_pad=True))
            out[:, :prefix] = pooled[0]
        else:
            out[:, :prefix] = a[:, :prefix]
        return _reduce_heads(out, self.head_reduce)


@register_token_strategy("tova")
class TOVA(TokenEvictionStrategy):
    """TOVA (Oren et al. 2024): keep the tokens the newest query attends to most, its attention averaged
    over heads. By default no sink or window (the paper's rule)."""

    needs = ("last_query",)

    def token_scores(self, seq_len: int, last_query=None) -> torch.Tensor:
        return _check_scores("last_query", last_query, 2, seq_len).mean(0)


@register_token_strategy("key_norm", "l2_norm", "knorm")
class KeyNorm(TokenEvictionStrategy):
    """Key-norm eviction (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
    Compression"): keep the tokens whose keys have the LOWEST L2 norm (averaged over KV heads); low-norm
    keys draw high attention. Needs no attention, so it works with fused attention kernels."""

    needs = ("keys",)

    def token_scores(self, seq_len: int, keys=None) -> torch.Tensor:
        if not isinstance(keys, torch.Tensor) or keys.ndim != 3 or keys.shape[0] != seq_len:
            raise ValueError(f"keys must be a tensor [seq_len, num_kv_heads, head_dim] with seq_len = {seq_len}, "
                             f"got {tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__}")
        return -torch.linalg.vector_norm(keys.double(), dim=-1).mean(-1)
