"""KV_HAWKEYE: Hawkeye (Jain & Lin, ISCA 2016) for prefix KV caches: Belady's choices on the past, replayed
online at the cache's own size, teach a table of request signatures which blocks are worth keeping."""

from __future__ import annotations

from collections import deque

import numpy as np

from ..checks import check_int, is_number
from ._refage import RefAgePolicy
from ._util import check_capacity
from .base import register_policy


def _number(name, value, allowed, ok):
    if not is_number(value) or not ok(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)


@register_policy("kv_hawkeye", "hawkeye")
class KVHawkeyePolicy(RefAgePolicy):
    """Belady-trained prediction of which blocks are worth keeping, per request signature; O(log n).

    **OPTgen.** Time advances one step per request (``on_request``). An occupancy vector holds, for each
    past step, how many blocks Belady's policy at ``capacity`` would hold across it: first the step's own
    request's blocks (pinned while it runs), then every block kept from one reference to its next. When a
    request references a block last referenced at step ``t0``, Belady would have kept it iff every step
    strictly between has room left (occupancy < capacity); if so those steps are charged one more block.
    That decision labels the block's *previous* reference friendly (Belady kept it until its reuse) or
    averse. A reference not reused within ``window`` x capacity block references is labelled averse.
    Blocks of one request whose previous reference is the same step are decided together, prefix first,
    with one slice of the vector.

    **Signatures** describe the referencing request and the block's place in it, which a KV cache knows
    and a generic cache does not: the block's role (a hit on a cached prefix, a newly computed block, or
    the last block, partially filled or not: a follow-up turn changes a partial block's hash), its place in
    the prompt (quarters), the prompt's length (log2 blocks), the output length (log2 tokens, halved),
    how much of the prompt was cached (none, under half, more, all) and the conversation's turn (1 + the
    parent's, capped at 4, where the cached prefix covers the whole prompt, but for its last block, of the
    request that last referenced the prefix's deepest block). Each signature keeps counts of its friendly
    and averse labels, halved whenever they pass ``memory`` so that the table follows the workload, and
    predicts ``c = (friendly - averse) / (friendly + averse + 2)`` in (-1, 1).

    **Priorities** (lowest evicted first) are set when a request releases a block: ``A + r + weight * c``,
    with ``A`` the cache's age (grows by ``beta / C`` at every eviction, ``C`` the capacity), ``r`` the
    number of requests that referenced the block (remembered across evictions for ``history`` keys, by
    default 8 x capacity, at least 131,072). A block whose prediction is below ``averse_below`` is averse:
    ``averse_penalty`` cache turnovers are taken off its priority, so that, as in Hawkeye, averse blocks go
    before friendly ones. Ties go to the block released first.

    Without ``capacity`` there is no OPTgen and no prediction: the policy is age plus references (``C``
    then being the largest number of resident keys seen). Without ``on_request`` calls every block has a
    neutral prediction. Memory: the OPTgen state is O(window x capacity) keys plus 16 bytes per request.
    """

    def __init__(self, capacity: int | None = None, beta: float = 2.0, weight: float = 1.0,
                 averse_below: float = -0.8, averse_penalty: float = 1000.0, window: float = 4.0,
                 memory: int = 256, history: int | None = None):
        self._capacity = check_capacity(capacity)
        self.beta = _number("beta", beta, "a positive number", lambda v: v > 0)
        self.weight = _number("weight", weight, "a non-negative number", lambda v: v >= 0)
        self.averse_below = _number("averse_below", averse_below, "a number in [-1, 1]", lambda v: -1 <= v <= 1)
        self.averse_penalty = _number("averse_penalty", averse_penalty, "a non-negative number",
                                      lambda v: v >= 0)
        self.window = _number("window", window, "a positive number (x capacity block references)",
                              lambda v: v > 0)
        check_int("memory", memory, 2, allowed="an int >= 2 (labels a signature remembers)")
        check_int("history", history, 0, allow_none=True,
                  allowed="a non-negative int or None (8 x capacity, at least 131072)")
        super().__init__(history)
        self.memory = memory
        self._fixed_limit = history if history is not None else max(8 * (self._capacity or 0), 1 << 17)
        self._bonus: dict = {}           # key -> priority offset from its last request's signature
        self._table: dict = {}           # signature -> [friendly, averse] label counts
        # OPTgen state (only with a capacity).
        self._step = 0
        self._base = 0                   # the step of _occ[0], _turns[0] and _nblk[0] (see _trim)
        self._occ = np.zeros(1024, dtype=np.int64)
        self._last: dict = {}            # key -> (step, signature) of its last reference within the window
        self._recent: deque = deque()    # (step, block references up to it, keys), oldest first
        self._seen = 0
        self._turns: list = []
        self._nblk: list = []
        self.opt_hits = 0                # block references Belady would hit, as OPTgen saw them
        self.opt_refs = 0

    # -- prediction --------------------------------------------------------------------------------
    def _age(self):
        return self.beta * self._evictions / self._cap()

    def _turn(self, keys, num_hit):
        if num_hit <= 0 or self._capacity is None:
            return 1
        prev = self._last.get(keys[num_hit - 1])
        if prev is None:
            return 1
        i = prev[0] - self._base
        return self._turns[i] + 1 if num_hit >= self._nblk[i] - 1 else 1

    @staticmethod
    def signatures(keys, num_hit: int, request, turn: int = 1) -> list:
        """One hashable signature per block of ``keys`` (see the class docstring); ``request`` may be None."""
        n = len(keys)
        if request is None:
            return [None] * n
        bt = getattr(request, "block_tokens", 512) or 512
        partial = request.input_length % bt != 0
        out = getattr(request, "output_length", 0) or 0
        head = (min(n.bit_length(), 9), min(int(out).bit_length() // 2, 6),
                0 if num_hit <= 0 else 3 if num_hit >= n else (1 if 2 * num_hit < n else 2), min(turn, 4))
        sigs = []
        for i in range(n):
            if i == n - 1:
                role = 2 if partial else 3
            else:
                role = 0 if i < num_hit else 1
            sigs.append((role, (4 * i) // n) + head)
        return sigs

    def predict(self, signature) -> float:
        """The prediction for ``signature`` in (-1, 1): > 0 friendly, < 0 averse, 0 unknown."""
        c = self._table.get(signature)
        return 0.0 if c is None else (c[0] - c[1]) / (c[0] + c[1] + 2)

    def _train(self, sig, friendly):
        if sig is None:
            return
        c = self._table.get(sig)
        if c is None:
            c = self._table[sig] = [0.0, 0.0]
        c[0 if friendly else 1] += 1
        if c[0] + c[1] > self.memory:
            c[0] *= 0.5
            c[1] *= 0.5

    def on_request(self, keys, num_hit: int, request=None) -> None:
        keys = tuple(keys)
        turn = self._turn(keys, num_hit)
        sigs = self.signatures(keys, num_hit, request, turn)
        if self._capacity is not None:
            self._turns.append(turn)
            self._nblk.append(len(keys))
            self._optgen(keys, sigs)
        bonus, w, cut, pen = self._bonus, self.weight, self.averse_below, self.averse_penalty
        seen: dict = {}
        for k, s in zip(keys, sigs):
            b = seen.get(s)
            if b is None:
                c = self.predict(s)
                b = seen[s] = w * c - (pen if c < cut else 0.0)
            bonus[k] = b

    def _optgen(self, keys, sigs):
        t, base = self._step, self._base
        occ = self._occ
        if t - base >= len(occ):
            occ = self._occ = np.concatenate([occ, np.zeros(len(occ), dtype=np.int64)])
        cap = self._capacity
        occ[t - base] = len(keys)
        last = self._last
        groups: dict = {}
        for k, s in zip(keys, sigs):
            prev = last.get(k)
            if prev is not None and prev[0] != t:
                groups.setdefault(prev[0], []).append(prev[1])
            last[k] = (t, s)
        train = self._train
        for t0, psigs in groups.items():
            seg = occ[t0 + 1 - base:t - base]
            if len(seg):
                kept = max(0, min(cap - int(seg.max()), len(psigs)))
                if kept:
                    seg += kept
            else:
                kept = len(psigs)
            self.opt_hits += kept
            for j, s in enumerate(psigs):
                train(s, j < kept)
        self.opt_refs += len(keys)
        self._seen += len(keys)
        recent = self._recent
        recent.append((t, self._seen, keys))
        horizon = self._seen - self.window * cap
        while recent and recent[0][1] < horizon:
            t0, _, old = recent.popleft()
            for k in old:
                prev = last.get(k)
                if prev is not None and prev[0] == t0:
                    del last[k]
                    train(prev[1], False)
        self._step = t + 1
        if recent[0][0] - base > max(1024, t + 1 - recent[0][0]):
            self._trim(recent[0][0])

    def _trim(self, lo):
        """Forget the per-step state (``_occ``, ``_turns``, ``_nblk``) of the steps before ``lo``, the oldest
        step left in ``_recent``, so that it stays O(window x capacity) however long the trace.

        This changes no decision: those entries are read only at a step ``t0`` named by ``_last`` (``_turn``
        reads ``_turns[t0]`` and ``_nblk[t0]``, ``_optgen`` the occupancy of the steps after ``t0``), and every
        ``_last`` entry names a step still in ``_recent``: when a step leaves ``_recent`` the entries that name
        it are deleted with it, and newer steps enter both together. Called when the dropped part outgrows
        the kept part, so the copying is O(1) per step.
        """
        d = lo - self._base
        keep = self._occ[d:self._step - self._base]
        occ = np.zeros(max(1024, 2 * len(keep)), dtype=np.int64)
        occ[:len(keep)] = keep
        self._occ = occ
        del self._turns[:d], self._nblk[:d]
        self._base = lo
