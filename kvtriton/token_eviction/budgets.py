"""PyramidKV-style per-layer budgets (Cai et al. 2024): lower layers attend broadly and get more of the
budget, deeper layers less. Works on top of any scorer: split the total, then ``select`` per layer."""

from __future__ import annotations

import math

import torch

from ..checks import check_int, check_number, is_int
from .base import TokenEvictionStrategy


def pyramid_budgets(total: int, num_layers: int, beta: float = 20.0) -> list[int]:
    """Split ``total`` tokens (an int >= ``num_layers``) across ``num_layers`` layers as PyramidKV does:
    an arithmetic sequence from ``2 * total / L - total / (L * beta)`` at layer 0 down to
    ``total / (L * beta)`` at the last layer (``beta`` >= 1; 1 = uniform). Integers, non-increasing with
    depth, each >= 1, summing exactly to ``total`` (the rounding remainder goes to the lowest layers)."""
    num_layers = check_int("num_layers", num_layers, 1)
    total = check_int("total", total, num_layers)
    beta = check_number("beta", beta, 1.0)
    L = num_layers
    last = total / (L * beta)
    first = 2 * total / L - last
    step = (first - last) / (L - 1) if L > 1 else 0.0
    ideal = [first - i * step for i in range(L)]
    out = [max(1, math.floor(x)) for x in ideal]
    i = 0
    while sum(out) < total:                  # floors lost < L tokens: give them back to the lowest layers
        out[i % L] += 1
        i += 1
    while sum(out) > total:                  # the max(1, .) floor overshot: take from the largest layers
        j = max(range(L), key=lambda k: (out[k], -k))
        out[j] -= 1
    return sorted(out, reverse=True)


def select_per_layer(strategy: TokenEvictionStrategy, layer_inputs: list[dict], seq_len: int, total_budget,
                     beta: float = 20.0) -> list[torch.Tensor]:
    """Keep masks bool ``[seq_len]``, one per layer, with ``pyramid_budgets`` over the layers.

    ``layer_inputs[l]`` holds layer ``l``'s inputs for ``strategy.select``; ``total_budget`` is a
    fraction in (0, 1] of ``seq_len * num_layers`` or an int token count over all layers. A layer's
    budget never drops below the strategy's ``sink + window`` (capped at ``seq_len``); raising it there
    is taken from no other layer, so the total may then be exceeded."""
    num_layers = len(layer_inputs)
    if is_int(total_budget):
        total = check_int("total_budget", total_budget, num_layers)
    else:
        f = check_number("total_budget", total_budget, 0.0, 1.0,
                         allowed="a fraction in (0, 1] or an int token count >= the number of layers")
        total = max(num_layers, math.ceil(f * seq_len * num_layers - 1e-9))
    floor = min(strategy.sink + strategy.window, seq_len)
    budgets = [min(seq_len, max(b, floor, 1)) for b in pyramid_budgets(total, num_layers, beta)]
    return [strategy.select(seq_len, b, **inp) for b, inp in zip(budgets, layer_inputs)]
