"""paged_decode_attention against the float64 reference (Triton interpreter on CPU, the kernel on CUDA)."""

import math

import pytest
import torch

from kvtriton import ops
from kvtriton.ops import attention as attn
from kvtriton.ops import reference as ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _rel_err(out, expect):
    out, expect = out.double(), expect.double()
    finite = torch.isfinite(expect)
    assert torch.equal(finite, torch.isfinite(out)), "non-finite entries differ"
    return ((out[finite] - expect[finite]).norm() / expect[finite].norm().clamp_min(1e-30)).item()


def _case(batch, hq, hkv, d, bs, lens, dtype, layers=2, spare=3, gen=None):
    """Random arena ``[num_blocks, layers, 2, bs, hkv, d]``, K/V views of its last layer, a random
    permutation block table covering ``lens``."""
    max_blocks = max(1, -(-max(lens) // bs))
    nb = batch * max_blocks + spare
    arena = torch.randn(nb, layers, 2, bs, hkv, d, generator=gen).to(dtype).to(DEV)
    kc, vc = arena[:, layers - 1, 0], arena[:, layers - 1, 1]
    tables = torch.randperm(nb, generator=gen)[: batch * max_blocks].view(batch, max_blocks).int().to(DEV)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    q = torch.randn(batch, hq, d, generator=gen).to(dtype).to(DEV)
    return q, kc, vc, tables, seq_lens


def _check(q, kc, vc, tables, lens, dtype, **kw):
    out, lse, mass = ops.paged_decode_attention(q, kc, vc, tables, lens, return_lse=True,
                                                return_block_mass=True, **kw)
    kw.pop("num_splits", None)
    r_out, r_lse, r_mass = ref.paged_decode_attention(q, kc, vc, tables, lens, return_lse=True,
                                                      return_block_mass=True, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:2] and lse.dtype == torch.float32
    assert mass.shape == (*q.shape[:2], tables.shape[1]) and mass.dtype == torch.float32
    tol = TOL[dtype]
    if r_out.double().norm() > 0:
        assert _rel_err(out, r_out) < tol
    else:
        assert torch.equal(out, torch.zeros_like(out))
    assert _rel_err(lse, r_lse) < max(tol, 1e-5)
    if r_mass.norm() > 0:
        assert _rel_err(mass, r_mass) < max(tol, 1e-5)
    # Per-(sequence, head) mass sums to 1 over the live blocks, 0 for empty sequences.
    sums = mass.double().sum(-1)
    live = lens.to(sums.device) > 0
    assert torch.allclose(sums[live], torch.ones_like(sums[live]), atol=1e-4)
    assert torch.equal(sums[~live], torch.zeros_like(sums[~live]))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_matches_reference_dtypes_and_splits(dtype, num_splits):
    gen = torch.Generator().manual_seed(1)
    q, kc, vc, tables, lens = _case(4, 8, 2, 64, 16, [37, 1, 0, 130], dtype, gen=gen)
    _check(q, kc, vc, tables, lens, dtype, num_splits=num_splits)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])   # GQA ratios 1, 4, 8
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gqa_and_head_dims(hq, hkv, d):
    gen = torch.Generator().manual_seed(hq * 1000 + hkv * 10 + d)
    q, kc, vc, tables, lens = _case(2, hq, hkv, d, 16, [45, 17], torch.float32, gen=gen)
    _check(q, kc, vc, tables, lens, torch.float32, num_splits=2)


@pytest.mark.parametrize("bs,lens", [(16, [1, 16, 17]), (32, [31, 33, 64]), (128, [129, 5, 300])])
def test_block_sizes_and_ragged_lengths(bs, lens):
    gen = torch.Generator().manual_seed(bs)
    q, kc, vc, tables, seq_lens = _case(len(lens), 8, 2, 64, bs, lens, torch.bfloat16, gen=gen)
    _check(q, kc, vc, tables, seq_lens, torch.bfloat16)


@pytest.mark.parametrize("window,num_splits", [(1, None), (5, 2), (40, 3), (1000, 2)])
def test_sliding_window(window, num_splits):
    gen = torch.Generator().manual_seed(window)
    q, kc, vc, tables, lens = _case(4, 8, 2, 64, 16, [100, 3, 0, 41], torch.float32, gen=gen)
    _check(q, kc, vc, tables, lens, torch.float32, sliding_window=window, num_splits=num_splits)


def test_scale_and_return_structure():
    gen = torch.Generator().manual_seed(7)
    q, kc, vc, tables, lens = _case(2, 4, 2, 64, 16, [20, 9], torch.float32, gen=gen)
    out = ops.paged_decode_attention(q, kc, vc, tables, lens, scale=0.3)
    assert isinstance(out, torch.Tensor)
    r = ref.paged_decode_attention(q, kc, vc, tables, lens, scale=0.3)
    assert _rel_err(out, r) < 1e-5
    assert _rel_err(out, ref.paged_decode_attention(q, kc, vc, tables, lens)) > 1e-3  # scale is used
    res = ops.paged_decode_attention(q, kc, vc, tables, lens, return_block_mass=True)
    assert isinstance(res, tuple) and len(res) == 2 and res[1].shape == (2, 4, tables.shape[1])
    res = ops.paged_decode_attention(q, kc, vc, tables, lens, return_lse=True)
    assert isinstance(res, tuple) and len(res) == 2 and res[1].shape == (2, 4)


def test_empty_sequences_and_unused_table_entries():
    """Zero-length sequences give zeros and lse = -inf; table entries past the length are never read
    (poisoned with out-of-range ids) and blocks past it carry no mass."""
    gen = torch.Generator().manual_seed(3)
    q, kc, vc, tables, lens = _case(3, 8, 2, 64, 16, [0, 20, 0], torch.float32, gen=gen)
    tables[:, 2:] = 10**6
    tables[0] = -5
    out, lse, mass = ops.paged_decode_attention(q, kc, vc, tables, lens, return_lse=True,
                                                return_block_mass=True, num_splits=2)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    assert torch.isneginf(lse[0]).all() and torch.isneginf(lse[2]).all()
    assert torch.isfinite(lse[1]).all()
    assert torch.equal(mass[0], torch.zeros_like(mass[0])) and torch.equal(mass[1, :, 2:], torch.zeros_like(mass[1, :, 2:]))
    tables[0] = 0
    tables[:, 2:] = 0
    r = ref.paged_decode_attention(q, kc, vc, tables, lens)
    assert _rel_err(out, r) < 1e-5


@pytest.mark.parametrize("num_splits", [1, 4])
def test_poisoned_buffers_are_fully_written(monkeypatch, num_splits):
    """Every output and scratch buffer starts as NaN: any element the kernels fail to write shows."""
    monkeypatch.setattr(attn, "_empty", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))
    gen = torch.Generator().manual_seed(11)
    q, kc, vc, tables, lens = _case(4, 12, 4, 64, 16, [50, 1, 0, 33], torch.bfloat16, gen=gen)
    out, lse, mass = ops.paged_decode_attention(q, kc, vc, tables, lens, return_lse=True,
                                                return_block_mass=True, num_splits=num_splits)
    assert not out.isnan().any() and not lse.isnan().any() and not mass.isnan().any()
    _check(q, kc, vc, tables, lens, torch.bfloat16, num_splits=num_splits)


def test_strided_and_noncontiguous_inputs():
    gen = torch.Generator().manual_seed(5)
    q, kc, vc, tables, lens = _case(2, 8, 2, 64, 16, [40, 23], torch.float32, layers=3, gen=gen)
    assert not kc.is_contiguous() and kc.stride(0) == 3 * 2 * 16 * 2 * 64
    q_nc = torch.randn(8, 2, 64, generator=gen).to(DEV).transpose(0, 1)      # non-contiguous q
    wide = torch.zeros(2, tables.shape[1] * 2, dtype=torch.int32, device=DEV)
    wide[:, ::2] = tables
    tables_nc = wide[:, ::2]                                                   # strided block table
    out = ops.paged_decode_attention(q_nc, kc, vc, tables_nc, lens, num_splits=2)
    r = ref.paged_decode_attention(q_nc, kc, vc, tables, lens)
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
    q = torch.randn(2, 8, d, generator=gen).to(torch.bfloat16).to(DEV)
    lens = torch.tensor([40, 48], dtype=torch.int32, device=DEV)
    _check(q, kc, vc, ids, lens, torch.bfloat16, num_splits=2)


def test_launch_config_heuristics():
    c = attn.decode_launch_config
    # H100-like: 132 SMs (528 resident programs). A batch that fills the SMs once is not split; more
    # than one wave is cut into up to 3 splits of >= 12 tiles; small batches with long contexts are split.
    assert c(64, 8, 4, 128, 16, 4096, 2, 132).num_splits == 1
    assert c(128, 8, 4, 128, 16, 4096, 2, 132).num_splits == 3
    assert c(128, 8, 4, 128, 16, 1024, 2, 132).num_splits == 1        # 16 tiles: too short to split
    assert c(256, 8, 4, 128, 16, 2048, 2, 132).num_splits == 2
    assert c(8, 8, 4, 128, 16, 32768, 2, 132).num_splits > 4
    assert c(32, 8, 4, 128, 16, 4096, 2, 132).num_splits >= 2
    assert c(1, 8, 4, 128, 16, 64, 2, 132).num_splits == 1          # nothing to split
    for d, bs in [(64, 16), (128, 16), (256, 16), (128, 128), (256, 128)]:
        cfg = c(4, 8, 4, d, bs, 4096, 2, 132)
        assert cfg.block_n % bs == 0 and cfg.block_n & (cfg.block_n - 1) == 0
        assert cfg.group_pad >= 16 and cfg.num_warps in (4, 8) and cfg.num_stages in (1, 2)
    assert c(4, 8, 4, 128, 16, 4096, 2, 132, num_splits=7).num_splits == 7


def _good(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return _case(2, 8, 2, 64, 16, [20, 5], dtype, gen=gen)


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
    (lambda a: a.update(block_tables=a["block_tables"][:1]), ValueError, "block_tables"),
    (lambda a: a.update(seq_lens=a["seq_lens"].float()), ValueError, "seq_lens"),
    (lambda a: a.update(seq_lens=a["seq_lens"][:1]), ValueError, "seq_lens"),
    (lambda a: a.update(scale=0.0), ValueError, "scale"),
    (lambda a: a.update(scale=float("nan")), ValueError, "scale"),
    (lambda a: a.update(sliding_window=0), ValueError, "sliding_window"),
    (lambda a: a.update(sliding_window=2.5), ValueError, "sliding_window"),
    (lambda a: a.update(num_splits=0), ValueError, "num_splits"),
])
def test_bad_inputs_raise(mutate, exc, word):
    q, kc, vc, tables, lens = _good()
    args = dict(q=q, key_cache=kc, value_cache=vc, block_tables=tables, seq_lens=lens)
    mutate(args)
    with pytest.raises(exc, match=word):
        ops.paged_decode_attention(args.pop("q"), args.pop("key_cache"), args.pop("value_cache"),
                                   args.pop("block_tables"), args.pop("seq_lens"), **args)


def test_bad_indices_raise_and_int64_indices_work():
    """Index values are checked where that needs no device sync (always on CPU, under debug_checks on
    CUDA); int64 block tables and lengths are accepted."""
    q, kc, vc, tables, lens = _good()
    with_debug = ops.debug_checks()
    ops.debug_checks(True)
    try:
        bad = tables.clone()
        bad[0, 0] = kc.shape[0]
        with pytest.raises(IndexError, match="block_tables"):
            ops.paged_decode_attention(q, kc, vc, bad, lens)
        with pytest.raises(IndexError, match="seq_lens"):
            ops.paged_decode_attention(q, kc, vc, tables, lens + 1000)
        with pytest.raises(IndexError, match="seq_lens"):
            ops.paged_decode_attention(q, kc, vc, tables, lens - 100)
    finally:
        ops.debug_checks(with_debug)
    out = ops.paged_decode_attention(q, kc, vc, tables.long(), lens.long(), num_splits=2)
    assert _rel_err(out, ref.paged_decode_attention(q, kc, vc, tables, lens)) < 1e-5


def test_reference_backend_matches():
    q, kc, vc, tables, lens = _good(torch.bfloat16)
    with ops.backend("reference"):
        a, la = ops.paged_decode_attention(q, kc, vc, tables, lens, return_lse=True, sliding_window=7)
    b, lb = ops.paged_decode_attention(q, kc, vc, tables, lens, return_lse=True, sliding_window=7)
    assert _rel_err(a, b) < 1e-2 and _rel_err(la, lb) < 1e-5


def test_opcheck_and_compile():
    q, kc, vc, tables, lens = _good()
    for args in ((q, kc, vc, tables, lens, 0.125, 0, True, 2), (q, kc, vc, tables, lens, 0.3, 4, False, 0)):
        torch.library.opcheck(torch.ops.kvtriton.paged_decode_attention.default, args)
    fn = torch.compile(lambda *a: ops.paged_decode_attention(*a, return_lse=True), backend="eager",
                       fullgraph=True)
    out, lse = fn(q, kc, vc, tables, lens)
    r = ref.paged_decode_attention(q, kc, vc, tables, lens)
    assert _rel_err(out, r) < 1e-5 and lse.shape == (2, 8)
    assert math.isfinite(float(lse.sum()))
