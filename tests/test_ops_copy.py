"""Copy-family kernels (append_kv, gather_kv, gather/scatter_blocks, move/copy_blocks, compact_tokens)
against their references in kvtriton.ops.reference: exact equality, fresh random data every run,
outputs poisoned before the call, strided arena views, large block ids, bad input."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvtriton.ops as ops
from kvtriton.ops import gather
from kvtriton.ops import reference as ref
from kvtriton.ops._backend import HAS_TRITON, INTERPRET

pytestmark = pytest.mark.skipif(not (HAS_TRITON and INTERPRET),
                                reason="needs triton with TRITON_INTERPRET=1 (set in conftest.py)")


@pytest.fixture(autouse=True)
def seed():
    s = random.randrange(2**31)
    torch.manual_seed(s)
    print(f"seed={s}")  # shown by pytest when a test fails, to reproduce it
    yield s


@pytest.fixture(autouse=True)
def triton_backend():
    # Force the kernels (the interpreter on CPU): a silent fall-back to the reference would test nothing.
    with ops.backend("triton"):
        yield


def rand(shape, dtype):
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=torch.float32).to(dtype)
    return torch.randint(0, 120, shape, dtype=dtype)


def poison_(t):
    return t.fill_(float("nan")) if t.dtype.is_floating_point else t.fill_(-7)


def make_kv(num_blocks, block_size, H, D, dtype, layout):
    """(key_cache, value_cache, base): K/V views over ``base``; comparing ``base`` catches stray writes.

    contiguous: two separate tensors. arena: one block holds 3 layers' K and V, K/V = layer 1's views
    (block stride 6x the per-block size). hnd: stored [num_blocks, H, block_size, D] and permuted to
    NHD, so token and head strides are unusual.
    """
    if layout == "contiguous":
        base = rand((2, num_blocks, block_size, H, D), dtype)
        return base[0], base[1], base
    if layout == "arena":
        base = rand((num_blocks, 3, 2, block_size, H, D), dtype)
        return base[:, 1, 0], base[:, 1, 1], base
    if layout == "hnd":
        base = rand((num_blocks, 2, H, block_size, D), dtype)
        return base[:, 0].permute(0, 2, 1, 3), base[:, 1].permute(0, 2, 1, 3), base
    raise AssertionError(layout)


def views_of(base, layout):
    if layout == "contiguous":
        return base[0], base[1]
    if layout == "arena":
        return base[:, 1, 0], base[:, 1, 1]
    return base[:, 0].permute(0, 2, 1, 3), base[:, 1].permute(0, 2, 1, 3)


def random_block_tables(seq_lens, block_size, num_blocks, dtype=torch.int32):
    """Distinct blocks from a random permutation; unused entries padded with -1 (must not be read)."""
    need = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(need + [1]) + 1
    perm = torch.randperm(num_blocks)
    bt = torch.full((len(seq_lens), max_blocks), -1, dtype=dtype)
    k = 0
    for b, m in enumerate(need):
        bt[b, :m] = perm[k:k + m].to(dtype)
        k += m
    assert k <= num_blocks
    return bt


# Cases cover every value of each axis at least once without a full product (the interpreter is slow).
KV_CASES = [
    # dtype, block_size, H, D, layout
    (torch.bfloat16, 16, 8, 128, "arena"),
    (torch.float16, 16, 1, 64, "contiguous"),
    (torch.float32, 8, 2, 256, "hnd"),
    (torch.bfloat16, 4, 2, 64, "hnd"),
    (torch.float32, 16, 1, 128, "arena"),
    (torch.float16, 32, 3, 96, "arena"),   # head count and head_dim that are not powers of two
]


@pytest.mark.parametrize("dtype,block_size,H,D,layout", KV_CASES)
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_append_kv(dtype, block_size, H, D, layout, slot_dtype):
    num_blocks, T = 6, 13
    kc, vc, base = make_kv(num_blocks, block_size, H, D, dtype, layout)
    key, value = rand((T, H, D), dtype), rand((T, H, D), dtype)
    slots = torch.randperm(num_blocks * block_size)[:T].to(slot_dtype)
    slots[torch.randperm(T)[:3]] = -1  # padding
    dest = slots[slots >= 0].long()
    for c in (kc, vc):  # poison the slots to be written: a slot the kernel misses stays NaN
        c[dest // block_size, dest % block_size] = float("nan")
    expect = base.clone()
    ref.append_kv(key, value, *views_of(expect, layout), slots)
    ops.append_kv(key, value, kc, vc, slots)
    assert torch.equal(base, expect)


def test_append_kv_casts_and_strided_inputs():
    kc, vc, base = make_kv(5, 16, 2, 64, torch.bfloat16, "arena")
    qkv = torch.randn(9, 3, 2, 64)  # fused projection output: key/value are strided fp32 views
    key, value = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(80)[:9]
    expect = base.clone()
    ref.append_kv(key, value, *views_of(expect, "arena"), slots)
    ops.append_kv(key, value, kc, vc, slots)
    assert torch.equal(base, expect)


@pytest.mark.parametrize("dtype,block_size,H,D,layout", KV_CASES)
def test_gather_kv(dtype, block_size, H, D, layout):
    seq_lens = [1, 2 * block_size + 3, 0, block_size]
    need = sum(-(-n // block_size) for n in seq_lens)
    kc, vc, _ = make_kv(need + 3, block_size, H, D, dtype, layout)
    bt = random_block_tables(seq_lens, block_size, need + 3)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    k, v, cu = ops.gather_kv(kc, vc, bt, sl)
    rk, rv, rcu = ref.gather_kv(kc, vc, bt, sl)
    assert cu.dtype == torch.int32 and torch.equal(cu, rcu)
    assert k.dtype == dtype and k.shape == rk.shape and k.is_contiguous()
    # Outputs are fresh allocations; any element the kernel missed holds stale memory, not these values.
    assert torch.equal(k, rk) and torch.equal(v, rv)
    k2, v2, cu2 = ops.gather_kv(kc, vc, bt, sl.long(), num_tokens=sum(seq_lens))
    assert torch.equal(k2, rk) and torch.equal(v2, rv) and torch.equal(cu2, rcu)


def test_gather_kv_empty():
    kc, vc, _ = make_kv(3, 16, 2, 64, torch.float16, "contiguous")
    k, v, cu = ops.gather_kv(kc, vc, torch.zeros(2, 1, dtype=torch.int32), torch.zeros(2, dtype=torch.int32))
    assert k.shape == (0, 2, 64) and v.shape == (0, 2, 64) and cu.tolist() == [0, 0, 0]


def test_empty_inputs():
    kc, vc, base = make_kv(3, 4, 2, 16, torch.float32, "arena")
    before = base.clone()
    ops.append_kv(torch.empty(0, 2, 16), torch.empty(0, 2, 16), kc, vc, torch.empty(0, dtype=torch.int64))
    ops.append_kv(torch.randn(2, 2, 16), torch.randn(2, 2, 16), kc, vc, torch.tensor([-1, -5]))
    assert ops.gather_blocks(base, torch.empty(0, dtype=torch.int32)).shape == (0, *base.shape[1:])
    ops.scatter_blocks(base, torch.empty(0, dtype=torch.int64), torch.empty(0, *base.shape[1:]))
    new = ops.compact_tokens(kc, vc, torch.empty(0, 2, dtype=torch.int32), torch.empty(0, dtype=torch.int32),
                             torch.empty(0, 8, dtype=torch.bool))
    assert new.shape == (0,) and new.dtype == torch.int32
    assert torch.equal(base, before)


def block_caches():
    """(name, make) for caches of every per-block layout the block copies handle."""
    def layer():            # one layer's K: [nb, bs, H, D], block stride = 6x per-block size
        base = rand((9, 3, 2, 4, 2, 64), torch.bfloat16)
        return base[:, 1, 0], base

    def arena():            # the whole arena: one dense run per block
        base = rand((9, 3, 2, 4, 2, 64), torch.float16)
        return base, base

    def all_layers_k():     # [nb, L, bs, H, D]: two collapsed dims (rows = layers)
        base = rand((9, 3, 2, 4, 2, 64), torch.float32)
        return base[:, :, 0], base

    def uncollapsible():    # [nb, L, bs, 1 of 2 heads, D]: three dims, takes the PyTorch path
        base = rand((9, 3, 2, 4, 2, 64), torch.float32)
        return base[:, :, 0, :, :1], base

    def odd_cols():         # row length not a multiple of the tile: masked tail
        base = rand((9, 2, 3, 40), torch.float32)
        return base[:, 1], base

    return [("layer", layer), ("arena", arena), ("all_layers_k", all_layers_k),
            ("uncollapsible", uncollapsible), ("odd_cols", odd_cols)]


BLOCK_CACHES = block_caches()


@pytest.mark.parametrize("name,make", BLOCK_CACHES, ids=[n for n, _ in BLOCK_CACHES])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_gather_blocks(name, make, id_dtype):
    cache, _ = make()
    ids = torch.randperm(cache.shape[0])[:5].to(id_dtype)
    ids[1] = ids[3]  # gathering one block twice is fine
    out = poison_(cache.new_empty((5, *cache.shape[1:])))
    res = ops.gather_blocks(cache, ids, out=out)
    assert res is out
    assert torch.equal(out, ref.gather_blocks(cache, ids))
    assert torch.equal(ops.gather_blocks(cache, ids), ref.gather_blocks(cache, ids))


def test_gather_blocks_strided_out():
    cache, _ = BLOCK_CACHES[0][1]()
    ids = torch.randperm(9)[:4]
    staging = poison_(cache.new_empty((4, 2, *cache.shape[1:])))
    out = staging[:, 1]  # a strided staging buffer
    ops.gather_blocks(cache, ids, out=out)
    assert torch.equal(out, cache[ids])
    assert staging[:, 0].isnan().all()


@pytest.mark.parametrize("name,make", BLOCK_CACHES, ids=[n for n, _ in BLOCK_CACHES])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_scatter_blocks(name, make, id_dtype):
    cache, base = make()
    ids = torch.randperm(cache.shape[0])[:4].to(id_dtype)
    blocks = rand((4, *cache.shape[1:]), cache.dtype)
    cache[ids.long()] = float("nan")  # poison the destinations
    expect = base.clone()
    ref.scatter_blocks(_same_view(expect, base, cache), ids, blocks)
    ops.scatter_blocks(cache, ids, blocks)
    assert torch.equal(base, expect)


def test_scatter_blocks_casts():
    cache, base = BLOCK_CACHES[0][1]()  # bf16
    ids = torch.tensor([8, 0])
    blocks = torch.randn(2, *cache.shape[1:])
    ops.scatter_blocks(cache, ids, blocks)
    assert torch.equal(cache[ids], blocks.to(cache.dtype))


def _same_view(other_base, base, view):
    """``view`` re-expressed over ``other_base`` (a clone of ``base``)."""
    return other_base.as_strided(view.shape, view.stride(), view.storage_offset() - base.storage_offset())


@pytest.mark.parametrize("name,make", BLOCK_CACHES, ids=[n for n, _ in BLOCK_CACHES])
def test_move_blocks(name, make):
    cache, base = make()
    nb = cache.shape[0]
    perm = torch.randperm(nb)
    # Disjoint sources and destinations, a copy-on-write fan-out (perm[0] twice), and a no-op pair
    # (perm[6] -> perm[6]) whose block is also another pair's source.
    src = perm[[0, 1, 2, 0, 6, 6]]
    dst = perm[[3, 4, 5, 8, 6, 7]]
    for id_dtype in (torch.int32, torch.int64):
        cache[dst[src != dst]] = float("nan")  # poison the real destinations
        expect = base.clone()
        ref.move_blocks(_same_view(expect, base, cache), src.to(id_dtype), dst.to(id_dtype))
        ops.move_blocks(cache, src.to(id_dtype), dst.to(id_dtype))
        assert torch.equal(base, expect)


def test_copy_blocks_fanout():
    cache, base = BLOCK_CACHES[1][1]()
    src = torch.tensor([2, 2, 2, 5])
    dst = torch.tensor([0, 1, 3, 4])
    expect = base.clone()
    ref.move_blocks(expect, src, dst)
    ops.copy_blocks(cache, src, dst)
    assert torch.equal(base, expect)


@pytest.mark.parametrize("src,dst", [
    ([1, 2], [2, 3]),        # chain: 2 is written by one pair and read by another
    ([1, 2], [2, 1]),        # swap
    ([1, 4], [3, 3]),        # duplicate destination
    ([3, 5], [3, 3]),        # a no-op pair and a real pair writing the same block
])
def test_move_blocks_rejects_overlapping_plans(src, dst):
    cache = rand((6, 2, 32), torch.float32)
    before = cache.clone()
    with pytest.raises(ValueError, match="dst|destination"):
        ops.move_blocks(cache, torch.tensor(src), torch.tensor(dst))
    assert torch.equal(cache, before)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7)), max_size=6))
def test_move_plan_rule_property(pairs):
    """Accepted plans give the reference's result; rejected ones really break the rule (and change nothing)."""
    cache = rand((8, 3, 16), torch.float16)
    src = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
    dst = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    real = [(s, d) for s, d in pairs if s != d]
    dsts = [d for _, d in pairs]
    legal = len(set(dsts)) == len(dsts) and not ({d for _, d in real} & {s for s, _ in real})
    before = cache.clone()
    if legal:
        ops.move_blocks(cache, src, dst)
        ref.move_blocks(before, src, dst)
        assert torch.equal(cache, before)
    else:
        with pytest.raises(ValueError):
            ops.move_blocks(cache, src, dst)
        assert torch.equal(cache, before)


def test_move_blocks_empty_and_noop():
    cache = rand((4, 8, 16), torch.float16)
    before = cache.clone()
    ops.move_blocks(cache, torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))
    ops.move_blocks(cache, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3]))
    assert torch.equal(cache, before)


def keep_patterns(seq_lens, max_tokens):
    b = len(seq_lens)
    pats = {"random": torch.rand(b, max_tokens) < 0.5, "all": torch.ones(b, max_tokens, dtype=torch.bool),
            "none": torch.zeros(b, max_tokens, dtype=torch.bool)}
    stream = torch.zeros(b, max_tokens, dtype=torch.bool)  # StreamingLLM: 2 sink tokens + last 5
    for i, n in enumerate(seq_lens):
        stream[i, :2] = True
        stream[i, max(0, n - 5):n] = True
    pats["streaming"] = stream
    return pats


@pytest.mark.parametrize("dtype,block_size,H,D,layout", KV_CASES[:4])
@pytest.mark.parametrize("pattern", ["random", "all", "none", "streaming"])
def test_compact_tokens(dtype, block_size, H, D, layout, pattern):
    seq_lens = [2 * block_size + 3, 1, 0, block_size, 3 * block_size]
    need = sum(-(-n // block_size) for n in seq_lens)
    num_blocks = need + 2
    kc, vc, base = make_kv(num_blocks, block_size, H, D, dtype, layout)
    bt = random_block_tables(seq_lens, block_size, num_blocks)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    max_tokens = max(seq_lens) + 2
    keep = keep_patterns(seq_lens, max_tokens)[pattern]
    keep[:, -1] = True  # past every sequence's end: must be ignored
    expect = base.clone()
    new_ref = ref.compact_tokens(*views_of(expect, layout), bt, sl, keep)
    new = ops.compact_tokens(kc, vc, bt, sl, keep)
    assert new.dtype == torch.int32 and torch.equal(new, new_ref)
    assert torch.equal(base, expect)


def test_compact_tokens_long_sequence_many_chunks():
    # A sequence much longer than one chunk of the kernel's token loop, in an arena view, heavy drops.
    block_size, H, D = 4, 1, 64
    seq_lens = [150, 37]
    need = sum(-(-n // block_size) for n in seq_lens)
    kc, vc, base = make_kv(need + 1, block_size, H, D, torch.float32, "arena")
    bt = random_block_tables(seq_lens, block_size, need + 1, dtype=torch.int64)
    sl = torch.tensor(seq_lens, dtype=torch.int64)
    keep = torch.rand(2, 150) < 0.3
    expect = base.clone()
    new_ref = ref.compact_tokens(*views_of(expect, "arena"), bt, sl, keep)
    new = ops.compact_tokens(kc, vc, bt, sl, keep)
    assert torch.equal(new, new_ref) and torch.equal(base, expect)


def test_reference_backend_matches():
    # The CPU path without the interpreter (what runs where TRITON_INTERPRET is off) is the reference.
    kc, vc, base = make_kv(4, 16, 2, 64, torch.float16, "arena")
    key, value = rand((5, 2, 64), torch.float16), rand((5, 2, 64), torch.float16)
    slots = torch.tensor([3, -1, 17, 40, 63])
    expect = base.clone()
    ref.append_kv(key, value, *views_of(expect, "arena"), slots)
    with ops.backend("reference"):
        ops.append_kv(key, value, kc, vc, slots)
        ops.move_blocks(base, torch.tensor([0]), torch.tensor([1]))
    expect[1] = expect[0]
    assert torch.equal(base, expect)


# ---------------------------------------------------------------------------------------------------
# 64-bit offsets. Caches whose block stride is 2^30 + 2^20 elements over a ~4.3 GB uint8 buffer that is
# never touched except at the few blocks used: the OS maps only those pages, so block id 2 sits at
# element offset > 2^31 from block 0 at the cost of a few pages. Block 0 starts 2^31 elements into the
# buffer so that an offset computed in int32 (wrapping by -2^32) still lands inside it: a 32-bit kernel
# then fails the comparisons instead of crashing the test process.

BIG_STRIDE = 2**30 + 2**20
BIG_BASE = 2**31


@pytest.fixture(scope="module")
def big_storage():
    try:
        return torch.empty(BIG_BASE + 2 * BIG_STRIDE + 2**16, dtype=torch.uint8)
    except RuntimeError as e:  # e.g. strict overcommit: the 4.3 GB of address space is refused
        pytest.skip(f"cannot reserve 4.3 GB of address space for the int64-offset test: {e}")


def big_cache(storage, block_shape, offset=0):
    inner = []
    acc = 1
    for s in reversed(block_shape):
        inner.insert(0, acc)
        acc *= s
    return storage.as_strided((3, *block_shape), (BIG_STRIDE, *inner), BIG_BASE + offset)


def test_int64_offsets_block_copies(big_storage):
    cache = big_cache(big_storage, (4, 2, 64))
    for i in range(3):
        cache[i].copy_(rand(cache.shape[1:], torch.uint8))
    assert 2 * cache.stride(0) >= 2**31
    blocks = [cache[i].clone() for i in range(3)]
    out = poison_(torch.empty(3, 4, 2, 64, dtype=torch.uint8))
    ops.gather_blocks(cache, torch.tensor([2, 0, 1], dtype=torch.int32), out=out)
    assert torch.equal(out, torch.stack([blocks[2], blocks[0], blocks[1]]))
    new = rand((1, 4, 2, 64), torch.uint8)
    ops.scatter_blocks(cache, torch.tensor([2]), new)
    assert torch.equal(cache[2], new[0]) and torch.equal(cache[0], blocks[0])
    ops.move_blocks(cache, torch.tensor([2], dtype=torch.int32), torch.tensor([1], dtype=torch.int32))
    assert torch.equal(cache[1], new[0]) and torch.equal(cache[2], new[0]) and torch.equal(cache[0], blocks[0])
    ops.move_blocks(cache, torch.tensor([0]), torch.tensor([2]))
    assert torch.equal(cache[2], blocks[0])


def test_int64_offsets_token_ops(big_storage):
    bs, H, D = 4, 2, 32
    kc = big_cache(big_storage, (bs, H, D))
    vc = big_cache(big_storage, (bs, H, D), offset=bs * H * D)
    for c in (kc, vc):
        for i in range(3):
            c[i].copy_(rand(c.shape[1:], torch.uint8))
    snap = lambda: torch.stack([torch.stack([kc[i], vc[i]]) for i in range(3)])  # noqa: E731
    # append into block 2 (offset > 2^31) and block 0
    key, value = rand((3, H, D), torch.uint8), rand((3, H, D), torch.uint8)
    slots = torch.tensor([2 * bs + 1, -1, 3])
    ops.append_kv(key, value, kc, vc, slots)
    assert torch.equal(kc[2, 1], key[0]) and torch.equal(vc[2, 1], value[0])
    assert torch.equal(kc[0, 3], key[2]) and torch.equal(vc[0, 3], value[2])
    # gather a sequence living in blocks [2, 0]
    bt = torch.tensor([[2, 0]], dtype=torch.int32)
    sl = torch.tensor([6], dtype=torch.int32)
    k, v, cu = ops.gather_kv(kc, vc, bt, sl)
    assert torch.equal(k, torch.cat([kc[2], kc[0, :2]])) and torch.equal(v, torch.cat([vc[2], vc[0, :2]]))
    # compact that sequence: keep tokens 1, 3, 5
    before = snap()
    keep = torch.tensor([[False, True, False, True, False, True]])
    new = ops.compact_tokens(kc, vc, bt, sl, keep)
    assert new.tolist() == [3]
    seq_k = torch.cat([before[2, 0], before[0, 0, :2]])
    assert torch.equal(kc[2, :3], seq_k[[1, 3, 5]])
    assert torch.equal(kc[2, 3], before[2, 0, 3]) and torch.equal(kc[0], before[0, 0])


def test_int64_head_offsets_token_ops(big_storage):
    """A cache stored heads-outermost (head stride 2^30 + 2^20 elements, 3 heads): head * stride passes
    2^31 inside one token, which the per-token kernels must compute in int64."""
    bs, H, D, nb = 4, 3, 32, 3
    strides = (bs * D, D, BIG_STRIDE, 1)
    kc = big_storage.as_strided((nb, bs, H, D), strides, BIG_BASE)
    vc = big_storage.as_strided((nb, bs, H, D), strides, BIG_BASE + nb * bs * D)
    assert (H - 1) * kc.stride(2) >= 2**31
    for c in (kc, vc):
        c.copy_(rand(c.shape, torch.uint8))
    ek, ev = kc.clone(), vc.clone()  # the reference runs on dense copies
    key, value = rand((3, H, D), torch.uint8), rand((3, H, D), torch.uint8)
    slots = torch.tensor([2 * bs + 1, -1, 3])
    ref.append_kv(key, value, ek, ev, slots)
    ops.append_kv(key, value, kc, vc, slots)
    assert torch.equal(kc, ek) and torch.equal(vc, ev)
    bt = torch.tensor([[2, 0]], dtype=torch.int32)
    sl = torch.tensor([6], dtype=torch.int32)
    k, v, _ = ops.gather_kv(kc, vc, bt, sl)
    rk, rv, _ = ref.gather_kv(ek, ev, bt, sl)
    assert torch.equal(k, rk) and torch.equal(v, rv)
    keep = torch.tensor([[False, True, False, True, False, True]])
    new_ref = ref.compact_tokens(ek, ev, bt, sl, keep)
    new = ops.compact_tokens(kc, vc, bt, sl, keep)
    assert torch.equal(new, new_ref) and torch.equal(kc, ek) and torch.equal(vc, ev)


# ---------------------------------------------------------------------------------------------------
# Index values that were not checked (CUDA without debug_checks(), or a direct torch.ops.kvtriton call):
# a bad value may give a wrong result but never a store outside the op's outputs or the blocks it names.


def test_gather_kv_unchecked_lengths_store_inside_outputs(monkeypatch):
    pad = 16 * 2 * 16  # 16 rows of [H=2, D=16] on each side of every output

    bufs = []

    def padded_empty(shape, dtype, device):
        n = 1
        for s in shape:
            n *= s
        buf = torch.full((n + 2 * pad,), float("nan"), dtype=dtype, device=device)
        bufs.append(buf)
        return buf[pad:pad + n].view(shape)

    monkeypatch.setattr(gather, "_empty", padded_empty)
    kc, vc, _ = make_kv(6, 4, 2, 16, torch.float32, "contiguous")
    bt = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32)
    # num_tokens below seq_lens.sum() (rows 4..13 past the end), and a negative length (cu_seqlens < 0:
    # rows -3..-1 before the start).
    for lens, num_tokens in (([5, 6, 3], 4), ([-3, 6, 1], 4)):
        bufs.clear()
        sl = torch.tensor(lens, dtype=torch.int32)
        k, v, cu = torch.ops.kvtriton.gather_kv(kc, vc, bt, sl, num_tokens)
        assert k.shape == (num_tokens, 2, 16) and len(bufs) == 2
        for buf in bufs:
            assert buf[:pad].isnan().all() and buf[-pad:].isnan().all()
        if lens[0] > 0:  # the rows that do belong to the output are right
            assert torch.equal(k, kc[0, :4]) and torch.equal(v, vc[0, :4])


def test_compact_tokens_unchecked_lengths_stay_in_own_blocks():
    # seq_lens[0] = 8 but its table row holds one block of 4 tokens: tokens 4.. would be looked up one
    # entry past the row, i.e. in sequence 1's row, and compaction would write into sequence 1's block.
    kc, vc, base = make_kv(4, 4, 2, 16, torch.float32, "arena")
    bt = torch.tensor([[0], [1]], dtype=torch.int32)
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[0, 0] = False
    expect = base.clone()
    new_ref = ref.compact_tokens(*views_of(expect, "arena"), bt, torch.tensor([4, 4]), keep)
    new = torch.ops.kvtriton.compact_tokens(kc, vc, bt, torch.tensor([8, 4], dtype=torch.int32), keep)
    assert torch.equal(new, new_ref) and torch.equal(base, expect)


# ---------------------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument, and nothing modified.

def _kv(dtype=torch.float32):
    kc, vc, base = make_kv(4, 8, 2, 16, dtype, "arena")
    return kc, vc, base


def bad_cases():
    kc, vc, base = _kv()
    key, value = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    slots = torch.tensor([0, 5, 9])
    bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    sl = torch.tensor([9, 3], dtype=torch.int32)
    keep = torch.ones(2, 16, dtype=torch.bool)
    arena = base
    A, G, C = ops.append_kv, ops.gather_kv, ops.compact_tokens
    cases = [
        # append_kv
        ("append key shape", lambda: A(key[:, :1], value, kc, vc, slots), ValueError, "key"),
        ("append value shape", lambda: A(key, value[:2], kc, vc, slots), ValueError, "value"),
        ("append slot dtype", lambda: A(key, value, kc, vc, slots.float()), ValueError, "slot_mapping"),
        ("append slot len", lambda: A(key, value, kc, vc, slots[:2]), ValueError, "slot_mapping"),
        ("append slot range", lambda: A(key, value, kc, vc, torch.tensor([0, 32, 1])), IndexError, "slot_mapping"),
        ("append cache shapes", lambda: A(key, value, kc, vc[:3], slots), ValueError, "value_cache"),
        ("append cache dtype", lambda: A(key, value, kc, vc.half(), slots), ValueError, "value_cache"),
        ("append same cache", lambda: A(key, value, kc, kc, slots), ValueError, "key_cache"),
        ("append last dim", lambda: A(key, value, kc.transpose(2, 3), vc.transpose(2, 3), slots),
         ValueError, "key_cache"),
        ("append key last dim", lambda: A(key.transpose(1, 2).contiguous().transpose(1, 2), value, kc, vc, slots),
         ValueError, "key"),
        ("append cache ndim", lambda: A(key, value, kc[0], vc[0], slots), ValueError, "key_cache"),
        ("append key not tensor", lambda: A(key.tolist(), value, kc, vc, slots), ValueError, "key"),
        # gather_kv
        ("gather table dtype", lambda: G(kc, vc, bt.float(), sl), ValueError, "block_tables"),
        ("gather table ndim", lambda: G(kc, vc, bt[0], sl), ValueError, "block_tables"),
        ("gather lens shape", lambda: G(kc, vc, bt, sl[:1]), ValueError, "seq_lens"),
        ("gather lens range", lambda: G(kc, vc, bt, torch.tensor([17, 3], dtype=torch.int32)), IndexError, "seq_lens"),
        ("gather lens negative", lambda: G(kc, vc, bt, torch.tensor([-1, 3], dtype=torch.int32)), IndexError, "seq_lens"),
        ("gather table range", lambda: G(kc, vc, torch.tensor([[0, 4], [2, 3]], dtype=torch.int32), sl),
         IndexError, "block_tables"),
        ("gather num_tokens", lambda: G(kc, vc, bt, sl, num_tokens=11), ValueError, "num_tokens"),
        # gather/scatter blocks
        ("gather_blocks id range", lambda: ops.gather_blocks(arena, torch.tensor([0, 4])), IndexError, "block_ids"),
        ("gather_blocks id neg", lambda: ops.gather_blocks(arena, torch.tensor([-1])), IndexError, "block_ids"),
        ("gather_blocks id dtype", lambda: ops.gather_blocks(arena, torch.tensor([0.0])), ValueError, "block_ids"),
        ("gather_blocks id ndim", lambda: ops.gather_blocks(arena, torch.tensor([[0]])), ValueError, "block_ids"),
        ("gather_blocks out shape", lambda: ops.gather_blocks(arena, torch.tensor([0, 1]),
                                                              out=torch.empty(1, *arena.shape[1:])), ValueError, "out"),
        ("gather_blocks out dtype", lambda: ops.gather_blocks(arena, torch.tensor([0]),
                                                              out=torch.empty(1, *arena.shape[1:]).half()),
         ValueError, "out"),
        ("scatter shape", lambda: ops.scatter_blocks(arena, torch.tensor([0, 1]), torch.randn(1, *arena.shape[1:])),
         ValueError, "blocks"),
        ("scatter dup ids", lambda: ops.scatter_blocks(arena, torch.tensor([1, 1]), torch.randn(2, *arena.shape[1:])),
         ValueError, "block_ids"),
        ("scatter id range", lambda: ops.scatter_blocks(arena, torch.tensor([5]), torch.randn(1, *arena.shape[1:])),
         IndexError, "block_ids"),
        ("scatter last dim", lambda: ops.scatter_blocks(arena, torch.tensor([0]),
                                                        torch.randn(1, *arena.shape[1:]).transpose(-1, -2)),
         ValueError, "blocks"),
        # move_blocks
        ("move src range", lambda: ops.move_blocks(arena, torch.tensor([4]), torch.tensor([0])), IndexError, "src"),
        ("move dst range", lambda: ops.move_blocks(arena, torch.tensor([0]), torch.tensor([-2])), IndexError, "dst"),
        ("move shapes", lambda: ops.move_blocks(arena, torch.tensor([0, 1]), torch.tensor([2])), ValueError, "dst"),
        ("move dtype", lambda: ops.move_blocks(arena, torch.tensor([0.0]), torch.tensor([2])), ValueError, "src"),
        ("move forced validate", lambda: ops.move_blocks(arena, torch.tensor([0, 2]), torch.tensor([2, 3]),
                                                         validate=True), ValueError, "destination"),
        # compact_tokens
        ("compact keep dtype", lambda: C(kc, vc, bt, sl, keep.int()), ValueError, "keep"),
        ("compact keep rows", lambda: C(kc, vc, bt, sl, keep[:1]), ValueError, "keep"),
        ("compact keep short", lambda: C(kc, vc, bt, sl, keep[:, :8]), IndexError, "seq_lens"),
        ("compact shared block", lambda: C(kc, vc, torch.tensor([[0, 1], [1, 3]], dtype=torch.int32), sl, keep),
         ValueError, "block_tables"),
        ("compact table range", lambda: C(kc, vc, torch.tensor([[0, 9], [2, 3]], dtype=torch.int32), sl, keep),
         IndexError, "block_tables"),
    ]
    return cases, base


BAD = bad_cases()[0]


@pytest.mark.parametrize("i", range(len(BAD)), ids=[c[0] for c in BAD])
def test_bad_input_raises_and_changes_nothing(i):
    cases, base = bad_cases()  # fresh tensors for every case
    _, call, exc, match = cases[i]
    before = base.clone()
    with pytest.raises(exc, match=match):
        call()
    assert torch.equal(base, before)


def test_devices_must_match():
    meta = torch.empty(4, 8, 2, 16, device="meta")
    kc, vc, _ = _kv()
    with pytest.raises(ValueError, match="value_cache"):
        ops.append_kv(torch.randn(1, 2, 16), torch.randn(1, 2, 16), kc, meta, torch.tensor([0]))
    with pytest.raises(ValueError, match="slot_mapping"):
        ops.append_kv(torch.randn(1, 2, 16), torch.randn(1, 2, 16), kc, vc, torch.tensor([0], device="meta"))
