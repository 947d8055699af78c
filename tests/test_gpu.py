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
