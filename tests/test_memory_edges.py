"""Edge cases of the memory manager: bad input is refused before anything changes (with the argument
and its allowed range named), closed pools/allocators/arenas refuse every use, chunk ownership only
changes under the arena's lock, and ``GPUMemoryAllocator.stats()`` is one consistent snapshot."""

import sys
import threading
import time

import numpy as np
import pytest
import torch

from _memory_helpers import BIG, ODD, SMALL, assert_same, fill_random, read_all, snapshot
from kvtriton import GPUMemoryAllocator, PoolExhaustedError, errors
from kvtriton.memory import Arena, CachePool, block_hashes_from_tokens, expand_hash_ids
from kvtriton.ops import backend


@pytest.fixture(autouse=True)
def _reference_ops():
    with backend("reference"):
        yield


@pytest.fixture
def alloc():
    with GPUMemoryAllocator(devices=["cpu"], budget_bytes=64 << 10, chunk_bytes=4096) as a:
        yield a


@pytest.fixture
def fast_switching():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


# ---------------------------------------------------------------------------------------- block hashes
@pytest.mark.parametrize("hashes, index", [([None], 0), ([5, None], 1), ([5, [1]], 1), ([5, {}], 1),
                                           ([3, 4, 3], 2)], ids=["none", "none-later", "list", "dict",
                                                                 "duplicate"])
def test_block_hashes_refuse_none_unhashable_and_repeats(alloc, hashes, index):
    pool = alloc.create_pool("p", SMALL)
    keep = pool.request(12, block_hashes=[11, 12])
    keep.release()
    pool.validate()
    before = snapshot(pool)
    with pytest.raises(ValueError, match=rf"block_hashes\[{index}\]"):
        pool.request(12, block_hashes=hashes)
    assert_same(before, snapshot(pool))
    pool.validate()


def test_none_hash_cannot_make_two_live_caches_share_a_block(alloc):
    """The report's sequence: with ``None`` accepted, a freed block stayed in the prefix cache."""
    pool = alloc.create_pool("p", SMALL)
    with pytest.raises(ValueError, match=r"block_hashes\[0\]"):
        a = pool.request(4, block_hashes=[None])
        a.release()
        b = pool.request(4)
        c = pool.request(4, block_hashes=[None])
        assert set(b.block_ids).isdisjoint(c.block_ids)
    pool.validate()


def test_block_hashes_must_be_a_sequence_of_hashes(alloc):
    pool = alloc.create_pool("p", SMALL)
    before = snapshot(pool)
    with pytest.raises(ValueError, match="block_hashes"):
        pool.request(8, block_hashes="ab")
    with pytest.raises(ValueError, match="block_hashes"):
        pool.request(8, block_hashes=7)
    assert_same(before, snapshot(pool))


# ---------------------------------------------------------------------------------------- token ids
@pytest.mark.parametrize("bad", ["x", None, 2.5, True, [1]], ids=["str", "none", "float", "bool", "list"])
def test_append_with_bad_token_ids_changes_nothing(alloc, bad):
    pool = alloc.create_pool("p", SMALL)
    a = pool.request(token_ids=[1, 2, 3])
    data = fill_random(a, 0, 3)
    before = snapshot(pool)
    hashes_before, tail_before = a.block_hashes, list(a._tail)
    with pytest.raises(ValueError, match=r"token_ids\[1\]"):
        a.append(2, token_ids=[4, bad])
    assert_same(before, snapshot(pool))
    assert a.seq_len == 3 and a.block_hashes == hashes_before and a._tail == tail_before
    a.append(2, token_ids=[4, 5])                        # nothing bad stayed buffered
    assert a.seq_len == 5 and a.block_hashes == block_hashes_from_tokens([1, 2, 3, 4, 5], 4)
    assert torch.equal(read_all(a)[:, :, :3], data)
    b = pool.request(token_ids=[1, 2, 3, 4, 9])
    assert b.num_cached_tokens == 4
    pool.validate()


def test_request_with_bad_token_ids_changes_nothing(alloc):
    pool = alloc.create_pool("p", SMALL)
    before = snapshot(pool)
    for bad in (["a"] * 9, [1, 2, None], [1.5], [np.float32(2)]):
        with pytest.raises(ValueError, match=r"token_ids\["):
            pool.request(token_ids=bad)
    assert_same(before, snapshot(pool))
    c = pool.request(token_ids=[np.int64(3)] * 5)        # numpy integers are integers
    assert c.seq_len == 5
    pool.validate()


# ---------------------------------------------------------------------------------------- bools as ints
def test_bools_are_not_ints(alloc):
    pool = alloc.create_pool("p", SMALL)
    a = pool.request(4)                                  # one block
    ext = pool.allocate_blocks(3)
    assert 1 in ext                                      # the block `True` would name
    before = snapshot(pool)
    bad = [
        (IndexError, "layer", lambda: pool.kv(True)),
        (IndexError, "start", lambda: a.slot_mapping(True, 2)),
        (IndexError, "end", lambda: a.slot_mapping(0, True)),
        (ValueError, "max_blocks", lambda: pool.batch_tensors([a], max_blocks=True)),
        (ValueError, "max_blocks", lambda: pool.batch_tensors([a], max_blocks=2.0)),
        (ValueError, "max_tokens", lambda: pool.request(0, max_tokens=True)),
        (ValueError, "num_tokens", lambda: pool.request(True)),
        (ValueError, "num_tokens", lambda: a.append(True)),
        (ValueError, "ids", lambda: pool.free_blocks([True])),
        (ValueError, "ids", lambda: pool.free_blocks([1.0])),
        (ValueError, "n", lambda: pool.allocate_blocks(True)),
        (ValueError, "n", lambda: pool.evict(True)),
        (ValueError, "num_chunks", lambda: pool.grow(True)),
        (ValueError, "num_blocks", lambda: pool.grow(num_blocks=True)),
        (ValueError, "num_chunks", lambda: pool.shrink(True)),
    ]
    for exc, name, fn in bad:
        with pytest.raises(exc, match=name):
            fn()
        assert_same(before, snapshot(pool))
    pool.validate()
    free = alloc.arenas[torch.device("cpu")].free_chunks
    for kw in ("initial_bytes", "max_bytes", "initial_chunks", "max_chunks", "grow_chunks"):
        with pytest.raises(ValueError, match=kw):
            alloc.create_pool("q", SMALL, **{kw: True})
    assert "q" not in alloc.pools and alloc.arenas[torch.device("cpu")].free_chunks == free
    with pytest.raises(ValueError, match="block_size"):
        block_hashes_from_tokens([1, 2], True)
    with pytest.raises(ValueError, match="hash_block_tokens"):
        expand_hash_ids([1], True, 4)
    with pytest.raises(ValueError, match="block_size"):
        expand_hash_ids([1], 8, True)
    with pytest.raises(ValueError, match="memory_fraction"):
        Arena("cpu", memory_fraction=True)
    with pytest.raises(ValueError, match="chunk_bytes"):
        Arena("cpu", budget_bytes=1 << 20, chunk_bytes=True)


# ---------------------------------------------------------------------------------------- closed objects
def test_every_method_of_a_destroyed_pool_raises(alloc):
    p = alloc.create_pool("p", SMALL)
    q = alloc.create_pool("q", SMALL)
    c = p.request(5)
    ids = p.allocate_blocks(2)
    arena = alloc.arenas[torch.device("cpu")]
    alloc.destroy_pool("p")
    owner = arena.owner.copy()
    free = arena.free_chunks
    assert free == arena.num_chunks                      # p gave every chunk back
    calls = {
        "kv": lambda: p.kv(0), "batch_tensors": lambda: p.batch_tensors([]),
        "request": lambda: p.request(4), "request_hashed": lambda: p.request(4, block_hashes=[1]),
        "request_tokens": lambda: p.request(token_ids=[1, 2]), "release": lambda: p.release(c),
        "allocate_blocks": lambda: p.allocate_blocks(1), "free_blocks": lambda: p.free_blocks(ids),
        "evict": lambda: p.evict(), "grow": lambda: p.grow(1), "grow_blocks": lambda: p.grow(num_blocks=1),
        "shrink": lambda: p.shrink(1), "compact": lambda: p.compact(),
        "release_free_chunks": lambda: p.release_free_chunks(), "stats": lambda: p.stats(),
        "validate": lambda: p.validate(), "reset_latency": lambda: p.reset_latency(),
        "stable_blocks": lambda: p.stable_blocks().__enter__(),
    }
    for name, fn in calls.items():
        with pytest.raises(errors.PoolClosedError, match="pool 'p' is closed") as e:
            fn()
        assert isinstance(e.value, RuntimeError) and e.value.pool == "p", name
    for fn in (lambda: c.append(1), c.fork, c.release, lambda: c.slot_mapping(), lambda: c.read_kv(0),
               lambda: c.write_kv(0, torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), 0)):
        with pytest.raises(errors.CacheReleasedError):
            fn()
    p.close()                                            # closing again is a no-op
    assert np.array_equal(arena.owner, owner) and arena.free_chunks == free
    big = q.request(16 * arena.num_chunks)               # the other pool gets every chunk
    assert big.num_blocks == 4 * arena.num_chunks
    st = alloc.stats()["devices"]["cpu"]
    assert st["num_pools"] == 1 and st["free_bytes"] == 0
    q.validate()


def test_every_method_of_a_closed_allocator_raises():
    alloc = GPUMemoryAllocator(devices=["cpu"], budget_bytes=64 << 10, chunk_bytes=4096).start()
    alloc.create_pool("p", SMALL)
    alloc.close()
    for fn in (alloc.start, lambda: alloc.create_pool("q", SMALL), lambda: alloc.get_pool("p"),
               lambda: alloc.destroy_pool("p"), alloc.stats, lambda: alloc.pools):
        with pytest.raises(errors.AllocatorClosedError, match="closed"):
            fn()
    alloc.close()


def test_every_method_of_a_closed_arena_raises():
    arena = Arena("cpu", budget_bytes=4 * 4096, chunk_bytes=4096)
    arena.claim([0], 3)
    arena.close()
    for fn in (lambda: arena.claim([1], 3), lambda: arena.give_back([0], 3), lambda: arena.release_all(3),
               lambda: arena.chunks_of(3), arena.stats):
        with pytest.raises(errors.ArenaClosedError, match="closed"):
            fn()
    arena.close()


def test_arena_refuses_bad_ownership_changes():
    arena = Arena("cpu", budget_bytes=4 * 4096, chunk_bytes=4096)
    for chunks, owner, match in (([1, 1], 3, "distinct"), ([-1], 3, "chunks"), ([4], 3, "chunks"),
                                 ([0], -1, "owner_id"), ([0], True, "owner_id"), ([0.5], 3, "chunks")):
        with pytest.raises(ValueError, match=match):
            arena.claim(chunks, owner)
        assert arena.free_chunks == 4 and (arena.owner == -1).all()
    arena.claim([0, 1], 3)
    with pytest.raises(ValueError, match="distinct"):
        arena.give_back([0, 0], 3)
    assert arena.free_chunks == 2 and arena.chunks_of(3).tolist() == [0, 1]


# ---------------------------------------------------------------------------------------- arena lock
class _OwnedLock:
    """A reentrant lock that knows its holder."""

    def __init__(self):
        self._lock, self.owner, self.depth = threading.RLock(), None, 0

    def acquire(self, blocking=True, timeout=-1):
        ok = self._lock.acquire(blocking, timeout)
        if ok:
            self.owner = threading.get_ident()
            self.depth += 1
        return ok

    def release(self):
        self.depth -= 1
        if not self.depth:
            self.owner = None
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()


class _CheckedArena(Arena):
    """An arena whose free count may only change while its lock is held by the changing thread."""

    @property
    def n_free(self):
        return self._n_free_checked

    @n_free.setter
    def n_free(self, v):
        assert self.lock.owner == threading.get_ident(), "n_free changed outside the arena's lock"
        self._n_free_checked = v


def test_chunk_ownership_changes_only_under_the_arena_lock():
    arena = Arena("cpu", budget_bytes=32 * 4096, chunk_bytes=4096)
    arena.lock = _OwnedLock()
    arena._n_free_checked = arena.__dict__.pop("n_free")
    arena.__class__ = _CheckedArena
    pools = [CachePool("a", SMALL, arena, pool_id=0), CachePool("b", ODD, arena, pool_id=1, initial_chunks=2),
             CachePool("c", BIG, arena, pool_id=2)]
    caches = [p.request(20) for p in pools]
    for p in pools:
        p.grow(2)
        try:
            p.shrink(1)
        except PoolExhaustedError:
            pass
        p.compact()
        p.release_free_chunks()
        p.validate()
    for c in caches:
        c.release()
    for p in pools:
        p.close()
    assert arena.free_chunks == arena.num_chunks == int((arena.owner == -1).sum())


def test_pools_growing_and_shrinking_in_threads_keep_the_free_count(fast_switching):
    arena = Arena("cpu", budget_bytes=64 * 4096, chunk_bytes=4096)
    pools = [CachePool(f"p{i}", spec, arena, pool_id=i) for i, spec in enumerate([SMALL, ODD, BIG, SMALL])]
    errs = []
    deadline = time.monotonic() + 1.0

    def work(pool):
        try:
            while time.monotonic() < deadline:
                pool.grow(3)
                try:
                    pool.shrink(2)
                except (PoolExhaustedError, ValueError):
                    pass
                pool.release_free_chunks()
        except BaseException as e:  # noqa: BLE001
            errs.append(e)

    ts = [threading.Thread(target=work, args=(p,)) for p in pools]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errs, errs[:3]
    assert arena.free_chunks == int((arena.owner == -1).sum())
    assert arena.free_chunks + sum(p.stats()["chunks_held"] for p in pools) == arena.num_chunks


# ---------------------------------------------------------------------------------------- stats snapshot
def test_allocator_stats_is_one_snapshot_while_threads_work(fast_switching):
    with GPUMemoryAllocator(devices=["cpu"], budget_bytes=128 << 10, chunk_bytes=4096) as alloc:
        pools = [alloc.create_pool(n, s) for n, s in (("a", SMALL), ("b", ODD), ("c", BIG))]
        stop = threading.Event()
        errs = []

        def work(pool, seed):
            rng = np.random.default_rng(seed)
            live = []
            with backend("reference"):
                try:
                    while not stop.is_set():
                        r = rng.integers(0, 5)
                        if r < 2 or not live:
                            try:
                                live.append(pool.request(int(rng.integers(1, 30))))
                            except PoolExhaustedError:
                                pass
                        elif r == 2:
                            live.pop(0).release()
                        elif r == 3:
                            pool.compact()
                        else:
                            pool.grow(1)
                            pool.release_free_chunks()
                except BaseException as e:  # noqa: BLE001
                    errs.append(e)
                    stop.set()

        ts = [threading.Thread(target=work, args=(p, i)) for i, p in enumerate(pools)]
        for t in ts:
            t.start()
        bad = []
        deadline = time.monotonic() + 1.5
        n = 0
        try:
            while time.monotonic() < deadline and not stop.is_set():
                st = alloc.stats()
                n += 1
                dev = st["devices"]["cpu"]
                held = sum(p["held_bytes"] for p in st["pools"].values())
                if dev["pools_held_bytes"] + dev["free_bytes"] != dev["arena_bytes"] or held != dev["pools_held_bytes"]:
                    bad.append(dev)
                for p in st["pools"].values():
                    if p["free_blocks"] + p["used_blocks"] + p["cached_blocks"] != p["capacity_blocks"]:
                        bad.append(p)
        finally:
            stop.set()
            for t in ts:
                t.join()
        assert not errs, errs[:3]
        assert n > 20
        assert not bad, f"{len(bad)} of {n} snapshots do not add up: {bad[0]}"
