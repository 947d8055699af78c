"""PagedEngine: many requests at once on a transformers model over one kvtriton pool.

Each step is one model forward over a packed row of variable-length chunks (vLLM-style unified batch):
the prompts admitted this step (their uncached suffix) and one token for every running sequence. The model
is called with ``input_ids [1, num_tokens]`` and per-token ``position_ids``; the ``"kvtriton"`` attention
reads the step's :class:`~kvtriton.hf.attention.StepBatch` (``cu_seqlens_q``, block tables, sequence
lengths, slot mapping), writes each layer's new K/V into the pages and runs ``paged_prefill_attention``, or
``paged_decode_attention`` when every chunk is one token.

* Continuous batching: finished sequences leave and waiting ones join at every step, up to ``max_num_seqs``
  running and ``max_batch_tokens`` tokens per step (a prompt longer than that runs alone; there is no
  chunked prefill across steps).
* Prefix caching: a request's blocks are taken with ``pool.request(token_ids=...)``, so full blocks already
  in the pool's prefix cache (by chained block hash) are shared and only the uncached suffix is computed;
  its K/V never gets written again. A request whose whole prompt is cached recomputes its last token's
  query (to get its logits) without writing that token's K/V. Blocks registered by a request admitted in
  the same step are written by that step's forward before any layer reads them (each layer appends every
  token's K/V before attending).
* Eviction: finished sequences' blocks stay cached; the pool evicts them in its policy's order when it
  needs room.
* Preemption by recompute: when a running sequence cannot grow, the newest running sequence gives its
  blocks back and goes to the front of the queue with its generated tokens appended to its prompt; it is
  prefilled again later (hitting whatever of its blocks are still cached).

Greedy decoding by default (token identical to ``model.generate`` on the unmodified model in float32);
``do_sample=True`` samples with ``temperature``/``top_k`` from a seeded generator. :meth:`PagedEngine.score`
gives teacher-forced log-probabilities (perplexity).

Token eviction (``token_eviction=``, :mod:`kvtriton.hf.token_evict`): a strategy from
:mod:`kvtriton.token_eviction` keeps a budget of tokens per sequence and per layer (per-head budgets are not
supported: the kernels take one length per sequence and layer), with scores from the attention kernels'
log-sum-exp (``ops.paged_attention_scores``). Such sequences do not use the prefix cache.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..checks import check_int, check_number, is_int
from ..errors import PoolExhaustedError
from .attention import ATTN_IMPLEMENTATION, StepBatch, register_paged_attention, scoped_batch
from .cache import model_pool, pool_max_blocks
from .support import check_model
from .token_evict import make_evictor

__all__ = ["PagedEngine"]


@dataclass
class _Seq:
    rid: int                      # position in the prompts of generate()
    tokens: list                  # prompt + generated tokens
    prompt_len: int
    max_new: int
    generated: list = field(default_factory=list)
    cache: object = None          # VirtualKVCache while running
    preemptions: int = 0
    hit_tokens: int | None = None  # prefix-cache hit of the first admission
    forced: list | None = None    # score(): the target tokens fed instead of sampled ones
    logprobs: list = field(default_factory=list)
    # serve(): simulated-clock times in seconds
    arrival: float = 0.0
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None


def _ns() -> int:
    return time.perf_counter_ns()


class PagedEngine:
    """Continuous batching with prefix caching, eviction and preemption over a kvtriton pool (see the module
    docstring).

    Args:
        model: a ``transformers`` causal LM (checked with :func:`~kvtriton.hf.check_model`).
        budget_bytes: bytes of the KV arena the engine creates (default: the allocator's: 1 GiB on CPU, 90%
            of free memory on CUDA). Ignored when ``pool`` is given.
        num_blocks: size the arena in blocks instead (at least this many; not with ``budget_bytes``).
        block_size: tokens per block (a power of two in [1, 256]); prefix caching shares whole blocks.
        policy: the pool's eviction policy, a name from ``kvtriton.policies`` (``"lru"``, ``"s3fifo"``, ...).
        max_num_seqs: most sequences running at once.
        max_batch_tokens: most tokens per step (prompt chunks plus one per running sequence).
        pool: run on this :class:`~kvtriton.CachePool` (its spec must match the model).
        device: where the pages live (default: the model's device).
        profile: synchronize CUDA around the timed sections so that ``stats()`` splits device time
            correctly (no effect on CPU, where timing is always synchronous).
        token_eviction: None (full cache), a name from
            ``kvtriton.token_eviction.available_token_strategies()`` or a ``TokenEvictionStrategy``; an unknown
            name raises ValueError listing the valid ones.
        token_budget: tokens each layer of a sequence keeps: a fraction in (0, 1] of the tokens it has seen
            (1.0 keeps everything) or an int count; never below the strategy's sink + window (refused).
            Budgets are per sequence and per layer; per-head budgets are not supported.
        token_eviction_kwargs: keyword arguments of the strategy's constructor (``sink``, ``window``, ...).
        pyramid: split the total budget across layers (PyramidKV, ``pyramid_budgets``).
        evict_every: continuous strategies cut a layer back to its budget once it holds this many tokens
            more (default: ``block_size``).
    """

    def __init__(self, model, *, budget_bytes: int | None = None, block_size: int = 16, policy="lru",
                 max_num_seqs: int = 64, max_batch_tokens: int = 2048, pool=None, device=None,
                 num_blocks: int | None = None, profile: bool = False, token_eviction=None, token_budget=1.0,
                 token_eviction_kwargs: dict | None = None, pyramid: bool = False, evict_every: int | None = None):
        layout = check_model(model)
        for name, v in (("max_num_seqs", max_num_seqs), ("max_batch_tokens", max_batch_tokens)):
            check_int(name, v, 1)
        check_int("block_size", block_size, 1, 256)
        self._evictor = make_evictor(layout, block_size, token_eviction, token_budget, token_eviction_kwargs,
                                     pyramid, evict_every)
        register_paged_attention()
        self.model = model
        self.layout = layout
        self.spec, self._allocator, pool = model_pool(
            model, layout, block_size=block_size, pool=pool, device=device, budget_bytes=budget_bytes,
            num_blocks=num_blocks, policy=policy, name="hf-engine")
        self.pool = pool
        if self._evictor is not None:
            self._evictor.bind(pool)
        self.device = pool.device
        self.block_size = block_size
        self.max_blocks = pool_max_blocks(pool)
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.profile = bool(profile) and self.device.type == "cuda"
        self._closed = False
        self.reset_stats()

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens=32, *, eos_token_id=None,
                 ignore_eos: bool = False, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, seed: int | None = None) -> list[list[int]]:
        """Generate for every prompt (a list of token ids); returns each request's new token ids.

        ``max_new_tokens``: an int, or one per prompt. A request stops at ``max_new_tokens`` or at an end
        token (``eos_token_id``: an int or ints, default the model's ``generation_config.eos_token_id``; the
        end token is included in the output, as ``model.generate`` does), unless ``ignore_eos``.
        Greedy unless ``do_sample``. Everything is checked before any work: a prompt that is empty, holds an
        id outside the vocabulary, or needs more blocks than the pool can ever hold (prompt plus
        ``max_new_tokens``) raises ValueError naming it, and nothing runs.
        """
        if self._closed:
            raise RuntimeError("this PagedEngine is closed")
        seqs = self._validate(prompts, max_new_tokens)
        eos = set() if ignore_eos else self._eos_set(eos_token_id)
        if do_sample:
            if not (isinstance(temperature, (int, float)) and temperature > 0):
                raise ValueError(f"temperature must be > 0, got {temperature!r}")
            check_int("top_k", top_k, 1, allow_none=True)
        gen = None
        if do_sample:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(0 if seed is None else int(seed))
        sampling = (do_sample, float(temperature), top_k, gen)
        outputs = self._begin(seqs, waiting=seqs)
        with self._run():
            while self._waiting or self._running:
                self._step(outputs, eos, sampling)
        return outputs

    def serve(self, prompts: Sequence[Sequence[int]], max_new_tokens, arrivals: Sequence[float], *,
              eos_token_id=None, ignore_eos: bool = True, on_step=None) -> list[dict]:
        """Serve requests that arrive over time, on a simulated clock; returns a record per request.

        Request ``i`` (``prompts[i]``, ``max_new_tokens[i]`` or an int for all) joins the queue when the clock
        reaches ``arrivals[i]`` (seconds, >= 0). The clock starts at 0, advances by each step's measured wall
        time, and jumps to the next arrival when nothing runs; so queueing, time to first token and step times
        are the model's real ones. Greedy decoding; ``ignore_eos`` (default) generates exactly
        ``max_new_tokens`` (a trace's output length). ``on_step``: called after every step with ``{step, time_s,
        step_s, seqs, tokens, prefill_tokens, running, waiting, finished}``.

        Each record (in request order): ``tokens`` (the new token ids), ``arrival_s``, ``admitted_s`` (first
        admission), ``first_token_s``, ``finished_s``, ``prompt_tokens``, ``hit_tokens`` (prefix-cache hit
        at the first admission), ``preemptions``. Inputs are checked as :meth:`generate` checks them.
        """
        if self._closed:
            raise RuntimeError("this PagedEngine is closed")
        seqs = self._validate(prompts, max_new_tokens)
        if isinstance(arrivals, torch.Tensor) or len(arrivals) != len(seqs):
            raise ValueError(f"arrivals must be a list of {len(seqs)} arrival times (one per prompt)")
        for i, a in enumerate(arrivals):
            seqs[i].arrival = check_number(f"arrivals[{i}]", a, 0, allowed="a finite time >= 0 (seconds)")
        eos = set() if ignore_eos else self._eos_set(eos_token_id)
        outputs = self._begin(seqs, waiting=())
        pending = deque(sorted(seqs, key=lambda q: (q.arrival, q.rid)))
        now, done = 0.0, 0
        with self._run():
            while pending or self._waiting or self._running:
                while pending and pending[0].arrival <= now:
                    self._waiting.append(pending.popleft())
                if not self._waiting and not self._running:
                    now = pending[0].arrival
                    continue
                active = list(self._running) + list(self._waiting)
                self._step(outputs, eos, (False, 1.0, None, None))
                start, now = now, now + self._step_ns[-1] / 1e9
                for q in active:
                    if q.admitted_at is None and q.hit_tokens is not None:
                        q.admitted_at = start
                    if q.first_token_at is None and q.generated:
                        q.first_token_at = now
                    if q.finished_at is None and outputs[q.rid] is not None:
                        q.finished_at = now
                        done += 1
                if on_step is not None:
                    _, b, t, p, queued = self._step_log[-1]
                    on_step(dict(step=len(self._step_ns), time_s=now, step_s=self._step_ns[-1] / 1e9, seqs=b,
                                 tokens=t, prefill_tokens=p, running=len(self._running),
                                 waiting=len(self._waiting), finished=done))
        return [dict(tokens=outputs[q.rid], arrival_s=q.arrival, admitted_s=q.admitted_at,
                     first_token_s=q.first_token_at, finished_s=q.finished_at, prompt_tokens=q.prompt_len,
                     hit_tokens=q.hit_tokens, preemptions=q.preemptions) for q in seqs]

    def score(self, prompt_ids: Sequence[int], target_ids: Sequence[int]) -> torch.Tensor:
        """float64 ``[len(target_ids)]``: the log-probability of each target token, teacher-forced: the prompt
        is prefilled, then each target is fed as the next decode step's token, under the engine's eviction
        exactly as :meth:`generate` applies it (so ``-mean`` is the targets' log-perplexity). Inputs are
        checked as :meth:`generate` checks them (ValueError naming them, before any work)."""
        if self._closed:
            raise RuntimeError("this PagedEngine is closed")
        if isinstance(target_ids, torch.Tensor):
            target_ids = target_ids.tolist()
        if not isinstance(target_ids, (list, tuple)) or not target_ids:
            raise ValueError("target_ids must be a non-empty list of token ids")
        vocab = self.layout.vocab_size
        for j, t in enumerate(target_ids):
            if not is_int(t) or t < 0 or (vocab and t >= vocab):
                raise ValueError(f"target_ids[{j}] = {t!r} is not a token id in [0, {vocab})")
        seqs = self._validate([prompt_ids], len(target_ids))
        seqs[0].forced = [int(t) for t in target_ids]
        outputs = self._begin(seqs, waiting=seqs)
        with self._run():
            while self._waiting or self._running:
                self._step(outputs, set(), (False, 1.0, None, None))
        return torch.tensor(seqs[0].logprobs, dtype=torch.float64)

    def stats(self) -> dict:
        """Counters and timings since construction (or :meth:`reset_stats`), plus the pool's.

        ``prefill_tokens`` were computed for prompts (re-admissions after preemption included),
        ``prefix_hit_tokens`` were served from the prefix cache instead (``tokens_saved``), ``hit_rate`` is
        their share of the prompt tokens admitted; ``generated_tokens``, ``preemptions``,
        ``recomputed_tokens`` (prefill of preempted sequences), ``evictions`` (cached blocks the pool
        evicted). Times in seconds: ``model_s`` (the forwards less attention), ``attention_s`` (K/V appends
        and the paged kernels), ``memory_s`` (pool requests, appends, releases, block tables and slot
        mappings), ``sampling_s``; ``step_ms_*`` per step; ``tokens_per_s`` generated per second of
        ``total_s``. KV held, summed over layers: ``kv_tokens_held`` (now) and ``kv_tokens_held_peak``,
        ``kv_tokens_per_layer(_peak)`` (their layer average), ``kv_bytes_held(_peak)``. With token eviction
        also: ``kv_bytes_read`` by attention against ``kv_bytes_read_full`` (a full cache; quest reads
        less) and ``kv_read_fraction``, ``score_ns``/``score_s`` (scoring), ``compact_ns``/``compact_s``
        (selection and compaction), ``tokens_evicted`` (over layers), ``blocks_returned`` (to the pool), the strategy.
        """
        s = dict(self._stats)
        ns = {k: s.pop(k) for k in list(s) if k.endswith("_ns")}
        steps = self._step_ns
        out = dict(s)
        for k, v in ns.items():
            out[k[:-3] + "_s"] = v / 1e9
        out["model_s"] = max(0.0, (ns["forward_ns"] - ns["attention_ns"]) / 1e9)
        out.pop("forward_s")
        adm = s["prefill_tokens"] + s["prefix_hit_tokens"]
        out["tokens_saved"] = s["prefix_hit_tokens"]
        out["hit_rate"] = s["prefix_hit_tokens"] / adm if adm else 0.0
        out["steps"] = len(steps)
        if steps:
            ms = sorted(x / 1e6 for x in steps)
            out.update(step_ms_mean=statistics.fmean(ms), step_ms_p50=ms[len(ms) // 2],
                       step_ms_p90=ms[min(len(ms) - 1, int(0.9 * len(ms)))], step_ms_max=ms[-1])
        total = ns["total_ns"] / 1e9
        out["tokens_per_s"] = s["generated_tokens"] / total if total > 0 else 0.0
        p = self.pool.stats() if not self.pool.closed else {}
        out["evictions"] = p.get("evictions", 0) - self._evictions0
        out["pool"] = {k: p[k] for k in ("capacity_blocks", "used_blocks", "cached_blocks", "free_blocks",
                                         "block_bytes", "hit_rate", "evictions", "chunks_held") if k in p}
        running = getattr(self, "_running", [])
        if self._evictor is not None:
            out.update(self._evictor.stats(running))
        else:
            L, tb = self.layout.num_layers, self.spec.bytes_per_block // self.block_size
            held = sum(q.cache.seq_len for q in running if q.cache is not None) * L
            out.update(kv_tokens_held=held, kv_tokens_per_layer=held / L, kv_bytes_held=held * tb // L,
                       kv_tokens_held_peak=self._kv_peak, kv_tokens_per_layer_peak=self._kv_peak / L,
                       kv_bytes_held_peak=self._kv_peak * tb // L)
        return out

    def step_log(self) -> list[dict]:
        """One dict per step since :meth:`reset_stats`: ``ms`` (wall time), ``seqs`` (sequences in the
        forward), ``tokens`` (tokens in the forward), ``prefill_tokens`` (in chunks of more than one token),
        ``queued`` (requests running or waiting after the step)."""
        return [dict(ms=ns / 1e6, seqs=b, tokens=t, prefill_tokens=p, queued=q)
                for ns, b, t, p, q in self._step_log]

    def reset_stats(self) -> None:
        self._stats = dict(requests=0, finished=0, prompt_tokens=0, prefill_tokens=0, prefix_hit_tokens=0,
                           prefix_hit_requests=0, admissions=0, generated_tokens=0, decode_tokens=0,
                           preemptions=0, recomputed_tokens=0, max_running=0, total_ns=0, forward_ns=0,
                           attention_ns=0, memory_ns=0, sampling_ns=0)
        self._step_ns: list[int] = []
        self._step_log: list[tuple] = []
        p = self.pool.stats() if not self.pool.closed else {}
        self._evictions0 = p.get("evictions", 0)
        self._kv_peak = 0
        if self._evictor is not None:
            self._evictor.reset_stats()

    def close(self) -> None:
        """Close the arena the engine created (a given pool is left open); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._allocator is not None:
            self._allocator.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        return (f"PagedEngine(model={self.layout.model_type!r}, block_size={self.block_size}, "
                f"max_blocks={self.max_blocks}, policy={getattr(self.pool, 'policy_name', '?')!r})")

    # ------------------------------------------------------------------ checks
    def _begin(self, seqs: list[_Seq], waiting) -> list:
        """Queue ``waiting`` (the rest arrive later), count the requests; the outputs list to fill."""
        self._waiting = deque(waiting)
        self._running: list[_Seq] = []
        self._stats["requests"] += len(seqs)
        self._stats["prompt_tokens"] += sum(s.prompt_len for s in seqs)
        return [None] * len(seqs)

    @contextlib.contextmanager
    def _run(self):
        """Steps run inside: the model on kvtriton's attention (restored after), no autograd, a failure
        aborts every request (pool left clean), and the time counts to ``total_ns``."""
        model = self.model
        old_impl = model.config._attn_implementation
        t_start = _ns()
        try:
            if old_impl != ATTN_IMPLEMENTATION:
                model.set_attn_implementation(ATTN_IMPLEMENTATION)
            with torch.inference_mode():
                yield
        except BaseException:
            self._abort()
            raise
        finally:
            if old_impl != ATTN_IMPLEMENTATION:
                model.set_attn_implementation(old_impl)
            self._stats["total_ns"] += _ns() - t_start

    def _validate(self, prompts, max_new_tokens) -> list[_Seq]:
        if isinstance(prompts, torch.Tensor) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id lists (pad-free, one per request)")
        n = len(prompts)
        if isinstance(max_new_tokens, (list, tuple)):
            if len(max_new_tokens) != n:
                raise ValueError(f"max_new_tokens has {len(max_new_tokens)} entries for {n} prompts")
            news = list(max_new_tokens)
        else:
            news = [max_new_tokens] * n
        for i, m in enumerate(news):
            check_int(f"max_new_tokens[{i}]", m, 1)
        vocab = self.layout.vocab_size
        bs = self.block_size
        seqs = []
        for i, p in enumerate(prompts):
            if isinstance(p, torch.Tensor):
                if p.dim() != 1:
                    raise ValueError(f"prompts[{i}] must be 1-D token ids, got shape {tuple(p.shape)}")
                p = p.tolist()
            if not isinstance(p, (list, tuple)) or not p:
                raise ValueError(f"prompts[{i}] must be a non-empty list of token ids, got {type(p).__name__} "
                                 f"of length {len(p) if hasattr(p, '__len__') else '?'}")
            ids = []
            for j, t in enumerate(p):
                if not is_int(t) or t < 0 or (vocab and t >= vocab):
                    raise ValueError(f"prompts[{i}][{j}] = {t!r} is not a token id in [0, {vocab})")
                ids.append(int(t))
            need_tokens = len(ids) + news[i] - 1      # the last new token's K/V is never written
            need = -(-need_tokens // bs)
            if need > self.max_blocks:
                raise ValueError(
                    f"prompts[{i}] needs {need} blocks of {bs} tokens ({len(ids)} prompt + {news[i]} new tokens) "
                    f"but the pool can hold at most {self.max_blocks} blocks ({self.max_blocks * bs} tokens); "
                    "raise budget_bytes or shorten the request")
            if self._evictor is not None:
                self._evictor.check_prompt(i, len(ids))
            seqs.append(_Seq(i, ids, len(ids), news[i]))
        return seqs

    def _eos_set(self, eos_token_id) -> set:
        if eos_token_id is None:
            gc = getattr(self.model, "generation_config", None)
            eos_token_id = getattr(gc, "eos_token_id", None) if gc is not None else None
            if eos_token_id is None:
                eos_token_id = getattr(self.model.config, "eos_token_id", None)
        if eos_token_id is None or eos_token_id is False:
            return set()
        if isinstance(eos_token_id, int):
            return {eos_token_id}
        return {int(t) for t in eos_token_id}

    # ------------------------------------------------------------------ scheduling
    def _preempt(self, seq: _Seq) -> None:
        seq.cache.release()
        seq.cache = None
        seq.preemptions += 1
        self._stats["preemptions"] += 1
        self._waiting.appendleft(seq)

    def _schedule(self) -> list:
        """Grow every running sequence by its pending token (preempting the newest when the pool is full),
        then admit waiting requests; returns ``[(seq, start, num_tokens, first_written)]``."""
        sched = []
        running = self._running
        i = 0
        while i < len(running):
            seq = running[i]
            try:
                seq.cache.append(1, token_ids=seq.tokens[-1:])
            except PoolExhaustedError:
                # The newest sequence has not grown this step (sequences grow oldest first), so its blocks
                # hold only K/V already written: they can be released (and stay cached) safely.
                self._preempt(running.pop())
                continue
            pos = len(seq.tokens) - 1
            sched.append((seq, pos, 1, pos))
            self._stats["decode_tokens"] += 1
            i += 1
        budget = self.max_batch_tokens - len(sched)
        waiting = self._waiting
        while waiting and len(running) < self.max_num_seqs:
            seq = waiting[0]
            n = len(seq.tokens)
            if sched and n > budget:
                break
            try:
                cache = (self.pool.request(token_ids=seq.tokens) if self._evictor is None
                         else self._evictor.admit(seq.tokens))
            except PoolExhaustedError:
                if not sched and not running:
                    raise RuntimeError(
                        f"request {seq.rid} ({n} tokens) does not fit in the pool even with nothing running "
                        f"(capacity {self.pool.stats().get('capacity_blocks')} blocks now, at most "
                        f"{self.max_blocks}); another pool on the arena may hold its memory") from None
                break
            waiting.popleft()
            seq.cache = cache
            hit = cache.num_cached_tokens
            start = min(hit, n - 1)          # at least the last token is computed, for its logits
            sched.append((seq, start, n - start, hit))
            running.append(seq)
            budget -= n - start
            st = self._stats
            st["admissions"] += 1
            st["prefill_tokens"] += n - start
            st["prefix_hit_tokens"] += start
            st["prefix_hit_requests"] += hit > 0
            if seq.hit_tokens is None:
                seq.hit_tokens = hit
            if seq.preemptions:
                st["recomputed_tokens"] += n - start
        self._stats["max_running"] = max(self._stats["max_running"], len(running))
        return sched

    def _step(self, outputs, eos, sampling) -> None:
        t0 = _ns()
        sched = self._schedule()
        if not sched:                          # nothing could run: only possible with nothing running
            raise RuntimeError("the engine could not schedule any request")
        pool, dev = self.pool, self.device
        ids, pos, counts = [], [], []
        for seq, start, n, written in sched:
            ids.extend(seq.tokens[start:start + n])
            pos.extend(range(start, start + n))
            counts.append(n)
        cu = torch.zeros(len(sched) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(counts, dtype=torch.int32).cumsum(0)
        last = (cu[1:] - 1).to(torch.long)
        input_ids = torch.tensor(ids, dtype=torch.long).to(dev)[None]
        position_ids = torch.tensor(pos, dtype=torch.long).to(dev)[None]
        with pool.stable_blocks():           # block ids taken here stay valid until the forward is done
            batch = self._batch(sched, cu, all(n == 1 for n in counts))
            self._sync()
            t1 = _ns()
            with scoped_batch(batch):
                out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                 logits_to_keep=last.to(dev))
            logits = out.logits[0].float()
            self._sync()
            t2 = _ns()
        if self._evictor is not None:
            self._evictor.end_step(sched)
        nxt = self._sample(logits, sampling)
        for i, (seq, _, _, _) in enumerate(sched):
            if seq.forced is not None:       # score(): the target is the next token; keep its log-probability
                nxt[i] = seq.forced[len(seq.generated)]
                seq.logprobs.append(float(torch.log_softmax(logits[i].double(), -1)[nxt[i]]))
        t3 = _ns()
        st = self._stats
        st["forward_ns"] += t2 - t1
        st["attention_ns"] += batch.attention_ns
        st["sampling_ns"] += t3 - t2
        for (seq, start, n, written), tok in zip(sched, nxt):
            seq.tokens.append(tok)
            seq.generated.append(tok)
            st["generated_tokens"] += 1
            if len(seq.generated) >= seq.max_new or tok in eos:
                seq.cache.release()
                seq.cache = None
                self._running.remove(seq)
                outputs[seq.rid] = seq.generated
                st["finished"] += 1
        t4 = _ns()
        st["memory_ns"] += (t1 - t0) + (t4 - t3)
        self._step_ns.append(t4 - t0)
        self._step_log.append((t4 - t0, len(sched), len(ids), sum(n for _, _, n, _ in sched if n > 1),
                               len(self._running) + len(self._waiting)))

    def _batch(self, sched, cu, decode_only: bool) -> StepBatch:
        """The step's attention metadata (inside ``pool.stable_blocks()``)."""
        if self._evictor is not None:
            return self._evictor.step_batch(sched, cu, decode_only)
        slots = []
        for seq, start, n, written in sched:
            sm = seq.cache.slot_mapping(start, start + n)
            if written > start:            # already in the pages (prefix hit): read, never rewritten
                sm[: written - start] = -1
            slots.append(sm)
        tables, lens = self.pool.batch_tensors([s[0].cache for s in sched])
        held = sum(q.cache.seq_len for q in self._running) * self.layout.num_layers
        self._kv_peak = max(self._kv_peak, held)
        return StepBatch(self.pool, torch.cat(slots), tables, lens, cu.to(self.device), decode_only=decode_only,
                         num_layers=self.layout.num_layers)

    def _sample(self, logits, sampling) -> list[int]:
        do_sample, temperature, top_k, gen = sampling
        if not do_sample:
            return logits.argmax(-1).tolist()
        scores = logits / temperature
        if top_k is not None and top_k < scores.shape[-1]:
            kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=gen).squeeze(1).tolist()

    def _sync(self) -> None:
        if self.profile:
            torch.cuda.synchronize(self.device)

    def _abort(self) -> None:
        """After a failed step: give back every running sequence's blocks and drop the prefix cache, whose
        newest blocks may have been registered without their K/V being written."""
        try:
            for seq in self._running:
                if seq.cache is not None and not seq.cache.released:
                    seq.cache.release()
                seq.cache = None
            self._running = []
            self._waiting = deque()
            if not self.pool.closed:
                self.pool.evict()
        except Exception:  # pragma: no cover - the original error matters more
            pass
