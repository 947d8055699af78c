"""``CachePool.stats()`` keeps its figures as they change: every figure against a recomputation from
scratch through random interleavings of request (plain, with token ids, with block hashes whose last
block is partial, with max_tokens), append (with and without token ids), fork, release, evict, grow,
shrink, compact, release_free_chunks and raw block batches on two pools sharing one arena; the request
latency window against ``np.percentile``; and ``stats()`` reading no cache at all."""

import collections
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, rule

from _memory_helpers import BIG, ODD, SMALL, brute_stats
from kvtriton import GPUMemoryAllocator, ModelSpec, PoolExhaustedError
from kvtriton.memory.pool_stats import LatencyWindow
from kvtriton.ops import backend

SPECS = {
    "a": ModelSpec(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32, block_size=3, name="a"),
    "b": ModelSpec(num_layers=1, num_kv_heads=2, head_dim=8, dtype=torch.float32, block_size=4, name="b"),
}
EVENT_COUNTERS = ("requests", "releases", "forks")


class StatsMachine(RuleBasedStateMachine):
    caches = Bundle("caches")

    def __init__(self):
        super().__init__()
        self._ctx = backend("reference")
        self._ctx.__enter__()
        self.alloc = GPUMemoryAllocator(devices=["cpu"], budget_bytes=24 * 256, chunk_bytes=256).start()
        self.pools = {}
        self.ext = {"a": [], "b": []}
        self.events = {k: collections.Counter() for k in SPECS}

    @initialize(policies=st.tuples(st.sampled_from(["lru", "fifo", "arc"]), st.sampled_from(["lru", "s3fifo"])))
    def create_pools(self, policies):
        for (k, spec), policy in zip(SPECS.items(), policies):
            self.pools[k] = self.alloc.create_pool(k, spec, policy=policy)

    def teardown(self):
        self.alloc.close()
        self._ctx.__exit__(None, None, None)

    @rule(target=caches, which=st.sampled_from("ab"), n=st.integers(0, 14),
          kind=st.sampled_from(["plain", "tokens", "hashes", "hashes", "some_hashes", "max_tokens"]),
          base=st.integers(0, 1), hashed=st.integers(0, 5), extra=st.integers(0, 6))
    def request(self, which, n, kind, base, hashed, extra):
        pool = self.pools[which]
        nblocks = -(-n // pool.block_size)
        try:
            if kind == "plain":
                c = pool.request(n)
            elif kind == "tokens":
                c = pool.request(token_ids=[(base + i) % 3 for i in range(n)])
            elif kind.endswith("hashes"):
                # A hashed last block may be partial: shared with caches that hold it whole ("mixed").
                k = nblocks if kind == "hashes" else min(hashed, nblocks)
                c = pool.request(n, block_hashes=[(base, j) for j in range(k)])
            else:
                c = pool.request(n, max_tokens=n + extra)
        except PoolExhaustedError:
            return None
        self.events[which]["requests"] += 1
        return c

    @rule(target=caches, cache=caches, n=st.integers(0, 14))
    def request_sharing(self, cache, n):
        """A later request over ``cache``'s prefix (its block hashes), shorter or longer: a block that
        is partial in one cache may be whole in the other."""
        if cache is None or cache.released or not cache.block_hashes:
            return None
        pool = cache.pool
        try:
            c = pool.request(n, block_hashes=cache.block_hashes[: -(-n // pool.block_size)])
        except PoolExhaustedError:
            return None
        self.events[pool.name]["requests"] += 1
        return c

    @rule(cache=caches, n=st.integers(0, 6), with_ids=st.booleans())
    def append(self, cache, n, with_ids):
        if cache is None or cache.released:
            return
        try:
            if with_ids and cache._tail is not None:
                cache.append(n, token_ids=[n % 3] * n)
            else:
                cache.append(n)
        except (PoolExhaustedError, ValueError):
            pass

    @rule(target=caches, cache=caches)
    def fork(self, cache):
        if cache is None or cache.released:
            return None
        self.events[cache.pool.name]["forks"] += 1
        return cache.fork()

    @rule(cache=consumes(caches))
    def release(self, cache):
        if cache is None or cache.released:
            return
        cache.release()
        self.events[cache.pool.name]["releases"] += 1

    @rule(which=st.sampled_from("ab"), op=st.sampled_from(["evict", "grow", "shrink", "shrink_keep", "compact",
                                                         "compact_evict", "release_free_chunks"]),
          k=st.integers(0, 4))
    def capacity(self, which, op, k):
        pool = self.pools[which]
        try:
            if op == "evict":
                pool.evict(k)
            elif op == "grow":
                pool.grow(k)
            elif op.startswith("shrink"):
                pool.shrink(k, evict=op == "shrink")
            elif op.startswith("compact"):
                pool.compact(evict=op == "compact_evict")
            else:
                pool.release_free_chunks()
        except (PoolExhaustedError, ValueError):
            pass

    @rule(which=st.sampled_from("ab"), n=st.integers(0, 3), free=st.booleans())
    def raw_blocks(self, which, n, free):
        pool, held = self.pools[which], self.ext[which]
        if free and held:
            pool.free_blocks(held.pop())
            return
        try:
            held.append(pool.allocate_blocks(n))
        except PoolExhaustedError:
            pass

    @invariant()
    def stats_equal_a_recomputation(self):
        for name, pool in self.pools.items():
            s = pool.stats()
            want = brute_stats(pool)
            for k, v in want.items():
                assert s[k] == pytest.approx(v, rel=1e-12, abs=1e-15), (name, k, s[k], v)
            for k in EVENT_COUNTERS:
                assert s[k] == self.events[name][k], (name, k)
            assert s["hit_rate"] == pytest.approx(
                s["hit_blocks"] / (s["hit_blocks"] + s["miss_blocks"]) if s["hit_blocks"] + s["miss_blocks"] else 0.0)
            assert {k for k in s if k.startswith("alloc_latency")} == {
                f"alloc_latency_{q}" for q in ("p50_us", "p95_us", "p99_us", "mean_us")}
            pool.validate()


StatsMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("KVTRITON_MACHINE_EXAMPLES", 100)), stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_stats_machine = StatsMachine.TestCase


@settings(max_examples=200, deadline=None)
@given(window=st.integers(1, 40),
       ops=st.lists(st.one_of(st.lists(st.integers(0, 10**9), max_size=90), st.just("clear")), max_size=25))
def test_latency_window_equals_numpy_percentiles(window, ops):
    w = LatencyWindow(window)
    ref: collections.deque = collections.deque(maxlen=window)
    for op in ops:
        if op == "clear":
            w.clear()
            ref.clear()
        else:
            for v in op:
                w.add(v)
                ref.append(v)
        got = w.percentiles_us()
        if not ref:
            assert got == {"p50_us": 0.0, "p95_us": 0.0, "p99_us": 0.0, "mean_us": 0.0}
            continue
        a = np.array(tuple(ref), dtype=np.float64) / 1e3
        want = dict(zip(("p50_us", "p95_us", "p99_us"), np.percentile(a, (50, 95, 99)).tolist()))
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-12, abs=0), k
        assert got["mean_us"] == pytest.approx(float(a.mean()), rel=1e-12)
        assert w.count == len(ref)


def test_a_shared_partial_block_counts_once_at_its_fullest():
    """A hashed partial last block, then a request that holds it whole: no waste while the whole holder
    lives, the partial fill's waste again once it is gone."""
    with backend("reference"), GPUMemoryAllocator(devices=["cpu"], budget_bytes=64 << 10, chunk_bytes=4096) as alloc:
        pool = alloc.create_pool("p", SMALL)                     # 4 tokens a block
        a = pool.request(6, block_hashes=["x", "y"])              # block "y" holds 2 tokens
        assert pool.stats()["internal_fragmentation"] == pytest.approx(2 / 8)
        b = pool.request(8, block_hashes=["x", "y"])              # both blocks hit, held whole
        assert b.block_ids == a.block_ids and pool.stats()["internal_fragmentation"] == 0.0
        f = a.fork()
        assert pool.stats()["internal_fragmentation"] == 0.0
        b.release()
        assert pool.stats()["internal_fragmentation"] == pytest.approx(2 / 8)
        f.append(1)                                               # copy-on-write of the shared partial block
        assert pool.stats()["internal_fragmentation"] == pytest.approx((2 + 1) / 12)
        for c in (a, f):
            c.release()
        assert pool.stats()["internal_fragmentation"] == 0.0
        pool.validate()


@pytest.mark.parametrize("spec", [SMALL, ODD, BIG], ids=["aligned", "straddling", "two-chunk"])
def test_stats_reads_no_cache(spec):
    """The figures are kept, not recomputed: ``stats()`` never looks at a cache."""
    with backend("reference"), GPUMemoryAllocator(devices=["cpu"], budget_bytes=64 << 10, chunk_bytes=4096) as alloc:
        pool = alloc.create_pool("p", spec)
        caches = [pool.request(n) for n in (1, 5, 9, 13)]
        caches.append(caches[1].fork())
        want = brute_stats(pool)

        class Untouchable(dict):
            def values(self):
                raise AssertionError("stats() iterated the caches")

            __iter__ = items = values

        real = pool._caches
        pool._caches = Untouchable(real)
        try:
            s = pool.stats()
        finally:
            pool._caches = real
        assert {k: s[k] for k in want} == pytest.approx(want)
