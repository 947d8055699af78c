"""Token-level KV eviction inside :class:`~kvtriton.hf.PagedEngine` (``token_eviction=...``).

A strategy from :mod:`kvtriton.token_eviction` chooses, per sequence and per LAYER, which cached tokens stay;
``ops.compact_tokens`` packs them to the front of the sequence's blocks, layer by layer. The block table is
shared by all layers and each layer keeps its own cached length, so the attention metadata of a step holds
one ``seq_lens`` row and one slot mapping per layer (:class:`StepBatch` ``layer_attention``). Blocks past the
longest layer's length go back to the pool after each step.

* Budgets are per sequence and per layer: ``token_budget`` a fraction in (0, 1] keeps ``ceil(f * n)`` of the
  ``n`` tokens the sequence has seen (prompt plus generated; never fewer than the strategy's ``sink +
  window``), an int keeps that many tokens. ``pyramid=True`` splits ``L`` times that over the ``L`` layers
  with :func:`~kvtriton.token_eviction.pyramid_budgets` (PyramidKV). Per-head budgets are not supported: the
  kernels take one length per sequence and layer, so a layer's KV heads keep the same positions.
* When: at the end of a sequence's prefill every layer is compressed to its budget. Strategies that evict
  continuously (streaming_llm, h2o, tova, key_norm and their ``_page`` variants) then keep each layer at the
  budget: once it holds more than budget + ``evict_every`` tokens it is cut back to the budget. snapkv (and
  snapkv_page) compresses the prompt only, as the paper does.
* Scores come from the attention kernels: each layer's attention returns its log-sum-exp, and
  ``ops.paged_attention_scores`` turns it into the attention each key received from the queries a rule
  needs (snapkv: its observation window, the last ``window`` prompt queries; h2o: every prompt query, then
  every decode query, accumulated; tova: the newest query), per query head. key_norm reads the cached keys.
* Positions continue at the original counter (keys are cached after RoPE): the engine's position ids are the
  tokens seen, never the compacted length.
* quest evicts nothing: per layer and physical block it keeps the elementwise min and max of the block's keys
  (updated after every append, vectorised torch on the written pages) and each decode query attends only to
  its top pages by the Quest bound (``ceil(budget / block_size)`` pages, always the first and the page being
  written), through a per-layer block table of just those pages.
* Eviction-mode sequences hold their blocks outside the prefix cache (``pool.allocate_blocks``): compacted
  blocks no longer match their token hashes, so they are never registered and later requests cannot hit
  them. Preemption gives the blocks back; the sequence is prefilled and compressed again.
* Statistics (``PagedEngine.stats()``): KV tokens held summed over layers, now and at the peak (measured at
  the end of each step, after compaction), their per-layer averages and bytes; ``kv_bytes_read``: the K and
  V bytes of the tokens each layer's attention read, against ``kv_bytes_read_full`` for a full cache;
  ``score_ns`` (the scores op), ``compact_ns`` (selection and ``compact_tokens``), ``tokens_evicted`` (summed
  over layers), ``blocks_returned``.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch

from .. import ops
from ..checks import is_int, is_number
from ..token_eviction import (TokenEvictionStrategy, available_token_strategies, canonical_token_strategy,
                              make_token_strategy, pyramid_budgets, resolve_budget)
from ..token_eviction.pages import PageEviction, Quest, _top_pages
from .attention import StepBatch

__all__ = ["TokenEvictor", "make_evictor"]

_SCORED = {"attention_window", "last_query", "keys", "decode_attention"}


def _core(strategy):
    return strategy.base if isinstance(strategy, PageEviction) else strategy


def _build_strategy(token_eviction, kwargs, block_size: int) -> TokenEvictionStrategy:
    if isinstance(token_eviction, TokenEvictionStrategy):
        if kwargs:
            raise ValueError("token_eviction_kwargs apply to a strategy given by name; got a strategy instance")
        strategy = token_eviction
    elif isinstance(token_eviction, str):
        name = canonical_token_strategy(token_eviction)     # ValueError listing the valid names
        kw = dict(kwargs or {})
        if name == "quest" or name.endswith("_page"):
            if kw.setdefault("page_size", block_size) != block_size:
                raise ValueError(f"token_eviction_kwargs page_size must equal the engine's block_size "
                                 f"({block_size}): pages are the cache's blocks, got {kw['page_size']!r}")
        try:
            strategy = make_token_strategy(name, **kw)
        except TypeError as e:
            raise ValueError(f"token_eviction_kwargs {sorted(kw)} are not accepted by {name!r}: {e}") from None
    else:
        raise ValueError(f"token_eviction must be None, a strategy name ({', '.join(available_token_strategies())})"
                         f" or a TokenEvictionStrategy, got {type(token_eviction).__name__}")
    page = getattr(strategy, "page_size", block_size)
    if page != block_size:
        raise ValueError(f"{strategy.name}: page_size {page} must equal the engine's block_size {block_size}")
    return strategy


def _check_supported(strategy) -> None:
    needs = set(strategy.needs)
    if not strategy.evicts:
        if not isinstance(strategy, Quest):
            raise ValueError(f"token_eviction {strategy.name!r} evicts nothing and is not quest: the engine knows "
                             "no way to apply its selection")
        return
    if needs - _SCORED:
        raise ValueError(f"token_eviction {strategy.name!r} needs {sorted(needs - _SCORED)}, which the engine "
                         f"cannot provide (it provides {sorted(_SCORED)})")
    core = _core(strategy)
    if "decode_attention" in needs and not (hasattr(core, "update") and hasattr(core, "apply_keep")):
        raise ValueError(f"token_eviction {strategy.name!r} needs decode_attention but has no update()/"
                         "apply_keep() to accumulate it")


def _check_budget(token_budget, floor: int):
    if is_int(token_budget):
        if token_budget < 1:
            raise ValueError(f"token_budget must be a fraction in (0, 1] or an int token count >= 1, got "
                             f"{token_budget!r}")
        if token_budget < floor:
            raise ValueError(f"token_budget {token_budget} is below the strategy's sink + window = {floor} tokens "
                             f"always kept; token_budget must be >= {floor}")
        return int(token_budget)
    if is_number(token_budget) and 0.0 < float(token_budget) <= 1.0:
        return float(token_budget)
    raise ValueError(f"token_budget must be a fraction in (0, 1] or an int token count >= 1, got {token_budget!r}")


def make_evictor(layout, block_size: int, token_eviction, token_budget=1.0, token_eviction_kwargs=None,
                 pyramid=False, evict_every=None):
    """A :class:`TokenEvictor` for ``token_eviction`` (None: none), everything checked before any state is
    made: ValueError naming the argument and the allowed values."""
    if token_eviction is None:
        if token_eviction_kwargs or pyramid:
            raise ValueError("token_eviction_kwargs and pyramid need token_eviction (a strategy name)")
        return None
    if token_eviction_kwargs is not None and not isinstance(token_eviction_kwargs, dict):
        raise ValueError(f"token_eviction_kwargs must be a dict or None, got {type(token_eviction_kwargs).__name__}")
    if not isinstance(pyramid, bool):
        raise ValueError(f"pyramid must be True or False, got {pyramid!r}")
    if evict_every is not None and (not is_int(evict_every) or evict_every < 1):
        raise ValueError(f"evict_every must be an int >= 1 or None (the block size), got {evict_every!r}")
    if any(w is not None for w in layout.sliding_windows):
        raise ValueError("token_eviction needs full-attention layers: a sliding window over a compacted cache "
                         "would count cached tokens, not positions")
    strategy = _build_strategy(token_eviction, token_eviction_kwargs, block_size)
    _check_supported(strategy)
    budget = _check_budget(token_budget, strategy.sink + strategy.window)
    if pyramid and not strategy.evicts:
        raise ValueError("pyramid=True splits an eviction budget across layers; quest evicts nothing")
    return TokenEvictor(layout, block_size, strategy, budget, pyramid,
                        block_size if evict_every is None else int(evict_every))


class EvictionCache:
    """One sequence's blocks in eviction mode (held by id, outside the prefix cache) and each layer's length.
    Quacks like the :class:`~kvtriton.VirtualKVCache` the engine uses (``append``, ``release``)."""

    num_cached_tokens = 0

    def __init__(self, evictor, n: int):
        self.ev = evictor
        self.blocks = evictor.pool.allocate_blocks(-(-n // evictor.block_size))
        self.lens = [0] * evictor.num_layers
        self.pending, self.prefill, self.released = n, True, False
        self.states = evictor.fresh_states()

    def append(self, n: int = 1, token_ids=None) -> None:
        """Room for ``n`` more tokens in every layer (PoolExhaustedError, nothing changed, when none)."""
        need = -(-(max(self.lens) + n) // self.ev.block_size) - len(self.blocks)
        if need > 0:
            self.blocks = self.blocks + self.ev.pool.allocate_blocks(need)
        self.pending = n

    def trim(self) -> int:
        """Give back the blocks no layer needs; returns how many."""
        keep = -(-max(self.lens) // self.ev.block_size)
        extra = self.blocks[keep:]
        if extra:
            self.ev.pool.free_blocks(extra)
            self.blocks = self.blocks[:keep]
        return len(extra)

    def release(self) -> None:
        if not self.released:
            self.released = True
            if not self.ev.pool.closed:
                self.ev.pool.free_blocks(self.blocks)
            self.blocks = []


class TokenEvictor:
    """The engine's eviction state: strategy, budget rule, counters, quest's page metadata (see the module
    docstring). Built by :func:`make_evictor`; :meth:`bind` attaches the pool."""

    def __init__(self, layout, block_size, strategy, budget, pyramid, evict_every):
        self.layout, self.block_size, self.strategy = layout, block_size, strategy
        self.num_layers = layout.num_layers
        self.budget, self.pyramid, self.evict_every = budget, pyramid, evict_every
        self.quest = isinstance(strategy, Quest)
        needs = set(strategy.needs)
        self.stateful = "decode_attention" in needs
        self.continuous = strategy.evicts and "attention_window" not in needs
        self.token_bytes = 2 * layout.num_kv_heads * layout.head_dim * layout.dtype.itemsize
        self.pool = None
        self.key_min = self.key_max = None
        self.reset_stats()

    def bind(self, pool) -> None:
        self.pool = pool

    def reset_stats(self) -> None:
        self.counters = dict(score_ns=0, compact_ns=0, tokens_evicted=0, blocks_returned=0, kv_bytes_read=0,
                             kv_bytes_read_full=0, kv_tokens_held_peak=0)

    def fresh_states(self):
        """Per-layer copies of a stateful strategy (h2o accumulates per sequence and layer), else None."""
        if not self.stateful:
            return None
        out = []
        for _ in range(self.num_layers):
            s = copy.deepcopy(self.strategy)
            if hasattr(_core(s), "reset"):
                _core(s).reset()
            out.append(s)
        return out

    # ------------------------------------------------------------------ budgets
    def check_prompt(self, i: int, prompt_len: int) -> None:
        """ValueError naming ``prompts[i]`` when a fraction budget keeps fewer than sink + window of it."""
        if isinstance(self.budget, float):
            try:
                resolve_budget(self.budget, prompt_len, self.strategy.sink, self.strategy.window)
            except ValueError as e:
                raise ValueError(f"prompts[{i}] ({prompt_len} tokens): token_budget {e}") from None

    def layer_budgets(self, n: int) -> list[int]:
        """Tokens each layer keeps of a sequence that has seen ``n`` tokens."""
        s = self.strategy
        floor = min(s.sink + s.window, n)
        b = self.budget
        per = math.ceil(b * n - 1e-9) if isinstance(b, float) else b
        if not self.pyramid:
            return [min(n, max(per, floor, 1))] * self.num_layers
        L = self.num_layers
        return [min(n, max(x, floor, 1)) for x in pyramid_budgets(max(L, per * L), L)]

    # ------------------------------------------------------------------ steps
    def admit(self, tokens) -> EvictionCache:
        return EvictionCache(self, len(tokens))

    def step_batch(self, sched, cu, decode_only: bool) -> StepBatch:
        """The step's attention metadata: per-layer slots ``[L, T]`` and lengths ``[L, B]``, one block table."""
        return _Step(self, sched, cu, decode_only).batch

    def end_step(self, sched) -> None:
        """After a forward: give back the blocks no layer needs; the peak of the tokens held."""
        held = 0
        for seq, start, n, _ in sched:
            c = seq.cache
            c.pending, c.prefill = 0, False
            if not c.released:
                self.counters["blocks_returned"] += c.trim()
                held += sum(c.lens)
        self.counters["kv_tokens_held_peak"] = max(self.counters["kv_tokens_held_peak"], held)

    def stats(self, running) -> dict:
        c = dict(self.counters)
        held = sum(sum(q.cache.lens) for q in running if q.cache is not None and not q.cache.released)
        L = self.num_layers
        c.update(kv_tokens_held=held, kv_tokens_per_layer=held / L, kv_bytes_held=held * self.token_bytes,
                 kv_tokens_per_layer_peak=c["kv_tokens_held_peak"] / L,
                 kv_bytes_held_peak=c["kv_tokens_held_peak"] * self.token_bytes,
                 kv_read_fraction=c["kv_bytes_read"] / c["kv_bytes_read_full"] if c["kv_bytes_read_full"] else 1.0,
                 score_s=c["score_ns"] / 1e9, compact_s=c["compact_ns"] / 1e9,
                 token_eviction=self.strategy.name, token_budget=self.budget, pyramid=self.pyramid)
        return c

    # ------------------------------------------------------------------ quest
    def update_minmax(self, layer: int, k, slots) -> None:
        """Quest's page metadata after an append: the written blocks' key min/max (vectorised torch; a block
        whose first slot is written starts over)."""
        if self.key_min is None:
            shape = (self.num_layers, self.pool.num_blocks, self.layout.num_kv_heads, self.layout.head_dim)
            self.key_min = torch.full(shape, math.inf, dtype=torch.float32, device=self.pool.device)
            self.key_max = torch.full(shape, -math.inf, dtype=torch.float32, device=self.pool.device)
        ok = slots >= 0
        slots, k = slots[ok], k[ok].float()
        blocks = slots // self.block_size
        fresh = blocks[slots % self.block_size == 0]
        lo, hi = self.key_min[layer], self.key_max[layer]
        lo.index_fill_(0, fresh, math.inf)
        hi.index_fill_(0, fresh, -math.inf)
        idx = blocks[:, None, None].expand_as(k)
        lo.scatter_reduce_(0, idx, k, "amin")
        hi.scatter_reduce_(0, idx, k, "amax")

    def quest_pages(self, layer: int, query, blocks: list[int], length: int, budget: int) -> tuple[list, int]:
        """The blocks a decode query reads and their token count: the top ``ceil(budget / block_size)``
        pages by the Quest bound, the first and the last (being written) always included."""
        bs = self.block_size
        pages = -(-length // bs)
        k = -(-budget // bs)
        if k >= pages:
            return blocks[:pages], length
        ids = torch.tensor(blocks[:pages], dtype=torch.long, device=self.key_min.device)
        bounds = self.strategy.page_bounds((self.key_min[layer][ids], self.key_max[layer][ids]), query).cpu()
        protected = torch.zeros(pages, dtype=torch.bool)
        protected[0] = protected[-1] = True
        sel = _top_pages(bounds, k, protected).tolist()
        return [blocks[j] for j in sel], (len(sel) - 1) * bs + length - (pages - 1) * bs


class _Step:
    """One forward in eviction mode: metadata, and :meth:`attend`, the per-layer attention."""

    def __init__(self, ev: TokenEvictor, sched, cu, decode_only: bool):
        self.ev = ev
        L, bs = ev.num_layers, ev.block_size
        counts = [n for _, _, n, _ in sched]
        T, B = sum(counts), len(sched)
        slots = np.empty((L, T), dtype=np.int64)
        lens = np.empty((L, B), dtype=np.int64)
        width = max(len(s.cache.blocks) for s, _, _, _ in sched)
        table = np.zeros((B, width), dtype=np.int64)
        off = 0
        self.entries = []
        for b, (seq, start, n, _) in enumerate(sched):
            c = seq.cache
            before = np.asarray(c.lens, dtype=np.int64)
            pos = before[:, None] + np.arange(n)[None, :]
            tbl = np.asarray(c.blocks, dtype=np.int64)
            slots[:, off:off + n] = tbl[pos // bs] * bs + pos % bs
            lens[:, b] = before + n
            table[b, :len(tbl)] = tbl
            off += n
            self.entries.append((c, n, start + n, ev.layer_budgets(start + n)))
        dev = ev.pool.device
        self.slots = torch.from_numpy(slots).to(dev)
        self.lens_host = lens
        self.lens = torch.from_numpy(lens.astype(np.int32)).to(dev)
        self.table_host = table
        self.table = torch.from_numpy(table.astype(np.int32)).to(dev)
        self.cu, self.cu_host = cu.to(dev), cu.tolist()
        self.decode_only = decode_only
        self.batch = StepBatch(ev.pool, self.slots[0], self.table, self.lens[0], self.cu, decode_only=decode_only,
                               num_layers=L, layer_attention=self.attend)

    def attend(self, layer: int, q, k, v, scale):
        ev = self.ev
        kc, vc = ev.pool.kv(layer)
        slots, lens, read = self.slots[layer], self.lens[layer], self.lens_host[layer]
        ops.append_kv(k, v, kc, vc, slots)
        table = self.table
        if ev.quest:
            ev.update_minmax(layer, k, slots)
            table, lens, read = self._quest_tables(layer, q)
        if self.decode_only:
            out, lse = ops.paged_decode_attention(q, kc, vc, table, lens, scale=scale, return_lse=True)
        else:
            out, lse = ops.paged_prefill_attention(q, kc, vc, table, lens, self.cu, scale=scale, return_lse=True)
        c = ev.counters
        c["kv_bytes_read"] += int(read.sum()) * ev.token_bytes
        c["kv_bytes_read_full"] += int(self.lens_host[layer].sum()) * ev.token_bytes
        if ev.strategy.evicts:
            self._evict(layer, q, lse, kc, vc, scale)
        else:
            for b, (cache, _, _, _) in enumerate(self.entries):
                cache.lens[layer] = int(self.lens_host[layer, b])
        return out

    def _quest_tables(self, layer: int, q):
        lens = self.lens_host[layer].copy()
        rows = []
        for b, (cache, n, seen, budgets) in enumerate(self.entries):
            if cache.prefill or n != 1:
                continue
            blocks, length = self.ev.quest_pages(layer, q[self.cu_host[b]], cache.blocks, int(lens[b]),
                                                 budgets[layer])
            rows.append((b, blocks))
            lens[b] = length
        if not rows:
            return self.table, self.lens[layer], lens
        table = self.table_host.copy()
        for b, blocks in rows:
            table[b, :len(blocks)] = blocks
        dev = self.ev.pool.device
        return (torch.from_numpy(table.astype(np.int32)).to(dev), torch.from_numpy(lens.astype(np.int32)).to(dev),
                lens)

    def _plan(self, layer: int):
        """``[(b, m, budget, due, window)]``: each sequence's length after the append, its budget, whether it
        is cut back now, and how many of its last queries' attention the rule needs (0: none)."""
        ev, plan = self.ev, []
        needs = ev.strategy.needs
        for b, (cache, n, seen, budgets) in enumerate(self.entries):
            m, budget = int(self.lens_host[layer, b]), budgets[layer]
            due = budget < m if cache.prefill else (ev.continuous and m > budget + ev.evict_every)
            w = 0
            if "decode_attention" in needs:
                w = n
            elif due and "attention_window" in needs:
                w = min(n, max(1, getattr(_core(ev.strategy), "window", 1)))
            elif due and "last_query" in needs:
                w = 1
            plan.append((b, m, budget, due, w))
        return plan

    def _scores(self, layer: int, plan, q, lse, kc, scale) -> dict:
        """``{b: float64 [hq, m]}``: attention each key got from the last ``w`` queries of sequence ``b``."""
        want = [(b, m, w) for b, m, _, _, w in plan if w]
        if not want:
            return {}
        t0 = time.perf_counter_ns()
        cu = self.cu_host
        rows = torch.cat([torch.arange(cu[b + 1] - w, cu[b + 1]) for b, _, w in want]).to(q.device)
        sub_cu = torch.tensor([0] + [w for _, _, w in want], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        idx = torch.tensor([b for b, _, _ in want], dtype=torch.long, device=q.device)
        scores = ops.paged_attention_scores(q.index_select(0, rows), kc, self.table.index_select(0, idx),
                                            self.lens[layer].index_select(0, idx), lse.index_select(0, rows),
                                            cu_seqlens_q=sub_cu.to(q.device), scale=scale,
                                            max_q_len=max(w for _, _, w in want))
        out = {b: scores[i, :, :m].double() for i, (b, m, _) in enumerate(want)}
        self.ev.counters["score_ns"] += time.perf_counter_ns() - t0
        return out

    def _evict(self, layer: int, q, lse, kc, vc, scale) -> None:
        ev = self.ev
        plan = self._plan(layer)
        scores = self._scores(layer, plan, q, lse, kc, scale)
        keeps = []
        t0 = time.perf_counter_ns()
        for b, m, budget, due, w in plan:
            cache = self.entries[b][0]
            strat = cache.states[layer] if ev.stateful else ev.strategy
            if ev.stateful:
                _core(strat).update(scores[b])
            cache.lens[layer] = m
            if not due:
                continue
            keep = strat.select(m, budget, **self._inputs(strat, scores.get(b), kc, b, m))
            if not bool(keep.all()):
                keeps.append((b, m, keep))
        if keeps:
            width = max(m for _, m, _ in keeps)
            mask = torch.zeros(len(keeps), width, dtype=torch.bool)
            for i, (_, m, keep) in enumerate(keeps):
                mask[i, :m] = keep.cpu()
            idx = torch.tensor([b for b, _, _ in keeps], dtype=torch.long, device=kc.device)
            new = ops.compact_tokens(kc, vc, self.table.index_select(0, idx), self.lens[layer].index_select(0, idx),
                                     mask.to(kc.device)).tolist()
            for (b, m, keep), n_new in zip(keeps, new):
                cache = self.entries[b][0]
                cache.lens[layer] = int(n_new)
                ev.counters["tokens_evicted"] += m - int(n_new)
                if ev.stateful:
                    _core(cache.states[layer]).apply_keep(keep)
        ev.counters["compact_ns"] += time.perf_counter_ns() - t0

    def _inputs(self, strat, scores, kc, b: int, m: int) -> dict:
        needs = strat.needs
        if "attention_window" in needs:
            return {"attention_window": scores[:, None, :]}
        if "last_query" in needs:
            return {"last_query": scores}
        if "keys" in needs:
            t = torch.arange(m, device=kc.device)
            blk = self.table[b].long()[t // self.ev.block_size]
            return {"keys": kc[blk, t % self.ev.block_size]}
        return {}
