"""The device replay's serving loop: one step is the phases admit, prefill, decode, complete, compact.

Each phase is a small method that fills the step's :class:`~kvtriton.replay.metrics.StepRecord` and
reports events to the run's :class:`~kvtriton.replay.metrics.ReplayMetrics`; the engine talks to each
model's ``CachePool`` directly (request, append, release, kv, stats, evict, compact, validate). The
semantics (clock, admission, prefill attention and cost model, preemption, compaction, time split) are
documented in :mod:`kvtriton.replay.device`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict

import numpy as np
import torch

from ..errors import PoolExhaustedError
from ..spec import ModelSpec
from .arena_sizing import make_allocator, reclaimable_chunks
from .device_config import DeviceReplayConfig, DeviceReplayResult
from .metrics import KernelTimer, ModelCounters, ReplayMetrics, StepRecord, pool_figures
from .sequences import SequenceState

__all__ = ["ReplayEngine", "ModelBatch", "make_allocator", "PREFILL_CHUNK_TOKENS"]

# Prefill works in pieces of at most this many tokens: the synthetic K/V rows written per append_kv call,
# and the query rows per paged_prefill_attention call (a step's prompts are packed into calls this big; a
# longer prompt is cut into chunks). Bounds the synthetic tensors and the attention output at any shape
# (Llama-3-70B: 8192 x 64 query heads x 128 x bf16 = 128 MiB).
PREFILL_CHUNK_TOKENS = 8192


# ------------------------------------------------------------------------------------------ state

class ModelBatch:
    """One model's serving state: its pool, running batch, host block table and synthetic tensors."""

    def __init__(self, name: str, spec: ModelSpec, pool, seqs, cfg: DeviceReplayConfig, device: torch.device,
                 gen: torch.Generator):
        self.name, self.spec, self.pool = name, spec, pool
        self.num_layers = spec.num_layers
        self.kv = [pool.kv(layer) for layer in range(spec.num_layers)]  # (key_cache, value_cache) per layer
        H, D, Hq, B, dt = spec.num_kv_heads, spec.head_dim, spec.num_q_heads, cfg.max_batch, spec.dtype
        # Synthetic K/V/Q, drawn once: values do not matter, bytes and kernels do.
        self.q = torch.randn(B, Hq, D, generator=gen, device=device).to(dt)
        self.k_new = torch.randn(B, H, D, generator=gen, device=device).to(dt)
        self.v_new = torch.randn(B, H, D, generator=gen, device=device).to(dt)
        max_tokens = max((s.max_tokens for s in seqs), default=1)
        chunk = min(max_tokens, PREFILL_CHUNK_TOKENS)
        self.k_fill = torch.randn(chunk, H, D, generator=gen, device=device).to(dt)
        self.v_fill = torch.randn(chunk, H, D, generator=gen, device=device).to(dt)
        # prefill queries: a step's prompts share one attention call when they fit (at most max_batch are
        # admitted at once), within the bound
        rows = min(sum(sorted((s.max_tokens for s in seqs), reverse=True)[:B]) or 1, PREFILL_CHUNK_TOKENS)
        self.q_fill = torch.randn(rows, Hq, D, generator=gen, device=device).to(dt)
        self.bt = np.zeros((B, spec.blocks_for_tokens(max_tokens)), dtype=np.int32)  # block_tables [B, max_blocks]
        self.lens = np.zeros(B, dtype=np.int32)                                      # seq_lens [B]
        self.running: list[SequenceState] = []
        self.counts = ModelCounters(name, spec.block_size, len(seqs))


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is a convenience; the replay runs without it
        return None
    return tqdm(total=total, desc="device replay", unit="req")


# ----------------------------------------------------------------------------------------- engine

class ReplayEngine:
    """Serves prepared sequences on the pools of one allocator; ``run`` once, then ``close``."""

    def __init__(self, seqs: list[SequenceState], specs: dict, policy: str, capacity_blocks, budget_bytes,
                 cfg: DeviceReplayConfig, device: torch.device, allocator_cls, policy_kwargs=None):
        self.seqs, self.policy, self.cfg, self.device = seqs, policy, cfg, device
        self.multi = len(specs) > 1
        self.alloc, self.chunk_bytes = make_allocator(allocator_cls, specs, capacity_blocks, budget_bytes, cfg,
                                                      device)
        try:
            gen = torch.Generator(device=device).manual_seed(cfg.seed)
            self.models: dict[str, ModelBatch] = {}
            for name, spec in specs.items():
                pool = self.alloc.create_pool(name, spec, policy=policy, policy_kwargs=policy_kwargs)
                if cfg.preallocate and not self.multi:
                    # one model owns its arena and sizes its KV memory once, as a serving engine does
                    # (growing chunk by chunk would be timed); several grow into the shared arena
                    pool.grow(num_blocks=pool.num_blocks)
                mine = [s for s in seqs if s.model == name]
                m = self.models[name] = ModelBatch(name, spec, pool, mine, cfg, device, gen)
                for s in mine:
                    s.m = m
        except BaseException:
            self.alloc.close()
            raise
        self.arena_bytes = next(iter(self.alloc.arenas.values())).num_bytes
        # several models share the arena's bytes: no block count bounds them, 0 says so
        self.capacity_blocks = next(iter(self.models.values())).pool.num_blocks if not self.multi else 0
        self.timer = KernelTimer(device)
        self.metrics = ReplayMetrics([m.counts for m in self.models.values()], cfg.record_every)
        self.pending: deque[SequenceState] = deque(seqs)
        self.waiting: deque[SequenceState] = deque()
        self._order = 0
        self._append_kv = self._attn = self._prefill_attn = None
        self._launches: list = []  # the last decode's device inputs (see _decode)

    def close(self):
        self.alloc.close()

    # ------------------------------------------------------------------------------ the loop
    def run(self, progress: bool = False, on_step=None) -> DeviceReplayResult:
        """Serve every sequence; ``on_step`` gets each recorded time-series row."""
        self.bind_kernels()
        cfg, metrics, total = self.cfg, self.metrics, len(self.seqs)
        if cfg.warmup or (cfg.warmup is None and self.device.type == "cuda"):
            self._warm_up()
        bar = _progress_bar(total, progress)
        now = 0.0
        wall0 = time.perf_counter()
        metrics.start(self._pool_row())
        while metrics.completed < total:
            self._arrive(now)
            if not self._num_running() and not self.waiting:
                now = max(now, self.pending[0].arrival)  # idle: the clock jumps to the next arrival
                continue
            st, now = self.step(now)
            if bar is not None:
                bar.update(len(st.finished))
            if metrics.due():
                row = metrics.record(st, now, self._pool_row(), len(self.waiting))
                if on_step is not None:
                    on_step(row)
        if bar is not None:
            bar.close()
        return self._result(now, time.perf_counter() - wall0)

    def bind_kernels(self) -> None:
        """Look the ops up now (``run`` does): tests and benchmarks replace them on ``kvtriton.ops``."""
        from ..ops import append_kv, paged_decode_attention, paged_prefill_attention
        self._append_kv, self._attn = append_kv, paged_decode_attention
        self._prefill_attn = paged_prefill_attention

    def step(self, now: float) -> tuple[StepRecord, float]:
        """One step at clock ``now``: ``(its record, the clock after it)``."""
        cfg = self.cfg
        st = StepRecord()
        t0 = time.perf_counter()
        self._admit(st, now)
        if not self._num_running():
            raise RuntimeError(f"request_id={self.waiting[0].req.request_id} cannot be admitted into idle pools "
                               f"(pool figures: {self._pool_row()})")
        self._prefill(st, now)
        self._decode(st)
        self._complete(st)
        self._sync()
        st.wall_s = time.perf_counter() - t0 - st.compaction_s
        self.metrics.close_step(st)
        end = now + (st.wall_s if cfg.step_time_s is None else cfg.step_time_s) + st.prefill_model_s
        for s in st.finished:
            s.finished_at = end
        self._compact(st)
        if cfg.check_invariants:
            self.check_invariants()
        return st, end + (st.compaction_s if cfg.step_time_s is None else 0.0)

    def _arrive(self, now: float) -> None:
        pending = self.pending
        while pending and pending[0].arrival <= now:
            self.waiting.append(pending.popleft())

    def _result(self, now: float, wall_s: float) -> DeviceReplayResult:
        models = list(self.models.values())
        first = models[0].spec
        header = {"device": str(self.device), "model": ",".join(self.models), "policy": self.policy,
                  "capacity_blocks": self.capacity_blocks, "arena_bytes": self.arena_bytes,
                  "block_size": first.block_size if len({m.spec.block_size for m in models}) == 1 else 0,
                  "num_layers": first.num_layers if len({m.spec.num_layers for m in models}) == 1 else 0}
        final = self._pool_row()
        rows = self.metrics.request_rows(self.seqs)
        summary = self.metrics.summary(header, rows, final, now, wall_s)
        return DeviceReplayResult(summary=summary, timeseries=self.metrics.timeseries, requests=rows,
                                  config=asdict(self.cfg))

    # ------------------------------------------------------------------------------ phases
    def _admit(self, st: StepRecord, now: float) -> None:
        """Admit the head of the queue, first come first served across models, while its model's batch
        has room and its pool can hold its context. A request whose pool is idle but cannot get memory
        makes the other pools give chunks back once (several models)."""
        pc = time.perf_counter
        waiting, max_batch = self.waiting, self.cfg.max_batch
        reclaimed = False
        while waiting:
            s = waiting[0]
            if len(s.m.running) >= max_batch:
                break
            ta = pc()
            hits = self._allocate(s, now)
            if hits is not None:
                self._add_running(s)
            st.memory_s += pc() - ta
            if hits is None:
                if self.multi and not s.m.running and not reclaimed:
                    reclaimed = True
                    self._reclaim_for(s.m, st)
                    continue
                break
            waiting.popleft()
            st.admitted.append((s, hits))

    def _prefill(self, st: StepRecord, now: float) -> None:
        """Prefill the admitted sequences: write their missed K/V (``append_kv``), run the prefill attention
        of their missed tokens over their pages (``paged_prefill_attention``, one batched call per layer
        and model; prefix hits read from the cache) and charge the cost model for the rest of the forward
        pass (projections and MLP). A first admission's first token comes at the end of its prefill: the
        prompts of the step are charged one after another in admission order (cost model, ``append_kv``
        and each one's share of the batched attention)."""
        cfg = self.cfg
        written = []  # (sequence, first missed position, missed tokens, append_kv seconds)
        for s, hits in st.admitted:
            missed, slot_s = self._write_prompt(s, hits)
            st.memory_s += slot_s
            written.append((s, s.seq_len - missed, missed, self.timer.collect()))
        attention = self._prefill_attention(st, written)
        for s, _start, missed, append_s in written:
            attn_s = attention.get(s, 0.0)
            kernel_s = append_s + attn_s
            st.prefill_kernel_s += kernel_s
            st.prefill_attention_s += attn_s
            cost = missed * cfg.prefill_s_per_token
            st.prefill_model_s += cost
            first = s.admissions == 1
            self.metrics.on_prefill(s.m.counts, s.prompt_len, missed, kernel_s, cost, first, attention_s=attn_s)
            if first:
                s.prefill_attention_s = attn_s
                s.first_token_at = now + st.prefill_model_s + (st.prefill_kernel_s if cfg.step_time_s is None
                                                               else 0.0)
                s.generated = 1

    def _prefill_attention(self, st: StepRecord, written) -> dict:
        """``paged_prefill_attention`` over every layer for the missed tokens of ``written`` (``(sequence,
        first missed position, missed tokens, _)``, K/V already in the pages), batched per model; returns
        ``{sequence: seconds}``, each model's measured time shared among its sequences in proportion to the
        query-key pairs each computes (``n * p + n * (n + 1) / 2`` for ``n`` missed tokens after ``p``)."""
        by_model: dict[ModelBatch, list] = {}
        for s, start, n, _ in written:
            if n > 0:  # a prompt wholly in the cache computes nothing here
                by_model.setdefault(s.m, []).append((s, start, n))
        shares = {}
        for m, items in by_model.items():
            tm = time.perf_counter()
            calls = self._prefill_inputs(m, items)
            st.memory_s += time.perf_counter() - tm
            tok = self.timer.start()
            for rows, bt, lens, cu in calls:
                q = m.q_fill[:rows]
                for kc, vc in m.kv:
                    self._prefill_attn(q, kc, vc, bt, lens, cu)
            self.timer.stop(tok)
            seconds = self.timer.collect()
            pairs = [n * start + n * (n + 1) // 2 for _, start, n in items]
            total = sum(pairs)
            for (s, _, _), w in zip(items, pairs):
                shares[s] = seconds * w / total
        return shares

    def _prefill_inputs(self, m: ModelBatch, items) -> list:
        """The prefill attention calls of ``items`` (``(sequence, first missed position, missed tokens)``):
        ``[(query rows, block_tables int32 [b, max_blocks], seq_lens int32 [b], cu_seqlens_q int32
        [b + 1])]`` on the device, each call at most ``PREFILL_CHUNK_TOKENS`` query rows (``m.q_fill``'s).
        A longer prompt is cut into chunks, each an entry of its own whose ``seq_lens`` ends at the chunk's
        last token: it attends to the prefix and the chunks before it (chunked prefill)."""
        cap, bs, dev = m.q_fill.shape[0], m.spec.block_size, self.device
        calls, slots, lens, cu = [], [], [], [0]

        def flush():
            if not slots:
                return
            width = -(-max(lens) // bs)  # only the blocks this call reads
            bt = torch.from_numpy(np.ascontiguousarray(m.bt[slots, :width])).to(dev, non_blocking=True)
            sl = torch.from_numpy(np.asarray(lens, dtype=np.int32)).to(dev, non_blocking=True)
            cq = torch.from_numpy(np.asarray(cu, dtype=np.int32)).to(dev, non_blocking=True)
            calls.append((cu[-1], bt, sl, cq))
            slots.clear()
            lens.clear()
            del cu[1:]

        for s, start, n in items:
            for off in range(0, n, cap):
                k = min(cap, n - off)
                if cu[-1] + k > cap:
                    flush()
                slots.append(s.slot)
                lens.append(start + off + k)
                cu.append(cu[-1] + k)
        flush()
        return calls

    def _decode(self, st: StepRecord) -> None:
        """One token per running sequence of every model: its slot (preempting when a pool is full),
        then ``append_kv`` and ``paged_decode_attention`` over every layer."""
        pc = time.perf_counter
        tm = pc()
        st.finished = self._take_finished()  # one-token outputs are done by their prefill
        for m in self.models.values():
            for s in list(m.running):
                if s.slot >= 0:
                    self._grow(s)
        # kept until the next step's decode replaces them, so that freeing these uploads is timed as
        # bookkeeping (memory), like making them, not as the step's other time
        launches = self._launches = [self._decode_inputs(m) for m in self.models.values() if m.running]
        st.memory_s += pc() - tm
        st.batch = sum(b for _, b, *_ in launches)
        if not launches:
            return
        tok = self.timer.start()
        for m, b, bt, lens, slots in launches:
            q, kn, vn = m.q[:b], m.k_new[:b], m.v_new[:b]
            for kc, vc in m.kv:
                self._append_kv(kn, vn, kc, vc, slots)
                self._attn(q, kc, vc, bt, lens)
        self.timer.stop(tok)
        st.decode_kernel_s = self.timer.collect()
        for m, b, *_ in launches:
            for s in m.running:
                s.generated += 1
            m.counts.decode_tokens += b

    def _complete(self, st: StepRecord) -> None:
        """Release the sequences that produced all their tokens (their prompt blocks stay cached)."""
        tc = time.perf_counter()
        st.finished += self._take_finished()
        st.memory_s += time.perf_counter() - tc

    def _compact(self, st: StepRecord) -> None:
        """Every ``compaction_check_every`` steps, compact each pool whose external fragmentation passes
        the threshold and whose live blocks, packed, would empty a chunk (timed apart from the step)."""
        cfg = self.cfg
        if cfg.compaction_threshold is None or self.metrics.steps % cfg.compaction_check_every:
            return
        for m in self.models.values():
            stats = m.pool.stats()
            # cached blocks count as fragmentation in the pool's figure but a compaction keeps them, so
            # it runs only when it can give chunks back
            if (stats["external_fragmentation"] > cfg.compaction_threshold
                    and reclaimable_chunks(stats, self.chunk_bytes) > 0):
                t0 = time.perf_counter()
                chunks, moved = self._compact_pool(m)
                self._sync()
                dt = time.perf_counter() - t0
                st.compaction_s += dt
                self.metrics.on_compaction(dt, chunks, moved)

    # ------------------------------------------------------------------------------ one sequence
    def _allocate(self, s: SequenceState, now: float) -> int | None:
        """Prefix lookup and allocation for ``s``'s context; its hit blocks, or None (pool unchanged)
        when it does not fit."""
        m, ctx = s.m, s.context_len
        try:
            cache = m.pool.request(ctx, block_hashes=s.keys if s.keys else None, request=s.req)
        except PoolExhaustedError:
            return None
        hit_blocks = cache.num_cached_tokens // m.spec.block_size
        s.cache, s.blocks = cache, cache.block_ids
        first = s.admissions == 0
        s.admissions += 1
        self._order += 1
        s.order = self._order
        if first:
            s.admitted_at = now
            s.lookup_blocks, s.hit_blocks = len(s.keys), hit_blocks
            self.metrics.on_lookup(m.counts, len(s.keys), hit_blocks)
        s.seq_len = ctx
        return hit_blocks

    def _write_prompt(self, s: SequenceState, hit_blocks: int) -> tuple[int, float]:
        """Write the K/V of ``s``'s missed tokens into every layer; ``(missed tokens, host seconds spent
        on the slot mapping)``."""
        m = s.m
        bs = m.spec.block_size
        start = hit_blocks * bs
        n = s.seq_len - start
        if n <= 0:
            return 0, 0.0
        t0 = time.perf_counter()
        pos = np.arange(start, s.seq_len)
        blocks = np.asarray(s.blocks, dtype=np.int64)
        slots = torch.from_numpy(blocks[pos // bs] * bs + pos % bs).to(self.device)
        mem = time.perf_counter() - t0
        tok = self.timer.start()
        c = m.k_fill.shape[0]
        for off in range(0, n, c):
            k = min(c, n - off)
            sl = slots[off:off + k]
            for kc, vc in m.kv:
                self._append_kv(m.k_fill[:k], m.v_fill[:k], kc, vc, sl)
        self.timer.stop(tok)
        return n, mem

    def _grow(self, s: SequenceState) -> bool:
        """One more token slot for ``s``; preempt (the latest admitted of its model first) when its pool
        has no block left. Returns False when ``s`` itself was preempted."""
        m = s.m
        cache = s.cache
        while True:
            before = cache.num_blocks
            try:
                cache.append(1)
            except PoolExhaustedError:
                victim = max(m.running, key=lambda r: r.order)
                self._preempt(victim)
                if victim is s:
                    return False
                continue
            if cache.num_blocks != before:
                new = cache.block_ids[before:]
                s.blocks.extend(new)
                m.bt[s.slot, len(s.blocks) - len(new):len(s.blocks)] = new
            s.seq_len += 1
            m.lens[s.slot] = s.seq_len
            return True

    def _decode_inputs(self, m: ModelBatch):
        """``(m, batch, block_tables int32 [b, max_blocks], seq_lens int32 [b], slot_mapping int64 [b])``
        on the device: each sequence's new token goes to the slot after its last one."""
        b, bs, dev = len(m.running), m.spec.block_size, self.device
        bt = torch.from_numpy(m.bt[:b]).to(dev, non_blocking=True)
        lens = torch.from_numpy(m.lens[:b]).to(dev, non_blocking=True)
        pos = m.lens[:b].astype(np.int64) - 1
        slots = torch.from_numpy(m.bt[np.arange(b), pos // bs].astype(np.int64) * bs
                                 + pos % bs).to(dev, non_blocking=True)
        return m, b, bt, lens, slots

    def _take_finished(self) -> list[SequenceState]:
        done = [s for m in self.models.values() for s in m.running if s.generated >= s.output_len]
        for s in done:
            self._finish(s)
        return done

    def _preempt(self, s: SequenceState) -> None:
        """Preemption by recompute: release ``s``'s blocks (its full prompt blocks stay cached) and put
        it back at the front of the queue."""
        s.m.pool.release(s.cache)
        s.cache, s.blocks = None, []
        s.preemptions += 1
        self.metrics.on_preempt(s.m.counts)
        self._remove_running(s)
        self.waiting.appendleft(s)

    def _finish(self, s: SequenceState) -> None:
        s.m.pool.release(s.cache)
        s.cache, s.blocks = None, []
        self._remove_running(s)
        self.metrics.on_finish(s.m.counts)

    # ------------------------------------------------------------------------------ pools
    def _compact_pool(self, m: ModelBatch, evict: bool = False) -> tuple[int, int]:
        """Compact ``m``'s pool (``evict``: its cached blocks go first) and refresh its running block
        tables (live blocks may have moved); ``(chunks given back, blocks moved)``."""
        pool = m.pool
        moved0 = pool.stats()["blocks_moved"]
        if evict:
            pool.evict()
        chunks = pool.compact()
        moved = pool.stats()["blocks_moved"] - moved0
        for s in m.running:
            s.blocks = s.cache.block_ids
            self._set_row(s)
        return chunks, moved

    def _reclaim_for(self, needy: ModelBatch, st: StepRecord) -> None:
        """The shared arena is held by the other pools: they drop their cached blocks and give back the
        chunks that empties (one timed compaction)."""
        t0 = time.perf_counter()
        chunks = moved = 0
        for m in self.models.values():
            if m is not needy:
                c, n = self._compact_pool(m, evict=True)
                chunks += c
                moved += n
        self._sync()
        dt = time.perf_counter() - t0
        st.compaction_s += dt
        self.metrics.on_compaction(dt, chunks, moved)

    def _pool_row(self) -> dict:
        return pool_figures({name: m.pool.stats() for name, m in self.models.items()}, self.arena_bytes)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def check_invariants(self) -> None:
        """Each pool's own invariants, and every running sequence's host row equal to its cache."""
        for m in self.models.values():
            m.pool.validate()
            for s in m.running:
                rid = s.req.request_id
                assert s.blocks == s.cache.block_ids, f"request {rid}: stale block table"
                assert s.seq_len == s.cache.seq_len, f"request {rid}: seq_len out of step"
                n = len(s.blocks)
                assert list(m.bt[s.slot, :n]) == s.blocks and m.lens[s.slot] == s.seq_len, \
                    f"request {rid}: host block table row out of step"

    # ------------------------------------------------------------------------------ the batch rows
    @staticmethod
    def _set_row(s: SequenceState) -> None:
        m = s.m
        m.bt[s.slot, :len(s.blocks)] = s.blocks
        m.lens[s.slot] = s.seq_len

    def _add_running(self, s: SequenceState) -> None:
        s.slot = len(s.m.running)
        s.m.running.append(s)
        self._set_row(s)

    def _remove_running(self, s: SequenceState) -> None:
        running = s.m.running
        last = running.pop()
        if last is not s:
            # keep rows [0, batch) dense: the last sequence takes the leaving one's row
            running[s.slot] = last
            last.slot = s.slot
            self._set_row(last)
        s.slot = -1

    def _num_running(self) -> int:
        return sum(len(m.running) for m in self.models.values())

    def _warm_up(self) -> None:
        """Compile the kernels the loop launches (Triton JIT-compiles on first use, seconds that would
        otherwise land in the first steps' timings), on scratch tensors laid out like the pool's views."""
        from ..ops import move_blocks
        dev = self.device
        for m in self.models.values():
            spec = m.pool.spec
            bs = spec.block_size
            # enough blocks for a 128-token prefill chunk (the prefill kernel's largest tile)
            nb = max(4, -(-128 // bs))
            scratch = torch.zeros((nb, *spec.block_shape), dtype=spec.dtype, device=dev)
            kc, vc = scratch[:, 0, 0], scratch[:, 0, 1]
            b = min(2, m.q.shape[0])
            bt = torch.tensor([[0, 1], [2, 3]][:b], dtype=torch.int32, device=dev)
            lens = torch.full((b,), 2 * bs - 1, dtype=torch.int32, device=dev)
            slots = torch.arange(b, dtype=torch.int64, device=dev)
            self._append_kv(m.k_new[:b], m.v_new[:b], kc, vc, slots)
            for splits in (1, 2):  # the loop may take either variant
                self._attn(m.q[:b], kc, vc, bt, lens, num_splits=splits)
            # the prefill kernel's tile size follows the rows per chunk: one chunk of 1, 2, 4 .. 128 tokens
            # compiles every variant
            pbt = torch.arange(nb, dtype=torch.int32, device=dev)[None]
            n = 1
            while n <= min(128, m.q_fill.shape[0]):
                self._prefill_attn(m.q_fill[:n], kc, vc, pbt, torch.tensor([n], dtype=torch.int32, device=dev),
                                   torch.tensor([0, n], dtype=torch.int32, device=dev))
                n *= 2
            move_blocks(scratch, torch.tensor([0], device=dev), torch.tensor([nb - 1], device=dev))
        self._sync()
