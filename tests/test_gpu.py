"""Every op on a CUDA device against its reference, at sizes the interpreter cannot reach.

Marked ``gpu``: skipped where no CUDA device exists. Run with ``TRITON_INTERPRET=0`` on a GPU machine
(``experiments/gpu_check.sh`` does).
"""

import pytest
import torch

from kvtriton import ops
from kvtriton.ops import reference as ref

pytestmark = pytest.mark.gpu

DEV = "cuda"


def _rel_err(out, expect):
    return ((out.double() - expect.double()).norm() / expect.double().norm().clamp_min(1e-30)).item()


def _arena(num_blocks, layers, bs, h, d, dtype):
    """A cache laid out as the memory manager lays it out: one block holds every layer's K and V."""
    return torch.randn(num_blocks, layers, 2, bs, h, d, device=DEV).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("h,d", [(8, 128), (1, 64), (4, 256)])
def test_append_kv_cuda(dtype, h, d):
    arena = _arena(600, 4, 16, h, d, dtype)
    kc, vc = arena[:, 2, 0], arena[:, 2, 1]
    n = 3000
    slots = torch.randperm(600 * 16, device=DEV)[:n].long()
    slots[::7] = -1
    k = torch.randn(n, h, d, device=DEV).to(dtype)
    v = torch.randn(n, h, d, device=DEV).to(dtype)
    expect = arena.clone()
    ref.append_kv(k, v, expect[:, 2, 0], expect[:, 2, 1], slots)
    ops.append_kv(k, v, kc, vc, slots)
    torch.cuda.synchronize()
    assert torch.equal(arena, expect)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gather_kv_and_blocks_cuda(dtype):
    arena = _arena(512, 3, 16, 8, 128, dtype)
    kc, vc = arena[:, 1, 0], arena[:, 1, 1]
    lens = torch.tensor([1, 16, 17, 1000, 4095], dtype=torch.int32, device=DEV)
    tables = torch.randint(0, 512, (5, 256), device=DEV, dtype=torch.int32)  # shared blocks allowed
    k, v, cu = ops.gather_kv(kc, vc, tables, lens)
    rk, rv, rcu = ref.gather_kv(kc, vc, tables, lens)
    assert torch.equal(k, rk) and torch.equal(v, rv) and torch.equal(cu, rcu)
    ids = torch.randperm(512, device=DEV)[:300]
    blocks = ops.gather_blocks(arena, ids)
    assert torch.equal(blocks, arena[ids])
    target = torch.zeros_like(arena)
    ops.scatter_blocks(target, ids, blocks)
    assert torch.equal(target[ids], arena[ids])


def test_move_blocks_cuda():
    arena = _arena(2048, 8, 16, 8, 128, torch.bfloat16)
    perm = torch.randperm(2048, device=DEV)
    src, dst = perm[:700], perm[700:1400]
    expect = arena.clone()
    expect[dst] = arena[src]
    ops.move_blocks(arena, src, dst)
    assert torch.equal(arena, expect)


def test_compact_tokens_cuda():
    arena = _arena(1024, 2, 16, 8, 128, torch.bfloat16)
    kc, vc = arena[:, 0, 0], arena[:, 0, 1]
    lens = torch.tensor([5, 16, 333, 2000], dtype=torch.int32, device=DEV)
    tables = torch.randperm(1024, device=DEV)[: 4 * 128].view(4, 128).int()
    keep = torch.rand(4, 2048, device=DEV) < 0.4
    expect = arena.clone()
    new_ref = ref.compact_tokens(expect[:, 0, 0], expect[:, 0, 1], tables, lens, keep)
    new = ops.compact_tokens(kc, vc, tables, lens, keep)
    assert torch.equal(new.cpu(), new_ref.cpu())
    # Slots past the new lengths are unspecified; compare the live tokens only.
    k, _, _ = ops.gather_kv(kc, vc, tables, new)
    rk, _, _ = ref.gather_kv(expect[:, 0, 0], expect[:, 0, 1], tables, new_ref)
    assert torch.equal(k, rk)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("batch,ctx,hq,hkv,d,bs", [
    (4, 1000, 32, 8, 128, 16), (1, 20000, 32, 8, 128, 16), (3, 777, 8, 8, 64, 32),
    (2, 3000, 16, 2, 256, 128), (16, 1, 32, 8, 128, 16),
])
def test_paged_decode_attention_cuda(dtype, tol, batch, ctx, hq, hkv, d, bs):
    max_blocks = -(-ctx // bs)
    nb = batch * max_blocks + 3
    arena = _arena(nb, 2, bs, hkv, d, dtype)
    kc, vc = arena[:, 1, 0], arena[:, 1, 1]
    tables = torch.randperm(nb, device=DEV)[: batch * max_blocks].view(batch, max_blocks).int()
    lens = torch.randint(1, ctx + 1, (batch,), device=DEV, dtype=torch.int32)
    lens[0] = ctx
    q = torch.randn(batch, hq, d, device=DEV).to(dtype)
    out, lse, mass = ops.paged_decode_attention(q, kc, vc, tables, lens, return_lse=True,
                                                return_block_mass=True)
    r_out, r_lse, r_mass = ref.paged_decode_attention(q, kc, vc, tables, lens, return_lse=True,
                                                      return_block_mass=True)
    assert _rel_err(out, r_out) < tol
    assert _rel_err(lse, r_lse) < 1e-4
    assert _rel_err(mass, r_mass) < max(tol, 1e-4)
    win = ops.paged_decode_attention(q, kc, vc, tables, lens, sliding_window=100)
    r_win = ref.paged_decode_attention(q, kc, vc, tables, lens, sliding_window=100)
    assert _rel_err(win, r_win) < tol


# ---------------------------------------------------------------------------------------------------
# Index arguments as strided / offset / transposed views (issue 10 §1), through the public functions
# and the registered ops (on CUDA the public call skips the dispatcher: both must normalise).


def _view(x, kind, junk):
    """``x`` as a non-contiguous view; a stride-ignoring kernel would read ``junk`` (valid, wrong)."""
    if x.dim() == 1:
        if kind == "strided":
            v = torch.stack([x, junk], 1).flatten()[::2]
        elif kind == "offset":
            v = torch.cat([junk[:1], x])[1:]
        else:
            v = torch.stack([junk, x, junk], 1).t()[1]
    elif kind == "strided":
        v = torch.stack([x, junk], 2).flatten(1)[:, ::2]
    elif kind == "offset":
        b, m = x.shape
        buf = torch.zeros(b + 1, m + 1, dtype=x.dtype, device=x.device)
        buf[:b, :m] = junk
        buf[1:, 1:] = x
        v = buf[1:, 1:]
    else:
        v = x.t().contiguous().t()
    assert torch.equal(v, x)
    return v


VIEW_KINDS = ["strided", "offset", "transposed"]


@pytest.mark.parametrize("kind", VIEW_KINDS)
@pytest.mark.parametrize("entry", ["public", "op"])
def test_strided_index_views_copy_ops_cuda(kind, entry):
    kv = torch.ops.kvtriton
    arena = _arena(256, 2, 16, 4, 64, torch.bfloat16)
    kc, vc = arena[:, 1, 0], arena[:, 1, 1]
    perm = torch.randperm(256 * 16, device=DEV)
    n = 500
    slots, junk = perm[:n], perm[n:2 * n]
    k = torch.randn(n, 4, 64, device=DEV).to(torch.bfloat16)
    v = torch.randn(n, 4, 64, device=DEV).to(torch.bfloat16)
    expect = arena.clone()
    ref.append_kv(k, v, expect[:, 1, 0], expect[:, 1, 1], slots)
    (ops.append_kv if entry == "public" else kv.append_kv)(k, v, kc, vc, _view(slots, kind, junk))
    assert torch.equal(arena, expect)

    ids = torch.randperm(256, device=DEV)
    src, dst, other = ids[:40], ids[40:80], ids[80:120]
    out = torch.full((40, *arena.shape[1:]), float("nan"), device=DEV, dtype=arena.dtype)
    if entry == "public":
        ops.gather_blocks(arena, _view(src, kind, other), out=out)
    else:
        kv.gather_blocks(arena, _view(src, kind, other), out)
    assert torch.equal(out, arena[src])
    expect = arena.clone()
    expect[dst] = arena[src]
    if entry == "public":
        ops.move_blocks(arena, _view(src, kind, other), _view(dst, kind, other.flip(0)), validate=True)
    else:
        kv.move_blocks(arena, _view(src, kind, other), _view(dst, kind, other.flip(0)))
    assert torch.equal(arena, expect)
    blocks = torch.randn(40, *arena.shape[1:], device=DEV).to(arena.dtype)
    (ops.scatter_blocks if entry == "public" else kv.scatter_blocks)(arena, _view(dst, kind, other), blocks)
    expect[dst] = blocks
    assert torch.equal(arena, expect)

    lens = torch.tensor([1, 16, 17, 300, 2], dtype=torch.int32, device=DEV)
    tables = torch.randperm(256, device=DEV)[:5 * 20].view(5, 20).int()
    junk_t = torch.randint(0, 256, tables.shape, device=DEV, dtype=torch.int32)
    total = int(lens.sum())
    rk, rv, rcu = ref.gather_kv(kc, vc, tables, lens)
    for bt, sl in ((_view(tables, kind, junk_t), lens), (tables, _view(lens, kind, torch.zeros_like(lens)))):
        if entry == "public":
            gk, gv, cu = ops.gather_kv(kc, vc, bt, sl, num_tokens=total)
        else:
            gk, gv, cu = kv.gather_kv(kc, vc, bt, sl, total)
        assert torch.equal(gk, rk) and torch.equal(gv, rv) and torch.equal(cu, rcu)

    keep = torch.rand(5, 320, device=DEV) < 0.5
    expect = arena.clone()
    new_ref = ref.compact_tokens(expect[:, 1, 0], expect[:, 1, 1], tables, lens, keep)
    fn = ops.compact_tokens if entry == "public" else kv.compact_tokens
    new = fn(kc, vc, _view(tables, kind, junk_t), lens, keep)
    assert torch.equal(new, new_ref) and torch.equal(arena, expect)


@pytest.mark.parametrize("kind", VIEW_KINDS)
@pytest.mark.parametrize("entry", ["public", "op"])
def test_strided_index_views_attention_cuda(kind, entry):
    batch, hq, hkv, d, bs, ctx = 4, 32, 8, 128, 16, 700
    max_blocks = -(-ctx // bs)
    nb = batch * max_blocks + 3
    arena = _arena(nb, 2, bs, hkv, d, torch.bfloat16)
    kc, vc = arena[:, 1, 0], arena[:, 1, 1]
    tables = torch.randperm(nb, device=DEV)[: batch * max_blocks].view(batch, max_blocks).int()
    lens = torch.tensor([ctx, 1, 333, 64], dtype=torch.int32, device=DEV)
    q = torch.randn(batch, hq, d, device=DEV).to(torch.bfloat16)
    r_out, r_lse = ref.paged_decode_attention(q, kc, vc, tables, lens, return_lse=True)
    q_odd = q.transpose(1, 2).contiguous().transpose(1, 2)          # head_dim not innermost
    bt = _view(tables, kind, torch.randint(0, nb, tables.shape, device=DEV, dtype=torch.int32))
    sl = _view(lens, kind, torch.full_like(lens, 5))
    for qq, b, s in ((q, bt, lens), (q, tables, sl), (q_odd, tables, lens)):
        if entry == "public":
            out, lse = ops.paged_decode_attention(qq, kc, vc, b, s, return_lse=True)
        else:
            out, lse, _ = torch.ops.kvtriton.paged_decode_attention(qq, kc, vc, b, s, d ** -0.5, 0, False, 0)
        assert _rel_err(out, r_out) < 1e-2 and _rel_err(lse, r_lse) < 1e-4


# ---------------------------------------------------------------------------------------------------
# Non-finite values in attention (issue 10 §6) on the GPU, whose max ignores NaN where the interpreter's
# propagates it: NaN out and lse for exactly the heads the reference marks, both split paths.


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("which", ["nan_q", "inf_key", "neg_inf_key", "nan_value", "overflow"])
def test_attention_nonfinite_cuda(dtype, num_splits, which):
    batch, hq, hkv, d, bs = 3, 16, 4, 128, 16
    lens = torch.tensor([200, 0, 77], dtype=torch.int32, device=DEV)
    max_blocks = 13
    nb = batch * max_blocks + 2
    arena = _arena(nb, 1, bs, hkv, d, dtype)
    kc, vc = arena[:, 0, 0], arena[:, 0, 1]
    tables = torch.randperm(nb, device=DEV)[: batch * max_blocks].view(batch, max_blocks).int()
    q = torch.randn(batch, hq, d, device=DEV).to(dtype)
    scale = None
    if which == "nan_q":
        q[0, 5, 7] = float("nan")
        q[1] = float("nan")                                           # empty sequence: 0 / -inf
    elif which == "inf_key":
        kc[tables[2, 2], 3, 1, 9] = float("inf")
    elif which == "neg_inf_key":
        q[0, :4, 0] = q[0, :4, 0].abs() + 0.1
        kc[tables[0, 5], 2, 0, 0] = float("-inf")
    elif which == "nan_value":
        vc[tables[2, 0], 0, 2, 3] = float("nan")
    else:
        q = q * 1e36                                  # q.k finite, q.k * 1e4 * log2(e) is not
        scale = 1e4
    out, lse, mass = ops.paged_decode_attention(q, kc, vc, tables, lens, scale=scale, return_lse=True,
                                                return_block_mass=True, num_splits=num_splits)
    r_out, r_lse, r_mass = ref.paged_decode_attention(q, kc, vc, tables, lens, scale=scale, return_lse=True,
                                                      return_block_mass=True)
    for a, b in ((out, r_out), (lse, r_lse), (mass, r_mass)):
        for f in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(f(a).cpu(), f(b).cpu()), (which, f.__name__)
    fin = torch.isfinite(r_lse)
    assert _rel_err(lse[fin], r_lse[fin]) < 1e-4
    ok = torch.isfinite(r_out)
    assert _rel_err(out[ok], r_out[ok]) < (1e-2 if dtype != torch.float32 else 1e-5)
    if which != "nan_value":
        assert lse.isnan().any()


def test_unchecked_bad_indices_stay_in_bounds_cuda(monkeypatch):
    """Without debug_checks() the CUDA path reads no index values on the host: a bad length or block id
    gives a wrong answer at worst, never an access outside the op's tensors."""
    from kvtriton.ops import gather
    if ops.debug_checks():
        pytest.skip("KVTRITON_DEBUG=1: index values are checked on the host")
    pad = 64 * 4 * 64

    bufs = []

    def padded_empty(shape, dtype, device):
        n = 1
        for s in shape:
            n *= s
        buf = torch.full((n + 2 * pad,), float("nan"), dtype=dtype, device=device)
        bufs.append(buf)
        return buf[pad:pad + n].view(shape)

    monkeypatch.setattr(gather, "_empty", padded_empty)
    arena = _arena(16, 1, 16, 4, 64, torch.float32)
    kc, vc = arena[:, 0, 0], arena[:, 0, 1]
    bt = torch.arange(16, device=DEV, dtype=torch.int32).view(4, 4)
    for lens, num_tokens in (([40, 50, 7, 3], 30), ([-20, 50, 1, 1], 32)):
        bufs.clear()
        ops.gather_kv(kc, vc, bt, torch.tensor(lens, dtype=torch.int32, device=DEV), num_tokens=num_tokens)
        torch.cuda.synchronize()
        assert len(bufs) == 2 and all(b[:pad].isnan().all() and b[-pad:].isnan().all() for b in bufs)

    # attention: ids past either end of the cache are not followed (they read K = V = 0)
    kbuf = torch.full((20, 16, 4, 64), float("nan"), device=DEV)
    vbuf = torch.full((20, 16, 4, 64), float("nan"), device=DEV)
    kbuf[2:18] = kc
    vbuf[2:18] = vc
    tables = torch.tensor([[3, 16, 1], [-1, 5, 0]], dtype=torch.int32, device=DEV)
    lens = torch.tensor([40, 30], dtype=torch.int32, device=DEV)
    q = torch.randn(2, 8, 64, device=DEV)
    out, lse = ops.paged_decode_attention(q, kbuf[2:18], vbuf[2:18], tables, lens, return_lse=True)
    zk = torch.cat([kc, torch.zeros_like(kc[:1])])
    zv = torch.cat([vc, torch.zeros_like(vc[:1])])
    fixed = torch.where((tables < 0) | (tables >= 16), 16, tables)
    r_out, r_lse = ref.paged_decode_attention(q, zk, zv, fixed, lens, return_lse=True)
    assert torch.isfinite(out).all() and _rel_err(out, r_out) < 1e-5 and _rel_err(lse, r_lse) < 1e-5


def test_int64_head_offsets_cuda():
    """A heads-outermost cache whose head stride times head index passes 2^31 elements."""
    bs, H, D, nb = 16, 3, 128, 4
    stride_h = 2**30 + 2**20
    try:
        storage = torch.zeros(2 * stride_h + 2 * nb * bs * D + 1024, dtype=torch.uint8, device=DEV)
    except RuntimeError as e:
        pytest.skip(f"cannot allocate 2.2 GB: {e}")
    kc = storage.as_strided((nb, bs, H, D), (bs * D, D, stride_h, 1), 0)
    vc = storage.as_strided((nb, bs, H, D), (bs * D, D, stride_h, 1), nb * bs * D)
    for c in (kc, vc):
        c.copy_(torch.randint(0, 255, c.shape, device=DEV, dtype=torch.uint8))
    ek, ev = kc.clone(), vc.clone()
    key = torch.randint(0, 255, (20, H, D), device=DEV, dtype=torch.uint8)
    value = torch.randint(0, 255, (20, H, D), device=DEV, dtype=torch.uint8)
    slots = torch.randperm(nb * bs, device=DEV)[:20]
    ref.append_kv(key, value, ek, ev, slots)
    ops.append_kv(key, value, kc, vc, slots)
    assert torch.equal(kc, ek) and torch.equal(vc, ev)
    bt = torch.tensor([[2, 0], [3, 1]], dtype=torch.int32, device=DEV)
    sl = torch.tensor([20, 31], dtype=torch.int32, device=DEV)
    k, v, _ = ops.gather_kv(kc, vc, bt, sl)
    rk, rv, _ = ref.gather_kv(ek, ev, bt, sl)
    assert torch.equal(k, rk) and torch.equal(v, rv)
    keep = torch.rand(2, 32, device=DEV) < 0.5
    new_ref = ref.compact_tokens(ek, ev, bt, sl, keep)
    new = ops.compact_tokens(kc, vc, bt, sl, keep)
    assert torch.equal(new, new_ref) and torch.equal(kc, ek) and torch.equal(vc, ev)
