"""Random interleavings of request, append, fork, release, evict, shrink, grow and compact on two pools
sharing one arena (one with blocks straddling chunk boundaries, one with blocks spanning two chunks).

After every step: each pool's invariants (``validate``: free + used + cached == capacity, reference
counts equal holders, the prefix cache and the policy agree), the arena's chunk accounting, and every
live token's K/V bytes, written with ``append_kv`` through the pool's views, read back unchanged.
Prompt tokens carry K/V that depend only on their prefix, so a prefix-cache hit must read back exactly
what the first writer wrote, also after the block was moved by shrink or compaction.

``writes_during_compaction`` runs a writer thread (new values for tokens a cache holds alone) against a
thread that compacts or shrinks the same pool, in one of three interleavings: the compaction starts
while a write is paused between its slot mapping and its kernel; a write starts while the compaction
is paused between its move kernel and its block-table update; or both run free.
"""

import os
import threading

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, initialize, invariant, rule)

from _memory_helpers import assert_same, read_all, snapshot
from kvtriton import GPUMemoryAllocator, ModelSpec, PoolExhaustedError
from kvtriton import ops
from kvtriton.ops import backend

# 192-byte blocks in 256-byte chunks (straddling) and 512-byte blocks (two chunks each).
SPECS = {
    "a": ModelSpec(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32, block_size=3, name="a"),
    "b": ModelSpec(num_layers=1, num_kv_heads=2, head_dim=8, dtype=torch.float32, block_size=4, name="b"),
}
# Every online policy of the registry (Belady needs the future access sequence).
POLICIES = ["lru", "fifo", "lfu", "gdsf", "arc", "s3fifo", "sieve"]
BASES = [[7] * 40, list(range(40)), [3, 1, 4, 1, 5, 9, 2, 6] * 5]


def prefix_kv(spec, tokens, p):
    """K/V ``[L, 2, H, D]`` of prompt token ``p``: a function of ``tokens[:p+1]`` only."""
    g = torch.Generator().manual_seed(hash((spec.name, tuple(tokens[: p + 1]))) & 0x7FFFFFFF)
    return torch.randn(spec.num_layers, 2, spec.num_kv_heads, spec.head_dim, generator=g)


def write(cache, start, data):
    """Write ``data`` ``[L, 2, n, H, D]`` for tokens ``[start, start + n)``."""
    for layer in range(data.shape[0]):
        cache.write_kv(layer, data[layer, 0], data[layer, 1], start)


def private_runs(cache):
    """``(start, end)`` token runs of ``cache`` in blocks it holds alone and that carry no block hash
    (so no other cache, present or future, reads them): safe to overwrite with new values."""
    pool, bs = cache.pool, cache.pool.block_size
    runs = []
    for i, b in enumerate(cache.block_ids):
        lo, hi = i * bs, min((i + 1) * bs, cache.seq_len)
        if lo < hi and pool._ref[b] == 1 and pool._hash[b] is None:
            runs.append((lo, hi))
    return runs


WAIT = 20  # seconds; reached only by a deadlock


class PoolMachine(RuleBasedStateMachine):
    caches = Bundle("caches")

    def __init__(self):
        super().__init__()
        self._ctx = backend("reference")
        self._ctx.__enter__()
        self.alloc = GPUMemoryAllocator(devices=["cpu"], budget_bytes=24 * 256, chunk_bytes=256).start()
        self.pools = {}
        self.expected = {}   # cache -> [L, 2, seq_len, H, D]
        self.gen = torch.Generator().manual_seed(0)

    @initialize(policies=st.tuples(st.sampled_from(POLICIES), st.sampled_from(POLICIES)))
    def create_pools(self, policies):
        for (k, spec), policy in zip(SPECS.items(), policies):
            self.pools[k] = self.alloc.create_pool(k, spec, policy=policy)

    def teardown(self):
        self.alloc.close()
        self._ctx.__exit__(None, None, None)

    def _fail_unchanged(self, pool, fn):
        before = snapshot(pool)
        with pytest.raises((PoolExhaustedError, ValueError)):
            fn()
        assert_same(before, snapshot(pool))

    @rule(target=caches, which=st.sampled_from("ab"), base=st.integers(0, 2), n=st.integers(0, 20),
          hashed=st.booleans())
    def request(self, which, base, n, hashed):
        pool, spec = self.pools[which], SPECS[which]
        toks = BASES[base][:n]
        try:
            before = snapshot(pool)
            cache = pool.request(token_ids=toks) if hashed else pool.request(n)
        except PoolExhaustedError:
            assert_same(before, snapshot(pool))
            return None
        data = (torch.stack([prefix_kv(spec, toks, p) for p in range(n)], 2) if n else
                torch.zeros(spec.num_layers, 2, 0, spec.num_kv_heads, spec.head_dim))
        if hashed:
            assert cache.num_cached_tokens % spec.block_size == 0 or cache.num_cached_tokens == n
            # Prefill: only the tokens the prefix cache did not provide are computed and written.
            k = cache.num_cached_tokens
            write(cache, k, data[:, :, k:])
        else:
            write(cache, 0, data)
        self.expected[cache] = data
        return cache

    @rule(cache=caches, n=st.integers(1, 7))
    def append(self, cache, n):
        if cache is None or cache.released:
            return
        pool, spec = cache.pool, cache.pool.spec
        try:
            before = snapshot(pool)
            start = cache.seq_len
            cache.append(n)
        except PoolExhaustedError:
            assert_same(before, snapshot(pool))
            return
        data = torch.randn(spec.num_layers, 2, n, spec.num_kv_heads, spec.head_dim, generator=self.gen)
        write(cache, start, data)
        self.expected[cache] = torch.cat([self.expected[cache], data], 2)

    @rule(target=caches, cache=caches)
    def fork(self, cache):
        if cache is None or cache.released:
            return None
        child = cache.fork()
        self.expected[child] = self.expected[cache].clone()
        return child

    @rule(cache=consumes(caches))
    def release(self, cache):
        if cache is None or cache.released:
            return
        cache.release()
        del self.expected[cache]

    @rule(which=st.sampled_from("ab"), n=st.integers(0, 4))
    def evict(self, which, n):
        self.pools[which].evict(n)

    @rule(which=st.sampled_from("ab"), k=st.integers(1, 6), evict=st.booleans())
    def shrink(self, which, k, evict):
        pool = self.pools[which]
        held = pool.stats()["chunks_held"]
        before = snapshot(pool)
        try:
            pool.shrink(k, evict=evict)
        except (PoolExhaustedError, ValueError):
            assert_same(before, snapshot(pool))
            return
        assert pool.stats()["chunks_held"] == held - k

    @rule(which=st.sampled_from("ab"), k=st.integers(0, 4))
    def grow(self, which, k):
        pool = self.pools[which]
        free = self.alloc.arenas[torch.device("cpu")].free_chunks
        held = pool.stats()["chunks_held"]
        got = pool.grow(k)
        unit = pool.geometry.unit[0] if pool.geometry.unit else 1     # blocks spanning chunks come whole
        assert got <= min(-(-k // unit) * unit, free) and pool.stats()["chunks_held"] == held + got

    @rule(which=st.sampled_from("ab"), evict=st.booleans())
    def compact(self, which, evict):
        self.pools[which].compact(evict=evict)

    @rule(which=st.sampled_from("ab"))
    def give_back_empty_chunks(self, which):
        self.pools[which].release_free_chunks()

    @rule(which=st.sampled_from("ab"), mode=st.sampled_from(["write_first", "move_first", "free"]),
          pause_at=st.integers(0, 5), op=st.sampled_from(["compact", "compact_evict", "shrink"]),
          grow=st.integers(0, 2), n_append=st.integers(0, 3))
    def writes_during_compaction(self, which, mode, pause_at, op, grow, n_append):
        pool, spec = self.pools[which], SPECS[which]
        live = [c for c in self.expected if c.pool is pool][:3]
        for c in live:  # appends first, on this thread: the writer thread only writes
            if n_append:
                try:
                    c.append(n_append)
                except PoolExhaustedError:
                    continue
                self.expected[c] = torch.cat([self.expected[c], torch.full(
                    (spec.num_layers, 2, n_append, spec.num_kv_heads, spec.head_dim), float("nan"))], 2)
        if grow:
            pool.grow(grow)                 # free room, so the compaction has blocks to move
        plan = []                           # (cache, start, data [L, 2, n, H, D])
        for c in live:
            for lo, hi in private_runs(c):
                data = torch.randn(spec.num_layers, 2, hi - lo, spec.num_kv_heads, spec.head_dim,
                                   generator=self.gen)
                plan.append((c, lo, data))
        for c in live:                      # appended tokens must all be written by the plan
            assert not torch.isnan(self.expected[c]).any() or any(p[0] is c for p in plan)
        real_append, real_move = ops.append_kv, ops.move_blocks
        calls = [0]
        paused, resume, moved, go, blocked = (threading.Event() for _ in range(5))
        errors = []

        def paused_append(*args):
            if calls[0] == pause_at:
                paused.set()
                assert resume.wait(WAIT)
            calls[0] += 1
            real_append(*args)

        def paused_move(*args, **kw):
            real_move(*args, **kw)
            moved.set()
            assert go.wait(WAIT)

        def writer():
            try:
                with backend("reference"):
                    for c, lo, data in plan:
                        write(c, lo, data)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
            finally:
                paused.set()
                blocked.set()

        def mover():
            try:
                with backend("reference"):
                    if op == "shrink":
                        try:
                            pool.shrink(1, evict=True)
                        except (PoolExhaustedError, ValueError):
                            pass
                    else:
                        pool.compact(evict=op == "compact_evict")
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
            finally:
                moved.set()
                blocked.set()

        def on_wait(kind):
            if (mode == "write_first") == (kind == "exclusive"):
                blocked.set()

        moves = getattr(pool, "_moves", None)   # absent in a build without the moves lock
        if moves is not None:
            moves._on_wait = on_wait
        ops.append_kv = paused_append if mode == "write_first" else real_append
        ops.move_blocks = paused_move if mode == "move_first" else real_move
        try:
            w, m = threading.Thread(target=writer), threading.Thread(target=mover)
            if mode == "write_first":
                w.start()
                assert paused.wait(WAIT)    # a write holds its slots (or there was none to pause)
                m.start()
                assert blocked.wait(WAIT)   # the compaction waits for it (or is over)
                resume.set()
            elif mode == "move_first":
                m.start()
                assert moved.wait(WAIT)     # bytes moved, block tables not yet rewritten
                w.start()
                assert blocked.wait(WAIT)   # the writer waits for the compaction (or is done)
                go.set()
            else:
                resume.set()
                go.set()
                w.start()
                m.start()
            w.join(WAIT)
            m.join(WAIT)
            assert not w.is_alive() and not m.is_alive(), "deadlock"
        finally:
            resume.set()
            go.set()
            ops.append_kv, ops.move_blocks = real_append, real_move
            if moves is not None:
                moves._on_wait = None
        assert not errors, errors
        for c, lo, data in plan:
            self.expected[c][:, :, lo:lo + data.shape[2]] = data

    @invariant()
    def pools_are_consistent(self):
        if not self.pools:
            return
        arena = self.alloc.arenas[torch.device("cpu")]
        held = 0
        for pool in self.pools.values():
            pool.validate()
            s = pool.stats()
            assert s["free_blocks"] + s["used_blocks"] + s["cached_blocks"] == s["capacity_blocks"]
            held += s["chunks_held"]
        assert held + arena.free_chunks == arena.num_chunks
        assert arena.free_chunks == int((arena.owner == -1).sum())

    @invariant()
    def kv_bytes_survive(self):
        for cache, data in self.expected.items():
            assert cache.seq_len == data.shape[2]
            got = read_all(cache)
            assert torch.equal(got, data), f"cache {cache.cache_id} of pool {cache.pool.name}"


# KVTRITON_MACHINE_EXAMPLES raises the number of runs for a longer local soak.
PoolMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("KVTRITON_MACHINE_EXAMPLES", 100)), stateful_step_count=30, deadline=None,
    report_multiple_bugs=False, suppress_health_check=[HealthCheck.too_slow],
    phases=tuple(Phase) if os.environ.get("KVTRITON_MACHINE_SHRINK", "1") == "1"
    else (Phase.explicit, Phase.reuse, Phase.generate))
test_pool_machine = PoolMachine.TestCase
