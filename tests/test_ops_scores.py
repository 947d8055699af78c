"""paged_attention_scores (per-key attention summed over a window of queries, from the attention ops' lse)
against a dense softmax of the same queries over the same keys, on both backends (the Triton kernel runs in
the interpreter on CPU)."""

import math

import pytest
import torch

from kvtriton import ops
from kvtriton.ops._backend import INTERPRET

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "triton"] if (INTERPRET or DEV == "cuda") else ["reference"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _case(lens, chunks, hq, hkv, d, bs, dtype, gen, spare=3):
    batch = len(lens)
    max_blocks = max(1, -(-max(lens) // bs))
    nb = batch * max_blocks + spare
    arena = torch.randn(nb, 2, 2, bs, hkv, d, generator=gen).to(dtype).to(DEV)
    kc, vc = arena[:, 1, 0], arena[:, 1, 1]                        # strided views of an arena
    tables = torch.randperm(nb, generator=gen)[: batch * max_blocks].view(batch, max_blocks).int().to(DEV)
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(chunks).cumsum(0)
    q = torch.randn(int(cu[-1]), hq, d, generator=gen).to(dtype).to(DEV)
    return q, kc, vc, tables, torch.tensor(lens, dtype=torch.int32, device=DEV), cu.to(DEV)


def _dense(q, kc, tables, lens, cu, scale, window=None):
    """softmax(q k^T * scale) of each chunk's queries over its sequence's keys (float64), summed over queries:
    ``[batch, hq, max_blocks * bs]``."""
    batch, mb = tables.shape
    bs, hkv = kc.shape[1], kc.shape[2]
    hq = q.shape[1]
    out = torch.zeros(batch, hq, mb * bs, dtype=torch.float64)
    for b in range(batch):
        q0, q1, L = int(cu[b]), int(cu[b + 1]), int(lens[b])
        n = q1 - q0
        if n == 0 or L == 0:
            continue
        t = torch.arange(L)
        k = kc.cpu()[tables[b].cpu().long()[t // bs], t % bs].double().repeat_interleave(hq // hkv, 1)
        s = torch.einsum("ihd,thd->hit", q[q0:q1].cpu().double(), k) * scale
        pos = torch.arange(L - n, L)
        ok = t[None, :] <= pos[:, None]
        if window:
            ok &= t[None, :] > pos[:, None] - window
        p = torch.softmax(s.masked_fill(~ok, -math.inf), -1)
        out[b, :, :L] = p.sum(1)
    return out


def _rel(a, b):
    return ((a.double().cpu() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hq,hkv,d,bs,dtype,window", [(9, 3, 64, 4, torch.float32, None),
                                                      (4, 4, 32, 8, torch.float32, 5),
                                                      (8, 2, 16, 1, torch.bfloat16, None)])
def test_prefill_windows_match_dense_softmax(backend, hq, hkv, d, bs, dtype, window):
    gen = torch.Generator().manual_seed(hq * 100 + bs)
    # a whole prompt, an observation window of 5, one query, an empty chunk, a one-token sequence
    q, kc, vc, tables, lens, cu = _case([23, 37, 9, 6, 1], [23, 5, 1, 0, 1], hq, hkv, d, bs, dtype, gen)
    scale = 1 / math.sqrt(d)
    _, lse = ops.paged_prefill_attention(q, kc, vc, tables, lens, cu, return_lse=True, sliding_window=window)
    with ops.backend(backend):
        out = ops.paged_attention_scores(q, kc, tables, lens, lse, cu_seqlens_q=cu, sliding_window=window)
    assert out.shape == (5, hq, tables.shape[1] * bs) and out.dtype == torch.float32
    want = _dense(q, kc, tables, lens, cu, scale, window)
    assert _rel(out, want) < TOL[dtype]
    # every query's probabilities sum to 1: the sum over keys is the chunk length
    assert torch.allclose(out.sum(-1).cpu().double(), (cu[1:] - cu[:-1]).cpu().double()[:, None].expand(5, hq),
                          atol=1e-2 if dtype != torch.float32 else 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_and_strided_tables(backend):
    gen = torch.Generator().manual_seed(7)
    q, kc, vc, tables, lens, _ = _case([30, 3, 17], [1, 1, 1], 6, 2, 64, 4, torch.float32, gen)
    _, lse = ops.paged_decode_attention(q, kc, vc, tables, lens, return_lse=True)
    wide = torch.full((tables.shape[1], 6), -1, dtype=torch.int64, device=DEV)   # transposed, strided, int64
    wide[:, ::2] = tables.t().long()
    strided = wide.t()[::2]
    lens64 = torch.stack([lens.long(), lens.long()], 1)[:, 0]                      # stride-2 view
    with ops.backend(backend):
        out = ops.paged_attention_scores(q, kc, strided, lens64, lse)
    cu = torch.arange(4, dtype=torch.int32)
    assert _rel(out, _dense(q, kc, tables, lens, cu, 1 / 8)) < 1e-5
    assert torch.equal(out[1, :, 3:], torch.zeros_like(out[1, :, 3:]))           # past the sequence: 0
    padded = torch.cat([torch.full_like(tables[:1], -1), tables])                 # a view with a storage offset
    padded_lens = torch.cat([lens[:1], lens])
    with ops.backend(backend):
        off = ops.paged_attention_scores(q, kc, padded[1:], padded_lens[1:], lse)
    assert padded[1:].storage_offset() > 0 and torch.equal(off, out)


def test_bad_input_names_the_argument():
    gen = torch.Generator().manual_seed(3)
    q, kc, vc, tables, lens, cu = _case([10, 4], [3, 1], 4, 2, 16, 4, torch.float32, gen)
    _, lse = ops.paged_prefill_attention(q, kc, vc, tables, lens, cu, return_lse=True)
    with pytest.raises(ValueError, match="lse"):
        ops.paged_attention_scores(q, kc, tables, lens, lse[:2], cu_seqlens_q=cu)
    with pytest.raises(ValueError, match="lse"):
        ops.paged_attention_scores(q, kc, tables, lens, lse.double(), cu_seqlens_q=cu)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        ops.paged_attention_scores(q, kc, tables, lens, lse, cu_seqlens_q=cu[:2])
    with pytest.raises(ValueError, match="q.shape"):
        ops.paged_attention_scores(q, kc, tables, lens, lse)                     # 4 queries, 2 sequences
    with pytest.raises(IndexError, match="block_tables"):
        ops.paged_attention_scores(q, kc, tables + 100, lens, lse, cu_seqlens_q=cu)
    with pytest.raises(ValueError, match="scale"):
        ops.paged_attention_scores(q, kc, tables, lens, lse, cu_seqlens_q=cu, scale=-1.0)
    with pytest.raises(ValueError, match="seq_lens"):
        ops.paged_attention_scores(q, kc, tables, lens[:1], lse, cu_seqlens_q=cu)


def test_opcheck():
    gen = torch.Generator().manual_seed(5)
    q, kc, vc, tables, lens, cu = _case([10, 4], [3, 1], 4, 2, 16, 4, torch.float32, gen)
    _, lse = ops.paged_prefill_attention(q, kc, vc, tables, lens, cu, return_lse=True)
    torch.library.opcheck(torch.ops.kvtriton.paged_attention_scores.default,
                          (q, kc, tables, lens, lse, cu, 0.25, 0, 3))
