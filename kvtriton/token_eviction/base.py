"""The token-eviction interface, budgets and the registry.

A strategy chooses which tokens of ONE sequence stay in the KV cache. The choice is shared by all KV
heads of a layer (heads are aggregated by mean, or max where said, as the papers do), so the result
fits ``ops.compact_tokens``: a keep mask bool ``[seq_len]`` over the sequence's ORIGINAL positions.
``kept_positions(keep)`` gives the kept positions in increasing order, the order ``compact_tokens``
packs them in.

Positions. Keys are cached after RoPE, so a kept key keeps the position it was encoded at; after
compaction the cache is shorter than the sequence, and new tokens must continue at the ORIGINAL
position counter (``seq_len`` before eviction, plus the tokens generated since), not at the compacted
length.

Budgets: a float in (0, 1] is a fraction of ``seq_len`` (rounded up; 1.0 keeps everything); an int is a
token count (>= 1; counts past ``seq_len`` keep everything). See ``resolve_budget``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..checks import check_int, check_number, is_int, is_number
from ..registry import Registry

# Every input a strategy may need (``query`` is the current decode query, used with ``page_minmax``).
NEEDS = ("attention_window", "decode_attention", "last_query", "keys", "page_minmax", "query")

_STRATEGIES = Registry("token strategy", "strategies")


def resolve_budget(budget, seq_len: int, sink: int = 0, window: int = 0) -> int:
    """The number of tokens to keep out of ``seq_len``: ``budget`` a fraction in (0, 1] (rounded up) or
    an int token count >= 1 (capped at ``seq_len``). ValueError when the budget is outside those
    ranges or keeps fewer tokens than the ``sink + window`` tokens that are always kept (or fewer than
    ``seq_len``, when the sequence is shorter than that)."""
    seq_len = check_int("seq_len", seq_len, 0)
    sink = check_int("sink", sink, 0)
    window = check_int("window", window, 0)
    if is_int(budget):
        n = check_int("budget", budget, 1, allowed="a fraction in (0, 1] or an int token count >= 1")
    elif is_number(budget):
        f = check_number("budget", budget, 0.0, 1.0, allowed="a fraction in (0, 1] or an int token count >= 1")
        if f <= 0.0:
            raise ValueError(f"budget must be a fraction in (0, 1] or an int token count >= 1, got {budget!r}")
        n = math.ceil(f * seq_len - 1e-9)
    else:
        raise ValueError(f"budget must be a fraction in (0, 1] or an int token count >= 1, got {budget!r}")
    n = min(n, seq_len)
    floor = min(sink + window, seq_len)
    if n < floor:
        raise ValueError(f"budget {budget!r} keeps {n} of {seq_len} tokens, fewer than the sink + window = "
                         f"{sink} + {window} tokens always kept; budget must keep at least {floor}")
    return n


def protected_mask(seq_len: int, sink: int, window: int, device=None) -> torch.Tensor:
    """bool ``[seq_len]``: the first ``sink`` and the last ``window`` positions."""
    keep = torch.zeros(seq_len, dtype=torch.bool, device=device)
    keep[:min(sink, seq_len)] = True
    if window:
        keep[max(seq_len - window, 0):] = True
    return keep


def keep_top(scores: torch.Tensor, n_keep: int, protected: torch.Tensor) -> torch.Tensor:
    """bool mask: ``protected`` plus the highest-scoring other positions, ``n_keep`` in all (ties go to
    the earlier position; NaN scores rank last)."""
    keep = protected.clone()
    rest = n_keep - int(keep.sum())
    if rest <= 0:
        return keep
    cand = torch.nonzero(~protected).flatten()
    s = scores[cand].double()
    s = torch.where(torch.isnan(s), torch.full_like(s, -math.inf), s)
    order = torch.sort(s, descending=True, stable=True).indices[:rest]
    keep[cand[order]] = True
    return keep


def kept_positions(keep: torch.Tensor) -> torch.Tensor:
    """int64 ``[n_kept]``: the positions where ``keep`` (bool ``[seq_len]``) is True, increasing."""
    return torch.nonzero(keep).flatten()


class TokenEvictionStrategy(ABC):
    """Base class: ``sink`` leading tokens and the ``window`` most recent ones are always kept; the rest
    of the budget goes to the tokens with the highest ``token_scores``.

    ``needs`` names the inputs ``select`` takes as keyword arguments (shapes in each class's doc).
    """

    name: ClassVar[str] = "base"
    needs: ClassVar[tuple[str, ...]] = ()
    evicts: ClassVar[bool] = True   # False for read-only page selectors (Quest)

    def __init__(self, sink: int = 0, window: int = 0):
        self.sink = check_int("sink", sink, 0)
        self.window = check_int("window", window, 0)

    @abstractmethod
    def token_scores(self, seq_len: int, **inputs) -> torch.Tensor:
        """float ``[seq_len]``: higher = more worth keeping (protected positions are kept anyway)."""

    def _check_inputs(self, inputs: dict) -> None:
        missing = [n for n in self.needs if inputs.get(n) is None]
        extra = sorted(set(inputs) - set(self.needs))
        if missing or extra:
            raise ValueError(f"{self.name} needs inputs {list(self.needs)}; missing {missing}, unexpected {extra}")

    def select(self, seq_len: int, budget, **inputs) -> torch.Tensor:
        """Keep mask bool ``[seq_len]`` over original positions for one sequence (shared by all its KV
        heads), keeping ``resolve_budget(budget, seq_len, sink, window)`` tokens."""
        self._check_inputs(inputs)
        n_keep = resolve_budget(budget, seq_len, self.sink, self.window)
        scores = self.token_scores(seq_len, **inputs)
        if scores.shape != (seq_len,):
            raise ValueError(f"{self.name}: scores must have shape [{seq_len}], got {tuple(scores.shape)}")
        return keep_top(scores, n_keep, protected_mask(seq_len, self.sink, self.window, scores.device))

    def select_positions(self, seq_len: int, budget, **inputs) -> torch.Tensor:
        """``kept_positions(select(...))``: int64 kept original positions, increasing."""
        return kept_positions(self.select(seq_len, budget, **inputs))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sink={self.sink}, window={self.window})"


def register_token_strategy(name: str, *aliases: str):
    """Decorator for a strategy class or factory: ``make_token_strategy(name)`` builds it."""
    return _STRATEGIES.register(name, *aliases)


def available_token_strategies(include_aliases: bool = False) -> list[str]:
    return _STRATEGIES.names(include_aliases)


def canonical_token_strategy(name: str) -> str:
    """The registered (lower-case) name for ``name`` or an alias; ValueError listing the valid names."""
    return _STRATEGIES.canonical(name)


def make_token_strategy(name: str, **kwargs) -> TokenEvictionStrategy:
    """Instantiate a registered strategy by name or alias (``kwargs`` go to its constructor)."""
    return _STRATEGIES.make(name, **kwargs)
