"""Every index argument of every op passed as a strided, offset or transposed view (issue 10 §1).

The kernels address index tensors through their pointers; a view whose elements are not where a
contiguous tensor's would be must reach them either way (the ops make such views contiguous). Each view
here is built so that the memory a stride-ignoring kernel would read holds *valid but wrong* values
(other slots, other block ids, other lengths): the bug then shows as a wrong result, not a crash.

Both paths (the reference backend and the Triton kernels in the interpreter), both entry points (the
public function and the registered ``torch.ops.kvtriton`` op, which ``torch.compile`` and ``opcheck``
call), outputs poisoned before the call, results compared exactly with the reference on contiguous
indices (attention: the float64 reference, 1e-5).
"""

from __future__ import annotations

import random

import pytest
import torch

import kvtriton.ops as ops
from kvtriton.ops import attention as attn
from kvtriton.ops import gather
from kvtriton.ops import reference as ref
from kvtriton.ops._backend import HAS_TRITON, INTERPRET

pytestmark = pytest.mark.skipif(not (HAS_TRITON and INTERPRET),
                                reason="needs triton with TRITON_INTERPRET=1 (set in conftest.py)")

KINDS = ["strided", "offset", "transposed"]
PATHS = ["reference", "triton"]
KV = torch.ops.kvtriton


@pytest.fixture(autouse=True)
def seed():
    s = random.randrange(2**31)
    torch.manual_seed(s)
    print(f"seed={s}")  # shown by pytest when a test fails, to reproduce it
    yield s


def index_view(x: torch.Tensor, kind: str, junk: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (1-D or 2-D) as a non-contiguous view holding the same values.

    strided: every other element (1-D) or column (2-D) of a buffer. offset: ``buf[1:]`` (1-D) or
    ``buf[1:, 1:]`` of a wider buffer (2-D). transposed: 1-D, a row of the transpose of a row-major
    ``[n, 3]`` buffer (stride 3, offset 1); 2-D, ``y.t()`` of a contiguous ``[max_blocks, batch]`` y.
    The memory a kernel that ignored the strides would read instead holds ``junk`` (x's shape).
    """
    junk = torch.zeros_like(x) if junk is None else junk.to(x.dtype)
    if x.dim() == 1:
        if kind == "strided":
            v = torch.stack([x, junk], 1).flatten()[::2]
        elif kind == "offset":
            v = torch.cat([junk[:1], x])[1:]
        elif kind == "transposed":
            v = torch.stack([junk, x, junk], 1).t()[1]
        else:
            raise AssertionError(kind)
    else:
        b, m = x.shape
        if kind == "strided":
            v = torch.stack([x, junk], 2).flatten(1)[:, ::2]
        elif kind == "offset":
            buf = torch.zeros(b + 1, m + 1, dtype=x.dtype)
            buf[:b, :m] = junk
            buf[1:, 1:] = x
            v = buf[1:, 1:]
        elif kind == "transposed":
            v = x.t().contiguous().t()
        else:
            raise AssertionError(kind)
    assert torch.equal(v, x) and (kind == "offset" or not v.is_contiguous())
    assert kind != "offset" or v.storage_offset() > 0
    return v


def make_kv(num_blocks, block_size, H, D, dtype=torch.float32):
    """K/V caches as layer 1 of an arena ``[num_blocks, 2 layers, 2, block_size, H, D]``."""
    base = torch.randn(num_blocks, 2, 2, block_size, H, D).to(dtype)
    return base[:, 1, 0], base[:, 1, 1], base


def kv_views(base):
    return base[:, 1, 0], base[:, 1, 1]


def block_tables_for(seq_lens, block_size, num_blocks, dtype=torch.int32):
    """Distinct blocks from a random permutation, padding -1; returns (table, unused block ids)."""
    need = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(need + [1]) + 1
    perm = torch.randperm(num_blocks)
    bt = torch.full((len(seq_lens), max_blocks), -1, dtype=dtype)
    k = 0
    for b, m in enumerate(need):
        bt[b, :m] = perm[k:k + m].to(dtype)
        k += m
    return bt, perm[k:]


# ---------------------------------------------------------------------------------------------------
# append_kv: slot_mapping


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("entry", ["public", "op"])
def test_append_kv_slot_mapping(kind, path, entry):
    nb, bs, H, D, T = 5, 4, 2, 16, 6
    kc, vc, base = make_kv(nb, bs, H, D)
    key, value = torch.randn(T, H, D), torch.randn(T, H, D)
    perm = torch.randperm(nb * bs)
    slots = perm[:T].clone()
    slots[2] = -1                               # padding
    junk = perm[T:2 * T]                        # slots outside the plan
    dest = slots[slots >= 0]
    for c in (kc, vc):
        c[dest // bs, dest % bs] = float("nan")
    expect = base.clone()
    ref.append_kv(key, value, *kv_views(expect), slots)
    view = index_view(slots, kind, junk)
    with ops.backend(path):
        (ops.append_kv if entry == "public" else KV.append_kv)(key, value, kc, vc, view)
    assert torch.equal(base, expect)


# ---------------------------------------------------------------------------------------------------
# gather_kv: block_tables, seq_lens


def _poison_gather_outputs(monkeypatch):
    monkeypatch.setattr(gather, "_empty", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arg", ["block_tables", "seq_lens"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("entry", ["public", "op"])
def test_gather_kv(monkeypatch, kind, arg, path, entry):
    _poison_gather_outputs(monkeypatch)
    bs, H, D = 4, 2, 16
    # A stride-ignoring kernel reads lengths [x0, 0, x1, 0] or [x0, 0, 0, x1] (junk 0): x1 = 1 keeps
    # its wrong rows inside the output, so the test fails on values, not with a wild store.
    lens = [bs + 3, 1, bs, 2 * bs + 1]
    nb = sum(-(-n // bs) for n in lens) + 3
    kc, vc, _ = make_kv(nb, bs, H, D)
    bt, spare = block_tables_for(lens, bs, nb)
    sl = torch.tensor(lens, dtype=torch.int32)
    rk, rv, rcu = ref.gather_kv(kc, vc, bt, sl)
    if arg == "block_tables":
        bt = index_view(bt, kind, torch.randint(0, nb, bt.shape))
    else:
        sl = index_view(sl, kind)
    with ops.backend(path):
        if entry == "public":
            k, v, cu = ops.gather_kv(kc, vc, bt, sl)
        else:
            k, v, cu = KV.gather_kv(kc, vc, bt, sl, sum(lens))
    assert torch.equal(cu, rcu) and torch.equal(k, rk) and torch.equal(v, rv)


# ---------------------------------------------------------------------------------------------------
# gather_blocks / scatter_blocks: block_ids


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("entry", ["public", "op"])
def test_gather_blocks_ids(kind, path, entry):
    cache = torch.randn(9, 2, 4, 2, 16)
    perm = torch.randperm(9)
    ids, junk = perm[:4], perm[4:8]
    out = torch.full((4, *cache.shape[1:]), float("nan"))
    view = index_view(ids, kind, junk)
    with ops.backend(path):
        if entry == "public":
            assert ops.gather_blocks(cache, view, out=out) is out
        else:
            KV.gather_blocks(cache, view, out)
    assert torch.equal(out, ref.gather_blocks(cache, ids))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("entry", ["public", "op"])
def test_scatter_blocks_ids(kind, path, entry):
    base = torch.randn(9, 2, 2, 4, 2, 16)
    cache = base[:, 1]                           # a strided cache view
    perm = torch.randperm(9)
    ids, junk = perm[:4], perm[4:8]
    blocks = torch.randn(4, *cache.shape[1:])
    cache[ids] = float("nan")
    expect = base.clone()
    ref.scatter_blocks(expect[:, 1], ids, blocks)
    view = index_view(ids, kind, junk)
    with ops.backend(path):
        (ops.scatter_blocks if entry == "public" else KV.scatter_blocks)(cache, view, blocks)
    assert torch.equal(base, expect)


# ---------------------------------------------------------------------------------------------------
# move_blocks / copy_blocks: src, dst


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arg", ["src", "dst", "both"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("entry", ["public", "op"])
def test_move_blocks_src_dst(kind, arg, path, entry):
    arena = torch.randn(12, 2, 2, 4, 16)
    perm = torch.randperm(12)
    # Fan-out (perm[0] twice), a no-op pair (perm[5] -> perm[5]); perm[9:] are outside the plan, and are
    # what a stride-ignoring kernel would read as ids (the plan check would never have seen them).
    src = perm[[0, 1, 0, 5]]
    dst = perm[[2, 3, 4, 5]]
    junk = perm[9:12].repeat(2)[:4]
    arena[dst[src != dst]] = float("nan")
    expect = arena.clone()
    ref.move_blocks(expect, src, dst)
    s = index_view(src, kind, junk) if arg in ("src", "both") else src
    d = index_view(dst, kind, junk.flip(0)) if arg in ("dst", "both") else dst
    with ops.backend(path):
        if entry == "public":
            ops.copy_blocks(arena, s, d) if arg == "both" else ops.move_blocks(arena, s, d)
        else:
            KV.move_blocks(arena, s, d)
    assert torch.equal(arena, expect)


# ---------------------------------------------------------------------------------------------------
# compact_tokens: block_tables, seq_lens, keep


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arg", ["block_tables", "seq_lens", "keep"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("entry", ["public", "op"])
def test_compact_tokens(kind, arg, path, entry):
    bs, H, D = 4, 2, 16
    lens = [2 * bs + 3, 1, bs + 2]
    nb = sum(-(-n // bs) for n in lens) + 3
    kc, vc, base = make_kv(nb, bs, H, D)
    bt, _ = block_tables_for(lens, bs, nb)
    sl = torch.tensor(lens, dtype=torch.int32)
    keep = torch.rand(len(lens), max(lens) + 1) < 0.5
    keep[:, 0] = False                          # every sequence moves something
    expect = base.clone()
    new_ref = ref.compact_tokens(*kv_views(expect), bt, sl, keep)
    if arg == "block_tables":
        bt = index_view(bt, kind, torch.randint(0, nb, bt.shape))
    elif arg == "seq_lens":
        sl = index_view(sl, kind, torch.full_like(sl, max(lens)))
    else:
        keep = index_view(keep, kind, ~keep)
    with ops.backend(path):
        new = (ops.compact_tokens if entry == "public" else KV.compact_tokens)(kc, vc, bt, sl, keep)
    assert torch.equal(new, new_ref) and torch.equal(base, expect)


# ---------------------------------------------------------------------------------------------------
# paged_decode_attention: block_tables, seq_lens, q


def _attn_case(batch=3, hq=4, hkv=2, d=16, bs=4, lens=(9, 1, 6)):
    max_blocks = -(-max(lens) // bs) + 1
    nb = batch * max_blocks + 2
    arena = torch.randn(nb, 2, 2, bs, hkv, d)
    kc, vc = arena[:, 1, 0], arena[:, 1, 1]
    bt = torch.randperm(nb)[:batch * max_blocks].view(batch, max_blocks).int()
    sl = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(batch, hq, d)
    return q, kc, vc, bt, sl


def _rel_err(out, expect):
    out, expect = out.double(), expect.double()
    finite = torch.isfinite(expect)
    assert torch.equal(finite, torch.isfinite(out)), "non-finite entries differ"
    return ((out[finite] - expect[finite]).norm() / expect[finite].norm().clamp_min(1e-30)).item()


ATTN_VIEWS = [(a, k) for a in ("block_tables", "seq_lens", "q") for k in KINDS] + [("q", "last_dim")]


@pytest.mark.parametrize("arg,kind", ATTN_VIEWS, ids=[f"{a}-{k}" for a, k in ATTN_VIEWS])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("entry", ["public", "op"])
def test_paged_decode_attention(monkeypatch, arg, kind, path, entry):
    monkeypatch.setattr(attn, "_empty", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))
    q, kc, vc, bt, sl = _attn_case()
    r_out, r_lse, r_mass = ref.paged_decode_attention(q, kc, vc, bt, sl, return_lse=True,
                                                      return_block_mass=True)
    if arg == "block_tables":
        bt = index_view(bt, kind, torch.randint(0, kc.shape[0], bt.shape))
    elif arg == "seq_lens":
        sl = index_view(sl, kind, torch.full_like(sl, 3))
    elif kind == "transposed":                  # batch and head dims swapped in memory
        q = q.transpose(0, 1).contiguous().transpose(0, 1)
    elif kind == "strided":
        q = torch.stack([q, torch.randn_like(q)], 1)[:, 0]
    elif kind == "offset":
        q = torch.cat([torch.randn(1, *q.shape[1:]), q])[1:]
    else:                                       # head_dim not the innermost dimension
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        assert q.stride(-1) != 1
    with ops.backend(path):
        if entry == "public":
            out, lse, mass = ops.paged_decode_attention(q, kc, vc, bt, sl, return_lse=True,
                                                        return_block_mass=True, num_splits=2)
        else:
            out, lse, mass = KV.paged_decode_attention(q, kc, vc, bt, sl, 0.25, 0, True, 2)
    assert _rel_err(out, r_out) < 1e-5 and _rel_err(lse, r_lse) < 1e-5 and _rel_err(mass, r_mass) < 1e-5


# ---------------------------------------------------------------------------------------------------
# torch.compile: the traced public function hands the registered op a strided view


def test_compiled_append_kv_strided_slots():
    nb, bs, H, D, T = 4, 4, 2, 16, 5
    kc, vc, base = make_kv(nb, bs, H, D)
    key, value = torch.randn(T, H, D), torch.randn(T, H, D)
    perm = torch.randperm(nb * bs)
    slots = perm[:T]
    view = index_view(slots, "strided", perm[T:2 * T])
    expect = base.clone()
    ref.append_kv(key, value, *kv_views(expect), slots)
    fn = torch.compile(lambda k, v, s: ops.append_kv(k, v, kc, vc, s), backend="eager", fullgraph=True)
    with ops.backend("triton"):
        fn(key, value, view)
    assert torch.equal(base, expect)
