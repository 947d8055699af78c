"""PREFIX_AWARE: recency plus remembered reuse, priced when a request releases its blocks; dead tails first;
the worth of a reference against age learned online by shadow caches."""

from __future__ import annotations

from ..checks import check_int, check_number, is_number
from ._refage import RefAgePolicy
from ._util import check_capacity
from .base import register_policy
from .prefix_replay import PrefixCacheReplay



@register_policy("prefix_aware")
class PrefixAwarePolicy(RefAgePolicy):
    """A policy for prefix caches of LLM serving; O(log n).

    A block's priority (lowest evicted first) is ``A + r``: ``A`` is the cache's age, which grows by
    ``beta / C`` at every eviction (``C`` the capacity), so that one more reference is worth ``1 / beta``
    cache turnovers of age, and ``r`` is the number of requests that have referenced the block,
    *including before it was last evicted*: a bounded history of ``history`` evicted keys (by default
    8 x capacity, at least 131,072) remembers their counts. What a generic cache does not know and this
    policy uses:

    - the priority is set when the block is *released* (its request completes), not when it is hit;
    - the last block of a request whose prompt does not fill it (``input_length`` not a multiple of
      ``block_tokens``) is evicted before any other: a follow-up turn extends the prompt, which changes
      that block's hash, so it is almost never reused (about 1% on the Mooncake conversation trace,
      against 37% for the other blocks);
    - a block's count survives its eviction: a conversation whose prefix fell out and came back keeps
      the standing of its earlier turns;
    - ties go to the block released first, and the replay releases a request's blocks last-first, so
      among equals a request's tail goes before its head and cached prefixes stay whole.

    How much a reference is worth against age depends on the workload and on the cache size (on the
    Mooncake conversation trace the best ``beta`` is 0.25-0.5 at 1,000-3,000 blocks and 2-4 from 10,000
    up; on the synthetic trace it is 4 from 1,000 to 10,000). With ``beta=None`` (the default) and a
    ``capacity``, the policy learns it online: it replays each request's blocks through one small
    fixed-``beta`` shadow cache per value in ``betas`` (prefix hits, immediate release; keys only, no
    data), scores each by its prefix hits with an exponential decay of half-life ``half_life`` requests,
    and every ``every`` requests takes the ``beta`` of the best-scoring shadow (the current one on a tie).
    A change of ``beta`` changes how fast the age grows from then on, never the priorities already
    given, so no block jumps the queue. This costs one shadow replay per candidate (about
    ``len(betas) + 1`` times the work of a fixed ``beta``) and ``len(betas)`` times the key memory.
    With a number for ``beta``, or without ``capacity``, or without ``on_request`` calls, ``beta`` is
    fixed (2.0 when not given).

    The request context comes from ``on_request`` (the replay engines call it); without it no block is
    known dead. ``C`` is ``capacity``, or without it the largest number of resident keys seen so far.
    """

    def __init__(self, capacity: int | None = None, beta: float | None = None, history: int | None = None,
                 betas=(0.5, 2.0, 4.0), half_life: float = 500.0, every: int = 50):
        self._capacity = check_capacity(capacity)
        check_number("beta", beta, positive=True, allow_none=True,
                     allowed="a positive number or None (learned online)")
        check_int("history", history, 0, allow_none=True,
                  allowed="a non-negative int or None (8 x capacity, at least 131072)")
        try:
            betas = tuple(betas)
        except TypeError:
            raise ValueError(f"betas must be a non-empty sequence of positive numbers, got {betas!r}") from None
        if not betas or not all(is_number(b) and b > 0 for b in betas):
            raise ValueError(f"betas must be a non-empty sequence of positive numbers, got {betas!r}")
        check_number("half_life", half_life, positive=True, allowed="a positive number of requests")
        check_int("every", every, 1, allowed="a positive int (requests between choices)")
        super().__init__(history)
        adaptive = beta is None and self._capacity is not None
        if beta is None:
            beta = 2.0 if 2.0 in betas or not adaptive else betas[len(betas) // 2]
        self.beta = float(beta)
        # Known once and for all when the capacity or the history is given (0: recompute each time).
        self._fixed_limit = (history if history is not None else
                             max(8 * self._capacity, 1 << 17) if self._capacity is not None else 0)
        self._dead = None
        # The age is _age0 + beta * (evictions - _ev0) / C: piecewise linear, continuous when beta changes.
        self._age0 = 0.0
        self._ev0 = 0
        self.betas = tuple(float(b) for b in betas)
        self._shadows = None
        if adaptive:
            self._shadows = [_shadow(self._capacity, b, history) for b in self.betas]
            self._scores = [0.0] * len(self.betas)
            self._decay = 0.5 ** (1.0 / half_life)
            self._every = every
            self._requests = 0

    @property
    def adaptive(self) -> bool:
        """Whether ``beta`` is learned online (see the class docstring)."""
        return self._shadows is not None

    def _age(self):
        return self._age0 + self.beta * (self._evictions - self._ev0) / self._cap()

    def _set_beta(self, beta):
        self._age0 = self._age()
        self._ev0 = self._evictions
        self.beta = beta

    def on_request(self, keys, num_hit: int, request=None) -> None:
        self._dead = None
        if request is not None and keys:
            bt = getattr(request, "block_tokens", 512) or 512
            if request.input_length % bt:
                self._dead = keys[-1]
        if self._shadows is not None:
            self._learn(keys, request)

    def _learn(self, keys, request):
        keys = tuple(keys)
        scores, decay = self._scores, self._decay
        for i, sh in enumerate(self._shadows):
            scores[i] = scores[i] * decay + _shadow_step(sh, keys, request)
        self._requests += 1
        if self._requests % self._every == 0:
            best = max(range(len(scores)), key=scores.__getitem__)
            cur = self.betas.index(self.beta) if self.beta in self.betas else None
            if cur is None or scores[best] > scores[cur]:
                self._set_beta(self.betas[best])


def _shadow(capacity, beta, history) -> PrefixCacheReplay:
    """A fixed-``beta`` key-only prefix cache that replays requests with immediate release."""
    return PrefixCacheReplay(PrefixAwarePolicy(capacity=capacity, beta=beta, history=history), capacity)


def _shadow_step(shadow: PrefixCacheReplay, keys, request) -> int:
    """Replay one request through ``shadow``; its prefix hits. Requests larger than the cache are skipped."""
    if len(keys) > shadow.capacity:
        return 0
    return shadow.step(keys, request)
