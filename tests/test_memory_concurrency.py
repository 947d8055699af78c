"""Block moves (shrink, compact, close) against K/V writes and reads through block ids.

The rule under test: ``write_kv``/``read_kv`` (and any code inside ``pool.stable_blocks()``) take
their block ids and launch their kernel with no move of that pool in between: a shrink, compaction
or close that starts meanwhile waits, and one in progress makes them wait. The interleavings are
forced with events (a write paused between its slot mapping and its kernel; a compaction paused
between its move kernel and its block-table update), and a bounded hammer runs writers against a
compacting thread.
"""

import sys
import threading
import time

import pytest
import torch

from _memory_helpers import SMALL, assert_same, fill_random, read_all, snapshot
from kvtriton import GPUMemoryAllocator, PoolExhaustedError
from kvtriton import ops
from kvtriton.ops import backend

TIMEOUT = 20  # seconds; only reached when a test is about to fail (a deadlock)


@pytest.fixture(autouse=True)
def _reference_ops():
    with backend("reference"):
        yield


@pytest.fixture
def alloc():
    with GPUMemoryAllocator(devices=["cpu"], budget_bytes=64 << 10, chunk_bytes=4096) as a:
        yield a


def _movable(pool):
    """A cache ``a`` (1 block, alone in the first chunk) that ``pool.compact()`` moves into the second
    chunk, next to ``b`` (2 blocks)."""
    a = pool.request(4)
    filler = pool.request(12)             # the rest of the first chunk
    pool.grow(1)
    b = pool.request(8)                   # two blocks of the second chunk
    filler.release()
    return a, b


def _watch_blocking(pool, progress: threading.Event) -> None:
    """Set ``progress`` when a thread blocks on ``pool``'s moves lock."""
    moves = getattr(pool, "_moves", None)
    if moves is not None:
        moves._on_wait = lambda kind: progress.set()


def _run(target, progress: threading.Event | None = None):
    """Start ``target`` in a thread; set ``progress`` (if given) when it returns. Errors are kept."""
    errors = []

    def body():
        try:
            target()
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)
        finally:
            if progress is not None:
                progress.set()

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, errors


def test_compaction_waits_for_a_write_between_slot_mapping_and_kernel(alloc, monkeypatch):
    pool = alloc.create_pool("p", SMALL)
    a, b = _movable(pool)
    old = fill_random(a, 0, 4)
    new = torch.randn(4, SMALL.num_kv_heads, SMALL.head_dim), torch.randn(4, SMALL.num_kv_heads, SMALL.head_dim)
    real = ops.append_kv
    paused, go = threading.Event(), threading.Event()

    def paused_append(*args):
        paused.set()
        assert go.wait(TIMEOUT)
        real(*args)

    monkeypatch.setattr(ops, "append_kv", paused_append)
    writer, werr = _run(lambda: a.write_kv(0, new[0], new[1], 0))
    assert paused.wait(TIMEOUT)                      # the writer holds its slots, kernel not launched
    progress = threading.Event()
    _watch_blocking(pool, progress)
    ids_before = a.block_ids
    compactor, cerr = _run(lambda: pool.compact(), progress)
    assert progress.wait(TIMEOUT)                    # the compaction finished, or waits for the write
    go.set()
    writer.join(TIMEOUT)
    compactor.join(TIMEOUT)
    assert not writer.is_alive() and not compactor.is_alive()
    assert not werr and not cerr, (werr, cerr)
    monkeypatch.setattr(ops, "append_kv", real)
    assert a.block_ids != ids_before                 # the compaction did move a's block
    got = read_all(a)
    assert torch.equal(got[0, 0], new[0]) and torch.equal(got[0, 1], new[1])
    assert torch.equal(got[1], old[1])
    pool.validate()


def test_a_write_waits_for_a_compaction_that_has_moved_but_not_remapped(alloc, monkeypatch):
    pool = alloc.create_pool("p", SMALL)
    a, b = _movable(pool)
    old = fill_random(a, 0, 4)
    new = torch.randn(4, SMALL.num_kv_heads, SMALL.head_dim), torch.randn(4, SMALL.num_kv_heads, SMALL.head_dim)
    real = ops.move_blocks
    moved, go = threading.Event(), threading.Event()

    def paused_move(*args, **kw):
        real(*args, **kw)
        moved.set()                                  # bytes copied, block tables not yet rewritten
        assert go.wait(TIMEOUT)

    monkeypatch.setattr(ops, "move_blocks", paused_move)
    compactor, cerr = _run(lambda: pool.compact())
    assert moved.wait(TIMEOUT)
    progress = threading.Event()
    _watch_blocking(pool, progress)
    writer, werr = _run(lambda: a.write_kv(0, new[0], new[1], 0), progress)
    assert progress.wait(TIMEOUT)                    # the write finished, or waits for the compaction
    go.set()
    compactor.join(TIMEOUT)
    writer.join(TIMEOUT)
    assert not writer.is_alive() and not compactor.is_alive()
    assert not werr and not cerr, (werr, cerr)
    monkeypatch.setattr(ops, "move_blocks", real)
    got = read_all(a)
    assert torch.equal(got[0, 0], new[0]) and torch.equal(got[0, 1], new[1])
    assert torch.equal(got[1], old[1])
    pool.validate()


def test_destroy_waits_for_a_write_so_it_cannot_land_in_another_pools_chunk(alloc, monkeypatch):
    p = alloc.create_pool("p", SMALL)
    q = alloc.create_pool("q", SMALL)
    a = p.request(4)                                 # p holds the first chunk
    key = torch.randn(4, SMALL.num_kv_heads, SMALL.head_dim)
    real = ops.append_kv
    paused, go = threading.Event(), threading.Event()

    def paused_append(*args):
        paused.set()
        assert go.wait(TIMEOUT)
        real(*args)

    monkeypatch.setattr(ops, "append_kv", paused_append)
    writer, werr = _run(lambda: a.write_kv(0, key, key, 0))
    assert paused.wait(TIMEOUT)
    progress = threading.Event()
    _watch_blocking(p, progress)
    destroyer, derr = _run(lambda: alloc.destroy_pool("p"), progress)
    assert progress.wait(TIMEOUT)
    monkeypatch.setattr(ops, "append_kv", real)
    c = q.request(16)                                # a chunk of the arena, p's old one if it was freed
    data = fill_random(c, 0, 16)
    go.set()
    writer.join(TIMEOUT)
    destroyer.join(TIMEOUT)
    assert not writer.is_alive() and not destroyer.is_alive()
    assert not derr and not werr, (derr, werr)
    assert torch.equal(read_all(c), data)            # p's late write did not land in q's blocks
    q.validate()


def test_stable_blocks_holds_moves_off_and_refuses_its_own_compaction(alloc):
    pool = alloc.create_pool("p", SMALL)
    a, b = _movable(pool)
    progress = threading.Event()
    _watch_blocking(pool, progress)
    with pool.stable_blocks():
        tables, lens = pool.batch_tensors([a, b])
        compactor, cerr = _run(lambda: pool.compact())
        assert progress.wait(TIMEOUT)                # blocked: the ids above stay valid
        assert compactor.is_alive()
        assert tables[0, 0].item() == a.block_ids[0]
        with pytest.raises(RuntimeError, match="stable_blocks"):
            pool.shrink(1)                           # this thread would wait for itself
        with pytest.raises(RuntimeError, match="stable_blocks"):
            pool.close()
        with pytest.raises(RuntimeError, match="stable_blocks"):
            alloc.close()
        assert not pool.closed and alloc.pools == {"p": pool}
        a.write_kv(0, torch.ones(4, 2, 8), torch.ones(4, 2, 8), 0)   # nested: no deadlock
        with pool.stable_blocks():                   # reentrant while a compaction waits
            assert read_all(a)[0, 0].eq(1).all()
    compactor.join(TIMEOUT)
    assert not compactor.is_alive() and not cerr, cerr
    assert a.block_ids[0] != tables[0, 0].item()
    assert read_all(a)[0, 0].eq(1).all()
    pool.validate()


@pytest.fixture
def fast_switching():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)                      # many more thread switches inside the windows
    yield
    sys.setswitchinterval(old)


def test_writers_against_a_compacting_thread_lose_nothing(fast_switching):
    """Six writers write, append and check their caches while a seventh thread grows, compacts and
    shrinks the pool without pause; bounded to about two seconds."""
    with GPUMemoryAllocator(devices=["cpu"], budget_bytes=512 << 10, chunk_bytes=4096) as alloc:
        pool = alloc.create_pool("p", SMALL)
        stop = threading.Event()
        errors = []
        deadline = time.monotonic() + 2.0
        counts = {"writes": 0, "moved": 0}

        def writer(seed):
            g = torch.Generator().manual_seed(seed)
            mine = []                                # (cache, data [L, 2, n, H, D])
            with backend("reference"):
                try:
                    while not stop.is_set():
                        r = int(torch.randint(0, 4, (1,), generator=g))
                        if r == 0 or len(mine) < 2:
                            n = int(torch.randint(1, 12, (1,), generator=g))
                            c = pool.request(n)
                            mine.append((c, fill_random(c, 0, n, g)))
                        elif r == 1:
                            i = int(torch.randint(0, len(mine), (1,), generator=g))
                            c, d = mine[i]
                            c.append(3)
                            mine[i] = (c, torch.cat([d, fill_random(c, d.shape[2], d.shape[2] + 3, g)], 2))
                        elif r == 2 and len(mine) > 3:
                            mine.pop(0)[0].release()
                        counts["writes"] += 1
                        for c, d in mine:
                            got = read_all(c)
                            if not torch.equal(got, d):
                                raise AssertionError(f"cache {c.cache_id}: K/V bytes changed under a move")
                except PoolExhaustedError:
                    pass
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(e)
                    stop.set()
                finally:
                    for c, _ in mine:
                        c.release()

        def compactor():
            with backend("reference"):
                try:
                    while not stop.is_set():
                        before = pool.stats()["blocks_moved"]
                        pool.grow(2)
                        pool.compact()
                        try:
                            pool.shrink(1, evict=True)
                        except (PoolExhaustedError, ValueError):
                            pass
                        counts["moved"] += pool.stats()["blocks_moved"] - before
                except BaseException as e:  # noqa: BLE001
                    errors.append(e)
                    stop.set()

        threads = [threading.Thread(target=writer, args=(s,)) for s in range(6)]
        threads.append(threading.Thread(target=compactor))
        for t in threads:
            t.start()
        while not stop.is_set() and time.monotonic() < deadline:
            stop.wait(0.05)
        stop.set()
        for t in threads:
            t.join(TIMEOUT)
        assert not any(t.is_alive() for t in threads), "deadlock"
        assert not errors, errors[:3]
        assert counts["moved"] > 0 and counts["writes"] > 0   # the race was exercised
        pool.validate()
        assert pool.stats()["used_blocks"] == 0


def test_failed_write_arguments_change_nothing(alloc):
    pool = alloc.create_pool("p", SMALL)
    a = pool.request(6)
    before = snapshot(pool)
    k = torch.randn(2, 2, 8)
    with pytest.raises(IndexError, match="layer"):
        a.write_kv(True, k, k, 0)
    with pytest.raises(IndexError, match="start"):
        a.write_kv(0, k, k, True)
    with pytest.raises(IndexError, match="start"):
        a.write_kv(0, k, k, 5)                       # tokens [5, 7) pass seq_len=6
    with pytest.raises((TypeError, ValueError), match="key"):
        a.write_kv(0, [[1.0]], k, 0)
    with pytest.raises(IndexError, match="layer"):
        a.read_kv(True)
    assert_same(before, snapshot(pool))
