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
    (lambda a: a.update(scale=1e38), ValueError, "scale"),                  # finite, but overflows scores
    (lambda a: a.update(scale=attn.MAX_SCALE * 1.5), ValueError, "scale"),
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


# ----------------------------------------------------------------------------------------------------
# Non-finite values (issue 10 §6): a head with a non-finite score gets NaN out and lse on both paths;
# an empty sequence keeps out 0, lse -inf; scale is bounded by MAX_SCALE.


def _same_nonfinite(a, b):
    for f in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(f(a), f(b)), f.__name__


def _nonfinite_case(which, gen):
    """(args, the (sequence, kv head) pairs expected to be NaN)."""
    q, kc, vc, tables, lens = _case(3, 6, 2, 16, 4, [9, 0, 13], torch.float32, gen=gen)
    bad = []
    if which == "nan_q":
        q[0, 1, 3] = float("nan")                    # one query head
        q[1, :, 0] = float("nan")                    # an empty sequence: not attended, stays 0 / -inf
    elif which == "inf_key":
        kc[tables[2, 1], 2, 1, 5] = float("inf")     # token 6 of sequence 2, kv head 1
    elif which == "neg_inf_score":
        # -inf for one attended token of sequence 0's kv head 0 (q > 0 on that dim): must not count as
        # "masked"; a NaN in a block past sequence 0's length is never attended.
        q[0, :3, 0] = q[0, :3, 0].abs() + 0.1
        kc[tables[0, 1], 0, 0, 0] = float("-inf")
        kc[tables[0, 2], 1, 0] = float("nan")        # token 9: past the length
    elif which == "nan_value":
        vc[tables[2, 3], 0, 0, 7] = float("nan")     # token 12 of sequence 2: out NaN, lse finite
    elif which == "overflow":
        q = q * 1e35                                 # q.k finite, q.k * MAX_SCALE * log2(e) is not
    return q, kc, vc, tables, lens


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on inf - inf
@pytest.mark.parametrize("path", ["reference", "triton"])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("which", ["nan_q", "inf_key", "neg_inf_score", "nan_value", "overflow"])
def test_nonfinite_scores_give_nan(monkeypatch, path, num_splits, which):
    monkeypatch.setattr(attn, "_empty", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))
    q, kc, vc, tables, lens = _nonfinite_case(which, torch.Generator().manual_seed(13))
    kw = {"scale": attn.MAX_SCALE} if which == "overflow" else {}
    with ops.backend(path):
        out, lse, mass = ops.paged_decode_attention(q, kc, vc, tables, lens, return_lse=True,
                                                    return_block_mass=True, num_splits=num_splits, **kw)
    r_out, r_lse, r_mass = ref.paged_decode_attention(q, kc, vc, tables, lens, return_lse=True,
                                                      return_block_mass=True, **kw)
    _same_nonfinite(out, r_out)
    _same_nonfinite(lse, r_lse)
    _same_nonfinite(mass, r_mass)
    assert _rel_err(out, r_out) < 1e-5 and _rel_err(lse, r_lse) < 1e-5 and _rel_err(mass, r_mass) < 1e-5
    nan_heads = lse.isnan()
    if which == "nan_q":
        assert nan_heads.tolist() == [[False, True, False, False, False, False], [False] * 6, [False] * 6]
        assert out[0, 1].isnan().all() and not out[0, 0].isnan().any()
        assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    elif which == "inf_key":
        assert nan_heads.tolist() == [[False] * 6, [False] * 6, [False] * 3 + [True] * 3]
        assert out[2, 3:].isnan().all() and mass[2, 3:, :4].isnan().all() and not mass[2, 3:, 4:].isnan().any()
    elif which == "neg_inf_score":
        assert nan_heads.tolist() == [[True] * 3 + [False] * 3, [False] * 6, [False] * 6]
    elif which == "nan_value":
        assert not nan_heads.any() and out[2, :3].isnan().any() and not out[:2].isnan().any()
    else:
        assert nan_heads[[0, 2]].all() and torch.isneginf(lse[1]).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("path", ["reference", "triton"])
def test_huge_scale_through_registered_op(path):
    """The registered op takes any float scale (the bound is checked by the public function): a scale
    of 1e38 overflows float32 scores, and both paths return NaN for the heads that attend to them."""
    q, kc, vc, tables, lens = _case(2, 4, 2, 16, 4, [9, 0], torch.float32,
                                    gen=torch.Generator().manual_seed(17))
    with ops.backend(path):
        out, lse, _ = torch.ops.kvtriton.paged_decode_attention(q, kc, vc, tables, lens, 1e38, 0, False, 2)
    r_out, r_lse = ref.paged_decode_attention(q, kc, vc, tables, lens, scale=1e38, return_lse=True)
    _same_nonfinite(out, r_out)
    _same_nonfinite(lse, r_lse)
    assert lse[0].isnan().all() and out[0].isnan().all()
    assert torch.isneginf(lse[1]).all() and torch.equal(out[1], torch.zeros_like(out[1]))


def test_max_scale_is_accepted_and_finite():
    q, kc, vc, tables, lens = _good()
    out, lse = ops.paged_decode_attention(q, kc, vc, tables, lens, scale=attn.MAX_SCALE, return_lse=True)
    r_out, r_lse = ref.paged_decode_attention(q, kc, vc, tables, lens, scale=attn.MAX_SCALE, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert _rel_err(out, r_out) < 1e-5 and _rel_err(lse, r_lse) < 1e-5


@pytest.mark.parametrize("path", ["auto", "reference"])
def test_out_of_range_block_ids_are_not_followed(path):
    """Block ids are range-checked on the host only where that needs no sync; the kernel must never read
    outside the cache for an unchecked bad id (here called through the registered op, which does no value
    checks). Such a token reads K = V = 0, on the kernel and on the PyTorch path: the reference on a cache
    with an extra zero block agrees."""
    gen = torch.Generator().manual_seed(19)
    bs, hkv, d, nb = 4, 2, 16, 8
    kbuf = torch.randn(nb + 4, bs, hkv, d, generator=gen)
    vbuf = torch.randn(nb + 4, bs, hkv, d, generator=gen)
    for buf in (kbuf, vbuf):              # NaN just before and after the cache: reads there show
        buf[:2] = float("nan")
        buf[nb + 2:] = float("nan")
    kc, vc = kbuf[2:nb + 2], vbuf[2:nb + 2]
    tables = torch.tensor([[3, nb, 1], [-1, 5, 0]], dtype=torch.int32)
    lens = torch.tensor([10, 7], dtype=torch.int32)
    q = torch.randn(2, 4, d, generator=gen)
    with ops.backend(path):
        out, lse, mass = torch.ops.kvtriton.paged_decode_attention(q, kc, vc, tables, lens, 0.25, 0, True, 2)
    zk = torch.cat([kc, torch.zeros(1, bs, hkv, d)])
    zv = torch.cat([vc, torch.zeros(1, bs, hkv, d)])
    fixed = torch.where((tables < 0) | (tables >= nb), nb, tables)
    r_out, r_lse, r_mass = ref.paged_decode_attention(q, zk, zv, fixed, lens, return_lse=True,
                                                      return_block_mass=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all() and torch.isfinite(mass).all()
    assert _rel_err(out, r_out) < 1e-5 and _rel_err(lse, r_lse) < 1e-5 and _rel_err(mass, r_mass) < 1e-5


_COMPILE_SCRIPT = r'''
import os
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvtriton.ops import attention as attn

def build(fn, types, consts, warps):
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    return "cubin" in k.asm

f32 = ["PM", "PL", "PACC", "MASS", "MREF", "LSE"]
types = {**{n: "*bf16" for n in ["Q", "K", "V", "O"]}, **{n: "*fp32" for n in f32},
         "BT": "*i32", "SL": "*i32", "QROW": "*i32", "scale_log2": "fp32"}
for split, qrow in ((False, False), (True, False), (False, True), (True, True)):
    assert build(attn._decode_partial_kernel, types,
                 {"GROUP": 4, "G_PAD": 16, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK_N": 64, "SPLIT": split,
                  "WRITE_MASS": split and not qrow, "F32_DOT": False, "FAST_LOG2": True, "HAS_QROW": qrow}, 4)
for qrow in (False, True):
    assert build(attn._decode_merge_kernel, types,
                 {"HEAD_DIM": 128, "SPLITS_PAD": 4, "BLOCK_SIZE": 16, "BLOCK_B": 128, "WRITE_MASS": not qrow,
                  "HAS_QROW": qrow}, 4)
print("OK")
'''


def test_kernels_compile_for_cuda():
    """The CUDA build (sm_90, Triton's bundled ptxas) of both kernels: catches code only the interpreter
    accepts. Run in a subprocess because the tests' triton is in interpreter mode."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                       timeout=300)
    if r.returncode != 0 and ("ptxas" in r.stderr.lower() or "No module named 'triton.backends.nvidia'"
                              in r.stderr):
        pytest.skip(f"no CUDA toolchain in this triton build: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_opcheck_strided_indices():
    """The registered op normalises its own index arguments (opcheck and torch.compile call it directly)."""
    q, kc, vc, tables, lens = _case(2, 4, 2, 16, 4, [9, 3], torch.float32, gen=torch.Generator().manual_seed(23))
    st_tables = torch.stack([tables, torch.zeros_like(tables)], -1).flatten(-2)[:, ::2]
    st_lens = torch.stack([lens, torch.zeros_like(lens)], -1).flatten()[::2]
    q_odd = q.transpose(1, 2).contiguous().transpose(1, 2)
    torch.library.opcheck(torch.ops.kvtriton.paged_decode_attention.default,
                          (q_odd, kc, vc, st_tables, st_lens, 0.125, 0, True, 2))
    out = torch.ops.kvtriton.paged_decode_attention(q_odd, kc, vc, st_tables, st_lens, 0.125, 0, False, 2)[0]
    assert _rel_err(out, ref.paged_decode_attention(q, kc, vc, tables, lens, scale=0.125)) < 1e-5
