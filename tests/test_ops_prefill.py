"""paged_prefill_attention against the float64 reference (Triton interpreter on CPU, the kernel on CUDA)."""

import math

import pytest
import torch

from kvtriton import ops
from kvtriton.ops import prefill
from kvtriton.ops import reference as ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _rel_err(out, expect):
    out, expect = out.double(), expect.double()
    assert torch.equal(torch.isnan(expect), torch.isnan(out)), "NaN entries differ"
    finite = torch.isfinite(expect)
    assert torch.equal(finite, torch.isfinite(out)), "non-finite entries differ"
    assert torch.equal(expect[~finite & ~expect.isnan()], out[~finite & ~out.isnan()]), "infinities differ"
    return ((out[finite] - expect[finite]).norm() / expect[finite].norm().clamp_min(1e-30)).item()


def _case(lens, chunks, hq, hkv, d, bs, dtype, layers=2, spare=3, gen=None, device=DEV):
    """Random arena ``[num_blocks, layers, 2, bs, hkv, d]``, K/V views of its last layer, a random
    permutation block table covering ``lens``, chunks of ``chunks[b]`` queries packed by ``cu_seqlens_q``."""
    batch = len(lens)
    max_blocks = max(1, -(-max(lens, default=1) // bs))
    nb = batch * max_blocks + spare
    arena = torch.randn(nb, layers, 2, bs, hkv, d, generator=gen).to(dtype).to(device)
    kc, vc = arena[:, layers - 1, 0], arena[:, layers - 1, 1]
    tables = torch.randperm(nb, generator=gen)[: batch * max_blocks].view(batch, max_blocks).int().to(device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(chunks, dtype=torch.int64).cumsum(0)
    q = torch.randn(int(cu[-1]), hq, d, generator=gen).to(dtype).to(device)
    return q, kc, vc, tables, seq_lens, cu.to(device)


def _check(q, kc, vc, tables, lens, cu, dtype, **kw):
    out, lse = ops.paged_prefill_attention(q, kc, vc, tables, lens, cu, return_lse=True, **kw)
    r_out, r_lse = ref.paged_prefill_attention(q, kc, vc, tables, lens, cu, return_lse=True, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:2] and lse.dtype == torch.float32
    tol = TOL[dtype]
    if r_out.double().norm() > 0:
        assert _rel_err(out, r_out) < tol
    else:
        assert torch.equal(out, torch.zeros_like(out))
    if q.shape[0]:
        assert _rel_err(lse, r_lse) < 1e-5
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference_dtypes(dtype):
    """Plain prefill (empty prefix), a one-token chunk, an empty sequence, a chunk after a 85-token
    prefix that ends mid-block and spans several query tiles."""
    gen = torch.Generator().manual_seed(1)
    args = _case([37, 1, 0, 130], [37, 1, 0, 45], 8, 2, 64, 16, dtype, gen=gen)
    _check(*args, dtype)


@pytest.mark.parametrize("hq,hkv,d", [
    (4, 4, 64), (9, 3, 64), (8, 2, 64), (8, 1, 64),      # GQA ratios 1, 3 (SmolLM2's 9:3), 4, 8
    (12, 4, 128), (8, 2, 256), (6, 2, 16), (4, 1, 32),   # head_dim 128, 256 and the small ones
])
def test_gqa_and_head_dims(hq, hkv, d):
    gen = torch.Generator().manual_seed(hq * 1000 + hkv * 10 + d)
    args = _case([45, 17, 23], [20, 17, 1], hq, hkv, d, 16, torch.float32, gen=gen)
    _check(*args, torch.float32)


@pytest.mark.parametrize("bs,lens,chunks", [
    (1, [20, 7], [9, 7]),
    (16, [1, 16, 17, 33], [1, 5, 17, 16]),
    (32, [31, 33, 64], [30, 2, 33]),
    (256, [300, 5, 257], [44, 5, 1]),
])
def test_block_sizes_and_ragged_lengths(bs, lens, chunks):
    gen = torch.Generator().manual_seed(bs)
    args = _case(lens, chunks, 8, 2, 64, bs, torch.bfloat16, gen=gen)
    _check(*args, torch.bfloat16)


@pytest.mark.parametrize("window", [1, 5, 40, 1000])
def test_sliding_window(window):
    gen = torch.Generator().manual_seed(window)
    args = _case([100, 3, 0, 41], [60, 3, 0, 1], 8, 2, 64, 16, torch.float32, gen=gen)
    _check(*args, torch.float32, sliding_window=window)


@pytest.mark.parametrize("window", [None, 7, 23])
def test_small_tiles_many_kv_ranges(monkeypatch, window):
    """16-row query tiles (5 tokens at group 3) and 16-key KV tiles: every tile boundary case of the
    masked window-start / unmasked middle / masked diagonal split, with chunks of many tiles."""
    monkeypatch.setattr(prefill, "prefill_launch_config", lambda total_q, batch, group, d, es:
                        prefill.PrefillLaunchConfig(16, 16 // group, 16, 4, 2))
    gen = torch.Generator().manual_seed(17 + (window or 0))
    args = _case([90, 50, 31, 64], [90, 33, 1, 16], 6, 2, 32, 8, torch.float32, gen=gen)
    _check(*args, torch.float32, sliding_window=window)


@pytest.mark.parametrize("dtype,window", [(torch.float32, None), (torch.float32, 6), (torch.bfloat16, None)])
def test_one_token_chunks_match_decode(dtype, window):
    gen = torch.Generator().manual_seed(21)
    q, kc, vc, tables, lens, cu = _case([37, 1, 16, 70], [1, 1, 1, 1], 12, 4, 64, 16, dtype, gen=gen)
    out, lse = ops.paged_prefill_attention(q, kc, vc, tables, lens, cu, return_lse=True,
                                           sliding_window=window)
    d_out, d_lse = ops.paged_decode_attention(q, kc, vc, tables, lens, return_lse=True, sliding_window=window)
    assert _rel_err(out, d_out) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert _rel_err(lse, d_lse) < 1e-5
    _check(q, kc, vc, tables, lens, cu, dtype, sliding_window=window)


def test_chunked_prefill_equals_whole_prefill():
    """Prefilling a sequence in chunks of 7, 1, 19 and 13 tokens (each call seeing the pages so far)
    gives the rows that one 40-token prefill gives."""
    gen = torch.Generator().manual_seed(4)
    q, kc, vc, tables, _, _ = _case([40], [40], 8, 2, 64, 16, torch.float32, gen=gen)
    whole, whole_lse = ops.paged_prefill_attention(
        q, kc, vc, tables, torch.tensor([40], dtype=torch.int32, device=DEV),
        torch.tensor([0, 40], dtype=torch.int32, device=DEV), return_lse=True)
    start = 0
    for n in (7, 1, 19, 13):
        part, part_lse = ops.paged_prefill_attention(
            q[start:start + n], kc, vc, tables, torch.tensor([start + n], dtype=torch.int32, device=DEV),
            torch.tensor([0, n], dtype=torch.int32, device=DEV), return_lse=True)
        assert _rel_err(part, whole[start:start + n]) < 1e-5
        assert _rel_err(part_lse, whole_lse[start:start + n]) < 1e-5
        start += n


def test_empty_chunks_and_unused_table_entries():
    """Empty chunks (also of non-empty sequences) write nothing and read nothing: table entries past a
    sequence's length hold out-of-range ids; an all-empty batch returns empty tensors."""
    gen = torch.Generator().manual_seed(3)
    q, kc, vc, tables, lens, cu = _case([0, 20, 9, 0], [0, 6, 0, 0], 8, 2, 64, 16, torch.float32, gen=gen)
    tables[:, 2:] = 10**6
    tables[0] = -5
    tables[3] = -5
    out, lse = ops.paged_prefill_attention(q, kc, vc, tables, lens, cu, return_lse=True)
    assert out.shape == (6, 8, 64) and torch.isfinite(lse).all()
    good = tables.clone()
    good[good < 0] = 0
    good[good >= kc.shape[0]] = 0
    r_out, r_lse = ref.paged_prefill_attention(q, kc, vc, good, lens, cu, return_lse=True)
    assert _rel_err(out, r_out) < 1e-5 and _rel_err(lse, r_lse) < 1e-5
    none = torch.zeros(5, dtype=torch.int32, device=DEV)
    out, lse = ops.paged_prefill_attention(q[:0], kc, vc, tables, lens, none, return_lse=True)
    assert out.shape == (0, 8, 64) and lse.shape == (0, 8)


def test_poisoned_outputs_are_fully_written(monkeypatch):
    """Outputs start as NaN: any element the kernel fails to write shows."""
    monkeypatch.setattr(prefill, "_empty", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))
    gen = torch.Generator().manual_seed(11)
    args = _case([50, 1, 0, 33, 70], [50, 1, 0, 2, 23], 9, 3, 64, 16, torch.bfloat16, gen=gen)
    out, lse = ops.paged_prefill_attention(*args, return_lse=True)
    assert not out.isnan().any() and not lse.isnan().any()
    _check(*args, torch.bfloat16)


def _nan_rows(out, lse):
    """(token, head) pairs whose out and lse are NaN; asserts that out is NaN exactly where lse is."""
    nan = lse.isnan()
    assert torch.equal(out.isnan().any(-1), nan) and torch.equal(out.isnan().all(-1), nan)
    return nan


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # numpy, inside the interpreter, on the NaN rows
@pytest.mark.parametrize("poison", ["nan_q", "inf_q", "neg_inf_q", "overflow_q", "inf_key"])
def test_non_finite_scores_poison_their_rows_on_both_paths(poison):
    """The decode op's rule: a query head with an attended score that is not finite (NaN/inf in q or in a
    key it attends to, or float32 overflow) gets NaN out and lse; everything else is as without it. An
    inf in the key of chunk token 6 reaches that KV group's heads of tokens 6.. only (causality)."""
    gen = torch.Generator().manual_seed(13)
    q, kc, vc, tables, lens, cu = _case([30, 12], [10, 12], 8, 2, 64, 16, torch.float32, gen=gen)
    expect = torch.zeros(q.shape[:2], dtype=torch.bool)
    if poison == "inf_key":
        pos = 30 - 10 + 6                                          # chunk 0's token 6
        kc[tables[0, pos // 16].long(), pos % 16, 1, 3] = float("inf")
        expect[6:10, 4:8] = True                                   # KV head 1 serves query heads 4..7
    else:
        val = {"nan_q": float("nan"), "inf_q": float("inf"), "neg_inf_q": float("-inf"), "overflow_q": 3e38}
        q[3, 5, 7] = val[poison]
        if poison == "overflow_q":
            q[3, 5, :] = 3e38                                      # finite q, q.k overflows float32
        expect[3, 5] = True
    r_out, r_lse = ref.paged_prefill_attention(q, kc, vc, tables, lens, cu, return_lse=True)
    assert torch.equal(_nan_rows(r_out, r_lse), expect.to(DEV))
    for backend in ("auto", "reference"):
        with ops.backend(backend):
            out, lse = ops.paged_prefill_attention(q, kc, vc, tables, lens, cu, return_lse=True)
        assert torch.equal(_nan_rows(out, lse), expect.to(DEV)), backend
        assert _rel_err(out, r_out) < 1e-5 and _rel_err(lse, r_lse) < 1e-5


@pytest.mark.parametrize("path", ["auto", "reference"])
def test_out_of_range_block_ids_are_not_followed(path):
    """The registered op does no value checks (nor does the public one on CUDA without debug checks): a
    block id outside the cache must not become a read outside it. Such a block reads as K = V = 0, on
    the kernel and on the PyTorch path."""
    gen = torch.Generator().manual_seed(14)
    q, kc, vc, tables, lens, cu = _case([40, 20], [15, 20], 8, 2, 64, 16, torch.float32, gen=gen)
    nb = kc.shape[0]
    bad = tables.clone()
    bad[0, 1], bad[1, 0] = nb + 5, -3
    with ops.backend(path):
        out, lse = torch.ops.kvtriton.paged_prefill_attention(q, kc, vc, bad, lens, cu, 0.125, 0)
    zeros = torch.zeros_like(kc[:1])
    kz, vz = torch.cat([kc, zeros]), torch.cat([vc, zeros])       # block nb: all zeros
    fixed = bad.clone()
    fixed[(fixed < 0) | (fixed >= nb)] = nb
    r_out, r_lse = ref.paged_prefill_attention(q, kz, vz, fixed, lens, cu, scale=0.125, return_lse=True)
    assert _rel_err(out, r_out) < 1e-5 and _rel_err(lse, r_lse) < 1e-5


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_strided_and_noncontiguous_inputs(path):
    gen = torch.Generator().manual_seed(5)
    q, kc, vc, tables, lens, cu = _case([40, 23], [12, 23], 8, 2, 64, 16, torch.float32, layers=3, gen=gen)
    assert not kc.is_contiguous() and kc.stride(0) == 3 * 2 * 16 * 2 * 64
    q_nc = q.transpose(0, 1).contiguous().transpose(0, 1)                      # head-major q
    assert not q_nc.is_contiguous()
    wide = torch.zeros(2, tables.shape[1] * 2, dtype=torch.int32, device=DEV)
    wide[:, ::2] = tables
    tables_nc = wide[:, ::2]                                                   # strided block table
    lens_nc = torch.stack([lens, lens + 7], 1)[:, 0]                           # strided seq_lens
    cu_nc = torch.stack([cu, cu * 3], 1)[:, 0]                                 # strided cu_seqlens_q
    tables_t = tables.t().contiguous().t()                                     # transposed block table
    padded = torch.full((2, tables.shape[1] + 3), -1, dtype=torch.int32, device=DEV)
    padded[:, 1:-2] = tables
    tables_off = padded[:, 1:-2]                                               # offset, padded rows
    for t in (tables_nc, tables_t, tables_off):
        with ops.backend(path):
            out = ops.paged_prefill_attention(q_nc, kc, vc, t, lens_nc, cu_nc, sliding_window=9)
        r = ref.paged_prefill_attention(q, kc, vc, tables, lens, cu, sliding_window=9)
        assert _rel_err(out, r) < 1e-5


def test_large_block_ids_use_int64_offsets():
    """A block stride of 2^25 elements and block ids up to 127 put offsets past 2^31: a view over a
    large, mostly untouched (never committed) allocation, touching only the blocks in use."""
    bs, h, d = 16, 2, 64
    stride_b, nblocks = 1 << 25, 128
    try:
        big = torch.empty(stride_b * (nblocks - 1) + 2 * bs * h * d, dtype=torch.bfloat16, device=DEV)
    except (RuntimeError, MemoryError) as e:  # strict overcommit
        pytest.skip(f"cannot reserve a sparse 8 GiB view: {e}")
    kc = big.as_strided((nblocks, bs, h, d), (stride_b, h * d, d, 1))
    vc = big.as_strided((nblocks, bs, h, d), (stride_b, h * d, d, 1), bs * h * d)
    ids = torch.tensor([[127, 3, 126], [125, 64, 2]], dtype=torch.int32, device=DEV)
    gen = torch.Generator().manual_seed(9)
    for i in ids.flatten().tolist():
        kc[i].copy_(torch.randn(bs, h, d, generator=gen))
        vc[i].copy_(torch.randn(bs, h, d, generator=gen))
    assert 127 * stride_b > 2**31
    q = torch.randn(20, 8, d, generator=gen).to(torch.bfloat16).to(DEV)
    lens = torch.tensor([40, 48], dtype=torch.int32, device=DEV)
    cu = torch.tensor([0, 3, 20], dtype=torch.int32, device=DEV)
    _check(q, kc, vc, ids, lens, cu, torch.bfloat16)


def test_scale_and_return_structure():
    gen = torch.Generator().manual_seed(7)
    q, kc, vc, tables, lens, cu = _case([20, 9], [4, 9], 4, 2, 64, 16, torch.float32, gen=gen)
    out = ops.paged_prefill_attention(q, kc, vc, tables, lens, cu, scale=0.3)
    assert isinstance(out, torch.Tensor)
    r = ref.paged_prefill_attention(q, kc, vc, tables, lens, cu, scale=0.3)
    assert _rel_err(out, r) < 1e-5
    assert _rel_err(out, ref.paged_prefill_attention(q, kc, vc, tables, lens, cu)) > 1e-3  # scale is used
    res = ops.paged_prefill_attention(q, kc, vc, tables, lens, cu, return_lse=True)
    assert isinstance(res, tuple) and len(res) == 2 and res[1].shape == (13, 4)


def test_reference_backend_matches():
    gen = torch.Generator().manual_seed(8)
    q, kc, vc, tables, lens, cu = _case([20, 5], [11, 5], 8, 2, 64, 16, torch.bfloat16, gen=gen)
    with ops.backend("reference"):
        a, la = ops.paged_prefill_attention(q, kc, vc, tables, lens, cu, return_lse=True, sliding_window=7)
    b, lb = ops.paged_prefill_attention(q, kc, vc, tables, lens, cu, return_lse=True, sliding_window=7)
    assert _rel_err(a, b) < 1e-2 and _rel_err(la, lb) < 1e-5


def test_launch_config_heuristics():
    c = prefill.prefill_launch_config
    assert c(8192, 4, 4, 128, 2) == prefill.PrefillLaunchConfig(128, 32, 64, 8, 2)
    assert c(8192, 4, 4, 256, 2).block_m == 64 and c(8192, 4, 4, 256, 2).block_n == 32
    assert c(64, 64, 4, 128, 2).block_m == 16                 # one-token chunks: decode-sized tiles
    assert c(64, 64, 3, 128, 2).block_q == 5                  # 16 rows hold 5 tokens of 3 heads
    assert c(8192, 4, 32, 128, 2).block_q == 4
    assert c(8, 8, 128, 64, 2).block_m == 128                 # the largest group: one token per tile
    assert c(8192, 4, 4, 128, 4).block_m == 32 and c(8192, 4, 4, 128, 4).block_n == 16
    for total_q, batch, g, d, es in [(1, 1, 1, 16, 4), (5000, 3, 9, 64, 2), (100, 100, 7, 256, 4)]:
        cfg = c(total_q, batch, g, d, es)
        assert cfg.block_m >= max(16, g) and cfg.block_q == cfg.block_m // g >= 1
        assert cfg.block_m & (cfg.block_m - 1) == 0 and cfg.block_n >= 16 and cfg.num_warps in (4, 8)


class _debug:
    """Value checks on for a block (they always run on CPU; on CUDA only under debug checks)."""

    def __enter__(self):
        self.old = ops.debug_checks()
        ops.debug_checks(True)

    def __exit__(self, *exc):
        ops.debug_checks(self.old)


def _good(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return _case([20, 5], [6, 5], 8, 2, 64, 16, dtype, gen=gen)


@pytest.mark.parametrize("mutate,exc,word", [
    (lambda a: a.update(q=a["q"][0]), ValueError, "q"),
    (lambda a: a.update(q=a["q"][:, :3]), ValueError, "num_q_heads"),
    (lambda a: a.update(q=a["q"].double()), ValueError, "q must have dtype"),
    (lambda a: a.update(key_cache=a["key_cache"].half()), ValueError, "key_cache"),
    (lambda a: a.update(value_cache=a["value_cache"][:, :8]), ValueError, "value_cache"),
    (lambda a: a.update(key_cache=a["key_cache"][..., :48], value_cache=a["value_cache"][..., :48],
                        q=a["q"][..., :48]), ValueError, "head_dim"),
    (lambda a: a.update(key_cache=a["key_cache"][:, :12], value_cache=a["value_cache"][:, :12]),
     ValueError, "block_size"),
    (lambda a: a.update(key_cache=a["key_cache"].transpose(2, 3)), ValueError, "key_cache"),
    (lambda a: a.update(block_tables=a["block_tables"].short()), ValueError, "block_tables"),
    (lambda a: a.update(block_tables=a["block_tables"][:1]), ValueError, "cu_seqlens_q"),
    (lambda a: a.update(seq_lens=a["seq_lens"].float()), ValueError, "seq_lens"),
    (lambda a: a.update(seq_lens=a["seq_lens"][:1]), ValueError, "seq_lens"),
    (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].float()), ValueError, "cu_seqlens_q"),
    (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"][:2]), ValueError, "cu_seqlens_q"),
    (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"][None]), ValueError, "cu_seqlens_q"),
    (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"] + 1), ValueError, "cu_seqlens_q must start at 0"),
    (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"] * 2), ValueError, "total_q"),
    (lambda a: a.update(cu_seqlens_q=torch.tensor([0, 12, 11], dtype=torch.int32, device=DEV),
                        q=a["q"][:11]), ValueError, "non-decreasing"),
    (lambda a: a.update(cu_seqlens_q=torch.tensor([0, 1, 11], dtype=torch.int32, device=DEV)),
     ValueError, "seq_lens\\[1\\] = 5 must be >= its chunk length"),
    (lambda a: a.update(scale=0.0), ValueError, "scale"),
    (lambda a: a.update(scale=-1.0), ValueError, "scale"),
    (lambda a: a.update(scale=float("nan")), ValueError, "scale"),
    (lambda a: a.update(scale=float("inf")), ValueError, "scale"),
    (lambda a: a.update(scale=2e4), ValueError, "scale"),
    (lambda a: a.update(sliding_window=0), ValueError, "sliding_window"),
    (lambda a: a.update(sliding_window=2.5), ValueError, "sliding_window"),
])
def test_bad_inputs_raise(mutate, exc, word):
    q, kc, vc, tables, lens, cu = _good()
    args = dict(q=q, key_cache=kc, value_cache=vc, block_tables=tables, seq_lens=lens, cu_seqlens_q=cu)
    mutate(args)
    with _debug():
        with pytest.raises(exc, match=word):
            ops.paged_prefill_attention(args.pop("q"), args.pop("key_cache"), args.pop("value_cache"),
                                        args.pop("block_tables"), args.pop("seq_lens"),
                                        args.pop("cu_seqlens_q"), **args)


def test_bad_indices_raise_and_int64_indices_work():
    """Index values are checked where that needs no device sync (always on CPU, under debug_checks on
    CUDA); int64 block tables, lengths and cu_seqlens_q are accepted."""
    q, kc, vc, tables, lens, cu = _good()
    with _debug():
        bad = tables.clone()
        bad[0, 0] = kc.shape[0]
        with pytest.raises(IndexError, match="block_tables"):
            ops.paged_prefill_attention(q, kc, vc, bad, lens, cu)
        with pytest.raises(IndexError, match="seq_lens"):
            ops.paged_prefill_attention(q, kc, vc, tables, lens + 1000, cu)
        with pytest.raises(IndexError, match="seq_lens"):
            ops.paged_prefill_attention(q, kc, vc, tables, lens - 100, cu)
    out = ops.paged_prefill_attention(q, kc, vc, tables.long(), lens.long(), cu.long())
    assert _rel_err(out, ref.paged_prefill_attention(q, kc, vc, tables, lens, cu)) < 1e-5


def test_opcheck_and_compile():
    q, kc, vc, tables, lens, cu = _good()
    for args in ((q, kc, vc, tables, lens, cu, 0.125, 0), (q, kc, vc, tables, lens, cu, 0.3, 4)):
        torch.library.opcheck(torch.ops.kvtriton.paged_prefill_attention.default, args)
    fn = torch.compile(lambda *a: ops.paged_prefill_attention(*a, return_lse=True), backend="eager",
                       fullgraph=True)
    out, lse = fn(q, kc, vc, tables, lens, cu)
    r = ref.paged_prefill_attention(q, kc, vc, tables, lens, cu)
    assert _rel_err(out, r) < 1e-5 and lse.shape == (11, 8)
    assert math.isfinite(float(lse.sum()))


@pytest.mark.slow
def test_larger_mixed_batch():
    """A mixed batch as a scheduler builds it: decode tokens, a prefix-cache hit, a long plain prefill and
    a speculative-verification chunk, GQA 9:3 and block size 16, in bf16."""
    gen = torch.Generator().manual_seed(31)
    args = _case([300, 1, 77, 180, 9], [4, 1, 50, 180, 9], 9, 3, 64, 16, torch.bfloat16, gen=gen)
    _check(*args, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------
# The CUDA build, without a GPU: Triton compiles the kernel for sm_90 on the host (its bundled ptxas),
# which catches code that only the interpreter accepts (the binary search's while loop, the helper's
# returned tuples, mixed int widths). Run in a subprocess because the tests' triton is in interpreter mode.

_COMPILE_SCRIPT = r'''
import json, os
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvtriton.ops import prefill

def build(dtype, group, d, bs, n_q, n_seq, qstart=False, **ones):
    fn = prefill._prefill_kernel
    cfg = prefill.prefill_launch_config(n_q, n_seq, group, d, 4 if dtype == "fp32" else 2)
    consts = {**ones, "GROUP": group, "HEAD_DIM": d, "BLOCK_SIZE": bs, "BLOCK_M": cfg.block_m,
              "BLOCK_Q": cfg.block_q, "BLOCK_N": cfg.block_n, "F32_DOT": dtype == "fp32", "HAS_QSTART": qstart}
    types = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "O": f"*{dtype}", "BT": "*i32",
             "SL": "*i32", "CU": "*i64", "QSTART": "*i32", "LSE": "*fp32", "scale_log2": "fp32",
             "stride_kb": "i64"}
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    div16 = ["Q", "K", "V", "O", "stride_qt", "stride_qh", "stride_kb", "stride_kt", "stride_vb", "stride_vt"]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    ptx = k.asm["ptx"]
    return {"cubin": bool(k.asm.get("cubin")), "tensor_cores": "wgmma" in ptx or "mma.sync" in ptx}

out = {"bf16_prefill": build("bf16", 4, 128, 16, 8192, 4), "fp16_decode": build("fp16", 3, 256, 1, 8, 8),
       "bf16_subset": build("bf16", 4, 128, 16, 8192, 4, qstart=True),
       "fp32": build("fp32", 9, 64, 256, 300, 2),
       # Triton specialises int arguments equal to 1 as constants (the binary search's bound included).
       "ones": build("bf16", 1, 64, 1, 1, 1, batch=1, num_tiles=1, num_kv_heads=1, max_blocks=1, window=1,
                     stride_btb=1, stride_qh=1)}
print("RESULT " + json.dumps(out))
'''


def test_kernel_compiles_for_cuda():
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                       timeout=300)
    if r.returncode != 0 and ("ptxas" in r.stderr.lower() or "No module named 'triton.backends.nvidia'"
                              in r.stderr):
        pytest.skip(f"no CUDA toolchain in this triton build: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert all(info["cubin"] for info in res.values()), res
    assert res["bf16_prefill"]["tensor_cores"] and res["fp16_decode"]["tensor_cores"], res


# ---------------------------------------------------------------------------------------------------
# CUDA: sizes the interpreter cannot reach, against the float64 reference on the device.

@pytest.mark.gpu
@pytest.mark.parametrize("dtype,hq,hkv,d,bs,window", [
    (torch.bfloat16, 32, 8, 128, 16, None),
    (torch.float16, 9, 3, 64, 32, 1000),
    (torch.float32, 16, 4, 256, 16, None),
    (torch.bfloat16, 8, 8, 64, 256, 300),
])
def test_cuda_large_against_reference(dtype, hq, hkv, d, bs, window):
    gen = torch.Generator().manual_seed(hq + d + bs)
    lens = [1, 700, 2049, 3000, 515, 64, 1200]
    chunks = [1, 700, 1500, 1, 7, 64, 333]       # decode, plain prefill, chunked prefill, spec decode
    args = _case(lens, chunks, hq, hkv, d, bs, dtype, layers=3, gen=gen, device="cuda")
    out, lse = _check(*args, dtype, sliding_window=window)
    one = ops.paged_prefill_attention(*args, sliding_window=window)
    assert torch.equal(one, out)                                 # deterministic
    torch.cuda.synchronize()
