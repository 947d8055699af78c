"""CachePool, VirtualKVCache and GPUMemoryAllocator: the public contract, prefix caching, copy-on-write,
eviction order, elastic shrink/grow, errors that change nothing, and a 16-thread hammer."""

import threading

import pytest
import torch

from _memory_helpers import BIG, ODD, SMALL, assert_same, fill_random, read_all, snapshot
from kvtriton import (CacheReleasedError, GPUMemoryAllocator, ModelSpec, PoolExhaustedError,
                      block_hashes_from_tokens, expand_hash_ids)
from kvtriton.ops import backend


@pytest.fixture(autouse=True)
def _reference_ops():
    # The kernels' own tests cover them in the interpreter; here the plain-PyTorch path keeps it fast.
    with backend("reference"):
        yield


@pytest.fixture
def alloc():
    with GPUMemoryAllocator(devices=["cpu"], budget_bytes=64 << 10, chunk_bytes=4096) as a:
        yield a


def test_contract_example():
    with GPUMemoryAllocator(devices=["cpu"], budget_bytes=64 << 20) as alloc:
        pool = alloc.create_pool("tiny", "tiny", policy="lru")
        cache = pool.request(num_tokens=1000)
        assert cache.seq_len == 1000 and cache.num_blocks == 63
        cache.append(16)
        assert cache.seq_len == 1016 and cache.num_blocks == 64
        pool.release(cache)
        s = pool.stats()
        assert all(isinstance(v, (int, float)) for v in s.values())
        assert s["used_blocks"] == 0 and s["free_blocks"] == s["capacity_blocks"] > 0
        pool.validate()
        # Llama-3-8B: exactly one 2 MiB block per chunk; 64 MiB hold 32 blocks of 16 tokens.
        llama = alloc.create_pool("llama", "llama-3-8b")
        big = llama.request(num_tokens=200)
        s = llama.stats()
        assert s["block_bytes"] == 2 << 20 and s["used_blocks"] == 13 and s["capacity_blocks"] == s["chunks_held"]
        with pytest.raises(PoolExhaustedError, match="'llama'"):
            llama.request(num_tokens=1000)
        big.release()
        llama.validate()
    with pytest.raises(CacheReleasedError):
        cache.seq_len


def test_views_are_strided_windows_of_the_arena(alloc):
    pool = alloc.create_pool("p", SMALL)
    k, v = pool.kv(1)
    L, bs, H, D = SMALL.num_layers, SMALL.block_size, SMALL.num_kv_heads, SMALL.head_dim
    assert k.shape == (pool.num_blocks, bs, H, D) and k.dtype == torch.float32
    assert k.stride(0) == L * 2 * bs * H * D
    assert k.data_ptr() == pool.arena.buffer.data_ptr() + (1 * 2 + 0) * bs * H * D * 4
    assert v.data_ptr() == k.data_ptr() + bs * H * D * 4
    c = pool.request(6)
    data = fill_random(c, 0, 6)
    assert torch.equal(read_all(c), data)
    # The bytes sit inside the block's byte range of the arena.
    b = c.block_ids[0]
    raw = pool.arena.buffer[b * SMALL.bytes_per_block:(b + 1) * SMALL.bytes_per_block].view(torch.float32)
    assert torch.equal(raw.view(SMALL.block_shape)[1, 1, :4], data[1, 1, :4])
    with pytest.raises(IndexError, match="layer"):
        pool.kv(2)


def test_batch_tensors_and_slot_mapping(alloc):
    pool = alloc.create_pool("p", SMALL)
    a, b = pool.request(5), pool.request(9)
    tables, lens = pool.batch_tensors([a, b])
    assert tables.dtype == torch.int32 and lens.dtype == torch.int32
    assert tables.shape == (2, 3) and lens.tolist() == [5, 9]
    assert tables[0, :2].tolist() == a.block_ids and tables[1].tolist() == b.block_ids
    assert a.block_table.tolist() == a.block_ids
    sm = b.slot_mapping(3, 7)
    assert sm.dtype == torch.int64
    ids = b.block_ids
    assert sm.tolist() == [ids[p // 4] * 4 + p % 4 for p in range(3, 7)]
    with pytest.raises(IndexError):
        b.slot_mapping(3, 10)
    with pytest.raises(ValueError, match="max_blocks"):
        pool.batch_tensors([a, b], max_blocks=2)


def test_prefix_cache_from_token_ids(alloc):
    pool = alloc.create_pool("p", SMALL)
    toks = list(range(100, 114))  # 3 full blocks + 2 tokens
    a = pool.request(token_ids=toks)
    assert a.num_cached_tokens == 0
    data = fill_random(a, 0, 14)
    b = pool.request(token_ids=toks[:12] + [7, 7, 7])
    assert b.num_cached_tokens == 12 and b.block_ids[:3] == a.block_ids[:3]
    assert b.block_ids[3] != a.block_ids[3]
    assert torch.equal(read_all(b)[:, :, :12], data[:, :, :12])
    c = pool.request(token_ids=[1] + toks[1:])
    assert c.num_cached_tokens == 0
    s = pool.stats()
    assert s["hit_blocks"] == 3 and s["miss_blocks"] == 3 + 0 + 3 and s["hit_tokens"] == 12
    # vLLM-style chaining: a block's hash depends on every earlier token.
    h1 = block_hashes_from_tokens(toks, 4)
    h2 = block_hashes_from_tokens([0] + toks[1:], 4)
    assert len(h1) == 3 and all(x != y for x, y in zip(h1, h2))
    for x in (a, b, c):
        x.release()
    # Released full blocks stay cached (evictable); the partial ones are free.
    s = pool.stats()
    assert s["used_blocks"] == 0 and s["cached_blocks"] == 3 + 3 and s["prefix_cache_entries"] == 6
    d = pool.request(token_ids=toks)
    assert d.num_cached_tokens == 12 and torch.equal(read_all(d)[:, :, :12], data[:, :, :12])
    pool.validate()


def test_prefix_cache_with_caller_hashes_and_mooncake_expansion(alloc):
    pool = alloc.create_pool("p", SMALL)
    # Mooncake-style ids of 8 tokens each expanded to 4-token pool blocks; 14 tokens -> 3 full blocks.
    hashes = expand_hash_ids([11, 12], 8, 4, num_tokens=14)
    assert len(hashes) == 3 and len(set(hashes)) == 3
    assert expand_hash_ids([11, 99], 8, 4, num_tokens=14)[:2] == hashes[:2]
    a = pool.request(14, block_hashes=hashes)
    b = pool.request(20, block_hashes=hashes[:2] + [5, 6])
    assert b.num_cached_tokens == 8 and b.block_ids[:2] == a.block_ids[:2]
    with pytest.raises(ValueError, match="block_hashes"):
        pool.request(4, block_hashes=[1, 2])
    pool.validate()


def test_eviction_drops_a_released_prefix_from_its_end(alloc):
    pool = alloc.create_pool("p", SMALL, max_chunks=2)  # 8 blocks
    toks = list(range(32))
    a = pool.request(token_ids=toks)      # 8 full blocks, all hashed
    ids = a.block_ids
    a.release()
    assert pool.stats()["cached_blocks"] == 8
    c = pool.request(8)                   # needs 2 blocks: evicts the prefix's last two
    assert sorted(c.block_ids) == sorted(ids[-2:])
    c.release()
    d = pool.request(token_ids=toks)
    assert d.num_cached_tokens == 24      # the first six blocks are still cached
    assert pool.stats()["evictions"] == 2
    pool.validate()


def test_fork_copy_on_write_keeps_both_histories(alloc):
    pool = alloc.create_pool("p", SMALL)
    a = pool.request(6)
    base = fill_random(a, 0, 6)
    b = a.fork()
    assert b.block_ids == a.block_ids and pool.stats()["used_blocks"] == 2
    b.append(3)                           # the shared half-full block is copied first
    assert b.block_ids[0] == a.block_ids[0] and b.block_ids[1] != a.block_ids[1]
    bdata = fill_random(b, 6, 9)
    a.append(1)                           # a holds its block alone now: written in place
    adata = fill_random(a, 6, 7)
    assert torch.equal(read_all(a), torch.cat([base, adata], 2))
    assert torch.equal(read_all(b), torch.cat([base, bdata], 2))
    assert pool.stats()["cow_copies"] == 1
    pool.validate()
    a.release()
    b.release()
    pool.validate()
    assert pool.stats()["used_blocks"] == 0


def test_errors_leave_the_pool_unchanged(alloc):
    pool = alloc.create_pool("p", SMALL, max_chunks=2)   # 8 blocks of 4 tokens
    keep = pool.request(token_ids=list(range(12)))
    keep.release()                                        # 3 cached blocks
    a = pool.request(10, max_tokens=12)
    before = snapshot(pool)
    with pytest.raises(PoolExhaustedError) as e:
        pool.request(30)                                  # 8 blocks: 2 free + 3 evictable, no room to grow
    assert e.value.pool == "p" and e.value.requested == 8 and e.value.free == 2 and e.value.evictable == 3
    assert_same(before, snapshot(pool))
    with pytest.raises(PoolExhaustedError):
        pool.request(token_ids=list(range(12)) + list(range(50, 70)))  # hits do not make room
    assert_same(before, snapshot(pool))
    with pytest.raises(ValueError, match="max_tokens"):
        a.append(3)
    with pytest.raises(ValueError, match="num_tokens"):
        pool.request(-1)
    with pytest.raises(ValueError, match="num_tokens"):
        a.append(-2)
    with pytest.raises(ValueError, match="max_tokens"):
        pool.request(5, max_tokens=4)
    assert_same(before, snapshot(pool))
    a.release()
    with pytest.raises(CacheReleasedError):
        pool.release(a)
    with pytest.raises(CacheReleasedError):
        a.append(1)
    with pytest.raises(CacheReleasedError):
        a.fork()
    with pytest.raises(CacheReleasedError):
        a.slot_mapping()
    pool.validate()


def test_unknown_names_and_bad_budgets_list_the_choices():
    with pytest.raises(ValueError, match="budget_bytes=.*maximum"):
        GPUMemoryAllocator(devices=["cpu"], budget_bytes=1 << 60).start()
    with pytest.raises(ValueError, match="device_selection"):
        GPUMemoryAllocator(devices=["cpu"], device_selection="random")
    with pytest.raises(ValueError, match="device"):
        GPUMemoryAllocator(devices=["tpu"])
    with GPUMemoryAllocator(devices=["cpu"], budget_bytes=64 << 10, chunk_bytes=4096) as alloc:
        with pytest.raises(ValueError, match="llama-3-8b"):
            alloc.create_pool("x", "no-such-model")
        with pytest.raises(ValueError, match="lru"):
            alloc.create_pool("x", SMALL, policy="no-such-policy")
        assert alloc.pools == {} and alloc.arenas[torch.device("cpu")].free_chunks == 16
        alloc.create_pool("x", SMALL)
        with pytest.raises(ValueError, match="exists"):
            alloc.create_pool("x", SMALL)
        with pytest.raises(KeyError, match="pools"):
            alloc.get_pool("y")
        with pytest.raises(ValueError, match="initial_chunks"):
            alloc.create_pool("y", SMALL, initial_chunks=100)
        assert alloc.arenas[torch.device("cpu")].free_chunks == 16 and list(alloc.pools) == ["x"]


def test_shrink_moves_live_blocks_and_keeps_their_bytes(alloc):
    pool = alloc.create_pool("p", SMALL)
    caches = [pool.request(7) for _ in range(6)]            # 12 blocks over >= 3 chunks
    data = [fill_random(c, 0, 7) for c in caches]
    for c in caches[::2]:
        c.release()
    held = pool.stats()["chunks_held"]
    forked = caches[1].fork()
    assert pool.shrink(1) == 1
    s = pool.stats()
    assert s["chunks_held"] == held - 1 and s["blocks_moved"] >= 1
    owner = pool.arena.owner
    for c, d in ((caches[1], data[1]), (caches[3], data[3]), (caches[5], data[5]), (forked, data[1])):
        assert torch.equal(read_all(c), d)
        for b in c.block_ids:  # every block lies in chunks the pool still holds
            assert (owner[pool.geometry.first_chunk[b]:pool.geometry.last_chunk[b] + 1] == pool.pool_id).all()
    assert forked.block_ids == caches[1].block_ids
    pool.validate()
    n_before = pool.stats()["chunks_held"]
    released = pool.compact()
    assert pool.stats()["chunks_held"] == n_before - released
    assert pool.stats()["chunks_held"] == 2                 # 6 live blocks of 1 KiB in 4 KiB chunks
    for c, d in ((caches[1], data[1]), (caches[3], data[3]), (caches[5], data[5])):
        assert torch.equal(read_all(c), d)
    before = snapshot(pool)
    with pytest.raises(PoolExhaustedError, match="cannot shrink"):
        pool.shrink(2)
    assert_same(before, snapshot(pool))
    with pytest.raises(ValueError, match="num_chunks"):
        pool.shrink(3)
    pool.validate()


def test_shrink_moves_or_evicts_cached_blocks(alloc):
    pool = alloc.create_pool("p", SMALL)
    toks = list(range(16))
    a = pool.request(token_ids=toks)
    data = fill_random(a, 0, 16)
    a.release()                                             # one chunk of 4 cached blocks
    pool.grow(1)
    pool.shrink(1, evict=False)                             # the cached blocks move
    b = pool.request(token_ids=toks)
    assert b.num_cached_tokens == 16 and torch.equal(read_all(b), data)
    b.release()
    assert pool.stats()["chunks_held"] == 1
    pool.shrink(1)                                          # no room left: evicted instead
    s = pool.stats()
    assert s["chunks_held"] == 0 and s["evictions"] == 4 and s["prefix_cache_entries"] == 0
    pool.validate()


@pytest.mark.parametrize("spec", [ODD, BIG], ids=["straddling", "two-chunk"])
def test_blocks_that_straddle_chunks(alloc, spec):
    p = alloc.create_pool("p", spec)
    q = alloc.create_pool("q", SMALL)
    xs = [p.request(spec.block_size * 2) for _ in range(3)]
    ys = [q.request(5) for _ in range(3)]
    dx = [fill_random(x, 0, x.seq_len) for x in xs]
    dy = [fill_random(y, 0, 5) for y in ys]
    for pool, cs in ((p, xs), (q, ys)):
        for c in cs:
            for b in c.block_ids:
                assert (pool.arena.owner[pool.geometry.first_chunk[b]:pool.geometry.last_chunk[b] + 1] == pool.pool_id).all()
    xs[0].release()
    ys[1].release()
    p.compact()
    q.compact()
    for c, d in list(zip(xs[1:], dx[1:])) + [(ys[0], dy[0]), (ys[2], dy[2])]:
        assert torch.equal(read_all(c), d)
    p.validate()
    q.validate()
    a = alloc.arenas[torch.device("cpu")]
    assert a.free_chunks + p.stats()["chunks_held"] + q.stats()["chunks_held"] == a.num_chunks


def test_pools_share_the_arena_and_reclaim_empty_chunks(alloc):
    a = alloc.create_pool("a", SMALL)
    b = alloc.create_pool("b", BIG)
    xs = [a.request(16) for _ in range(16)]                 # every chunk of the arena
    assert alloc.arenas[torch.device("cpu")].free_chunks == 0
    with pytest.raises(PoolExhaustedError):
        b.request(8)
    for x in xs[:4]:
        x.release()
    c = b.request(8)                                        # a gives back its empty chunks
    assert c.num_blocks == 1 and a.stats()["chunks_held"] < 16
    a.validate()
    b.validate()
    st = alloc.stats()
    dev = st["devices"]["cpu"]
    assert dev["num_pools"] == 2 and set(st["pools"]) == {"a", "b"}
    assert dev["pools_held_bytes"] + dev["free_bytes"] == dev["arena_bytes"]


def test_grow_limits_and_evict(alloc):
    pool = alloc.create_pool("p", SMALL, max_bytes=8192)
    assert pool.grow(5) == 2 and pool.stats()["chunks_held"] == 2
    assert pool.grow(num_blocks=1) == 0
    with pytest.raises(ValueError, match="exactly one"):
        pool.grow()
    a = pool.request(token_ids=list(range(20)))
    a.release()
    assert pool.evict(2) == 2 and pool.stats()["cached_blocks"] == 3
    assert pool.evict() == 3 and pool.stats()["cached_blocks"] == 0
    pool.validate()


def test_batch_block_api(alloc):
    pool = alloc.create_pool("p", SMALL, initial_chunks=4)
    ids = pool.allocate_blocks(10)
    assert len(set(ids)) == 10 and pool.stats()["used_blocks"] == 10
    pool.validate()
    with pytest.raises(ValueError, match="held"):
        pool.free_blocks(ids[:2] + [ids[0]])
    assert pool.stats()["used_blocks"] == 10
    with pytest.raises(ValueError, match="num_chunks"):
        pool.shrink(4)   # every chunk holds a block from allocate_blocks
    pool.free_blocks(ids)
    with pytest.raises(ValueError):
        pool.free_blocks(ids[:1])
    assert pool.stats()["used_blocks"] == 0
    pool.validate()


def test_sixteen_threads_leak_nothing():
    with GPUMemoryAllocator(devices=["cpu"], budget_bytes=4 << 20, chunk_bytes=4096) as alloc:
        pool = alloc.create_pool("p", SMALL)
        errors = []

        def work(seed):
            g = torch.Generator().manual_seed(seed)
            mine = []
            try:
                ctx = backend("reference")   # thread-local: each worker picks its own
                ctx.__enter__()
                for i in range(150):
                    r = int(torch.randint(0, 6, (1,), generator=g))
                    if r < 3 or not mine:
                        toks = [seed % 3] * int(torch.randint(1, 20, (1,), generator=g))
                        mine.append(pool.request(token_ids=toks) if r == 0 else pool.request(len(toks)))
                    elif r == 3:
                        mine[-1].append(3)
                    elif r == 4:
                        mine.append(mine[0].fork())
                    else:
                        pool.release(mine.pop(0))
                    if i % 50 == 49:
                        pool.compact()          # moves blocks under other threads' feet
                for c in mine:
                    c.release()
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
            finally:
                ctx.__exit__(None, None, None)

        threads = [threading.Thread(target=work, args=(s,)) for s in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        pool.validate()
        s = pool.stats()
        assert s["used_blocks"] == 0 and s["live_caches"] == 0
        assert s["free_blocks"] + s["cached_blocks"] == s["capacity_blocks"]
        pool.evict()
        pool.compact()
        assert pool.stats()["chunks_held"] == 0


def test_close_releases_everything():
    alloc = GPUMemoryAllocator(devices=["cpu"], budget_bytes=64 << 10, chunk_bytes=4096)
    pool = alloc.create_pool("p", SMALL)        # starts the allocator
    c = pool.request(5)
    alloc.close()
    assert c.released
    with pytest.raises(CacheReleasedError):
        c.append(1)
    with pytest.raises(RuntimeError, match="closed"):
        alloc.create_pool("q", SMALL)


def test_device_selection_least_loaded_and_custom_spec():
    with GPUMemoryAllocator(devices="cpu", budget_bytes=64 << 10, chunk_bytes=4096,
                            device_selection="least_loaded") as alloc:
        spec = ModelSpec(num_layers=1, num_kv_heads=1, head_dim=16, dtype="bf16", block_size=16)
        p = alloc.create_pool("p", spec, initial_bytes=4096)
        assert p.device == torch.device("cpu") and p.stats()["chunks_held"] == 1
        k, _ = p.kv(0)
        assert k.dtype == torch.bfloat16


def test_default_ops_path_runs_shrink_and_cow():
    # Same plans through the default backend (the Triton kernels, in the interpreter on CPU).
    with backend("auto"), GPUMemoryAllocator(devices=["cpu"], budget_bytes=64 << 10, chunk_bytes=4096) as alloc:
        pool = alloc.create_pool("p", SMALL)
        a = pool.request(10)
        d = fill_random(a, 0, 10)
        pool.grow(1)
        b = a.fork()
        b.append(1)
        pool.shrink(1)
        assert torch.equal(read_all(a), d) and torch.equal(read_all(b)[:, :, :10], d)
        pool.validate()


def test_append_with_token_ids_extends_the_prefix_cache(alloc):
    pool = alloc.create_pool("p", SMALL)
    a = pool.request(token_ids=[1, 2, 3, 4, 5, 6])              # 1 full block, 2 tokens in the second
    a.append(3, token_ids=[7, 8, 9])                             # fills the second block
    data = fill_random(a, 0, 9)
    assert len(a.block_hashes) == 2
    b = pool.request(token_ids=list(range(1, 10)) + [0])         # a's two full blocks are hit
    assert b.num_cached_tokens == 8 and b.block_ids[:2] == a.block_ids[:2]
    assert torch.equal(read_all(b)[:, :, :8], data[:, :, :8])
    f = a.fork()
    f.append(3, token_ids=[10, 11, 12])                          # the shared third block is copied
    assert f.block_ids[2] != a.block_ids[2] and len(f.block_hashes) == 3
    with pytest.raises(ValueError, match="token_ids"):
        a.append(2, token_ids=[1])
    c = pool.request(5)
    with pytest.raises(ValueError, match="token_ids"):
        c.append(1, token_ids=[1])
    pool.validate()


def test_internal_fragmentation_counts_each_held_block_once_at_its_fullest():
    """``stats()["internal_fragmentation"]`` against a brute force over every cache's blocks, through
    forks (shared partial last blocks, then copy-on-write), reservations past the length and releases."""
    import random

    def brute(pool):
        bs, filled = pool.block_size, {}
        for c in pool._caches.values():
            for i, b in enumerate(c._blocks):
                f = min(bs, c._seq_len - i * bs)
                if f > filled.get(b, 0):
                    filled[b] = f
        held = len(filled) * bs
        return (held - sum(filled.values())) / held if held else 0.0

    rng = random.Random(0)
    with GPUMemoryAllocator(devices=["cpu"], budget_bytes=64 << 20) as alloc:
        pool = alloc.create_pool("tiny", "tiny", policy="lru")
        live = []
        for step in range(300):
            op = rng.random() if len(live) < 24 else 0.9
            if op < 0.35 or not live:
                n = rng.randint(0, 70)
                live.append(pool.request(num_tokens=n, max_tokens=n + rng.choice([0, 0, 40])))
            elif op < 0.55:
                live.append(rng.choice(live).fork())
            elif op < 0.8:
                c = rng.choice(live)
                if c.max_tokens is None or c.seq_len + 3 <= c.max_tokens:
                    c.append(rng.randint(1, 3))
            else:
                pool.release(live.pop(rng.randrange(len(live))))
            assert pool.stats()["internal_fragmentation"] == pytest.approx(brute(pool), abs=1e-12), step
