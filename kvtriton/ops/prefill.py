"""Paged prefill attention (chunked prefill over a paged K/V cache) in Triton.

A batch of packed query chunks, each of any length (0 included), attends causally to its sequence's K/V:
the cached prefix and the chunk itself, whose K/V the caller has already written into the pages (with
``append_kv``). This covers chunked prefill, prefix-cache hits, speculative verification and, with an
empty prefix, plain prefill; conventions are vLLM's unified attention (``cu_seqlens_q`` packs the
queries; ``seq_lens`` counts prefix plus chunk). Design, FlashAttention-2 style:

* one program per (query tile, KV head). A query tile holds ``BLOCK_Q`` tokens of one sequence times the
  ``group = num_q_heads // num_kv_heads`` query heads of a GQA group, packed into the ``BLOCK_M`` rows of
  the score matrix (row ``r`` is token ``r // group``, head ``r % group``; any group size, 3 included),
  so each K/V tile is read once for the whole group;
* tiles map to sequences without a host sync: sequence ``b`` owns program ids from
  ``cu_seqlens_q[b] // BLOCK_Q + b`` on (vLLM's numbering), which gives every chunk at least
  ``ceil(n / BLOCK_Q)`` tiles within ``total_q // BLOCK_Q + batch`` programs; a program finds its
  sequence by binary search over ``cu_seqlens_q`` and exits when its tile lies past the chunk;
* the KV loop reads tiles of ``BLOCK_N`` tokens, each token's page through the block table, and skips
  tiles wholly outside the causal/sliding-window range. Tiles that every query of the tile sees in full
  run without mask arithmetic; only those at the window's start and on the diagonal are masked;
* online softmax in float32 with ``log2(e)`` folded into the scale (``exp2``); a row that has seen no
  key yet keeps ``m = -inf`` and contributes nothing (no ``inf - inf``), so a query that sees no key gets
  a zero output and ``lse = -inf``. Non-finite scores follow ``paged_decode_attention``'s rule: a score
  of -inf is turned into NaN before masking, so NaN and +-inf in an attended score all make that query
  head's ``out`` and ``lse`` NaN (through ``p = exp2(s - m)``), and a NaN ``l`` never reads as empty.

Block offsets are computed in int64 (``block_id * block_stride`` passes 2^31 in large arenas). The launch
heuristics live in :func:`prefill_launch_config`. As for decode, :class:`PrefillLaunch` is the one launch
path of the functional op and of ``PagedAttentionPlan`` (whose mixed batches pass ``q_start``: the
chunks' first rows in the whole batch), and :func:`prefill_reference` the PyTorch path of both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import reference as _ref
from ._backend import HAS_TRITON, use_triton
from ._common import (as_index, check_index, check_table_values, custom_op, device_guard, host_values, next_pow2,
                      unit_last_stride, values_checkable)
from ._launch import KernelLauncher
from .attention import check_qkv, check_scale_window

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - platforms without triton run the reference only
    triton = None
    tl = None

__all__ = ["paged_prefill_attention", "prefill_launch_config", "PrefillLaunchConfig", "PrefillLaunch"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------
# Launch heuristics
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrefillLaunchConfig:
    """Tile sizes of one ``paged_prefill_attention`` launch."""

    block_m: int      # score-matrix rows per program: block_q tokens x group heads (+ padding rows)
    block_q: int      # query tokens per program, block_m // group
    block_n: int      # keys per KV-loop iteration
    num_warps: int
    num_stages: int


def prefill_launch_config(total_q: int, batch: int, group: int, head_dim: int,
                          elem_size: int) -> PrefillLaunchConfig:
    """Choose tile sizes from what the host knows without a device sync.

    * ``block_m``: up to ``cap`` rows, cut down to the rows an average chunk fills
      (``ceil(total_q / batch) * group``, so a batch of one-token decode chunks with group 4 uses 16
      rows), and never below ``group`` (one token per tile; group 128 at most) or 16 (``tl.dot``'s
      minimum). ``cap`` is 128 for 16-bit inputs at head_dim <= 128 and 64 at 256; float32, whose IEEE
      products are FMA loops holding more in registers, gets 64 at head_dim <= 64 and 32 above.
    * ``block_n``: 64 keys at head_dim <= 128 and 32 at 256 for 16-bit inputs; 16 in float32.
    * ``num_warps``: 8 when the ``block_m x head_dim`` accumulator passes 8192 elements (4096 in float32).

    Compiled for sm_90 (Triton 3.9, ptxas -v) none of these spill: 16-bit 128x64 tiles at head_dim 128
    with 8 warps use 228 registers (wgmma), 64x32 at 256 use 213; float32 32x16 at head_dim 128 use 74 and
    64x16 at 64 use 108, where 64x32 float32 tiles spilled 1-2 KiB. Not yet timed on a GPU.
    """
    group = max(1, int(group))
    if elem_size <= 2:
        cap = 128 if head_dim <= 128 else 64
        block_n = 64 if head_dim <= 128 else 32
    else:
        cap = 64 if head_dim <= 64 else 32
        block_n = 16
    avg_rows = -(-max(1, total_q) // max(1, batch)) * group
    block_m = max(16, next_pow2(group), min(cap, next_pow2(avg_rows)))
    block_q = max(1, block_m // group)
    big = 8192 if elem_size <= 2 else 4096
    num_warps = 8 if block_m * head_dim >= big else 4
    return PrefillLaunchConfig(block_m, block_q, block_n, num_warps, num_stages=2)


def _empty(shape, dtype, device):
    """Allocation of every output (one place, so tests can poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _find_seq(CU, pid, batch, BLOCK_Q: tl.constexpr):
        """Largest ``b`` in ``[0, batch)`` with ``cu[b] // BLOCK_Q + b <= pid`` (programs of chunk b)."""
        lo: tl.int32 = 0
        hi = batch
        while lo < hi:
            mid = (lo + hi) // 2
            first = tl.load(CU + mid).to(tl.int32) // BLOCK_Q + mid
            if first <= pid:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    @triton.jit
    def _kv_range(acc, m_i, l_i, q, K, V, bt_row, k_head, v_head, pos, row_lo, kv_lo, kv_hi, lo, hi,
                  num_blocks, stride_kb, stride_kt, stride_vb, stride_vt, scale_log2,
                  HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASKED: tl.constexpr, F32_DOT: tl.constexpr):
        """Online-softmax update of (acc, m, l) with the keys of tiles starting in ``[lo, hi)``.

        Unmasked tiles lie wholly inside every row's causal window and below ``kv_hi``; masked tiles
        compare each key with each row's position (``row_lo < t <= pos``) and load only ``[kv_lo, kv_hi)``.
        Block ids out of ``[0, num_blocks)`` are not followed (on CUDA they are checked only under
        debug_checks(), and a bad id must not become a read outside the cache): such a key reads K = V = 0.
        """
        offs_n = tl.arange(0, BLOCK_N)
        d = tl.arange(0, HEAD_DIM)
        for start in range(lo, hi, BLOCK_N):
            t = start + offs_n
            if MASKED:
                in_range = (t >= kv_lo) & (t < kv_hi)
                phys = tl.load(bt_row + t // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
                kv_ok = in_range & (phys >= 0) & (phys < num_blocks)
            else:
                phys = tl.load(bt_row + t // BLOCK_SIZE).to(tl.int64)
                kv_ok = (phys >= 0) & (phys < num_blocks)
            slot = (t % BLOCK_SIZE).to(tl.int64)
            k_ptr = K + (phys * stride_kb + slot * stride_kt + k_head)[:, None] + d[None, :]
            v_ptr = V + (phys * stride_vb + slot * stride_vt + v_head)[:, None] + d[None, :]
            k = tl.load(k_ptr, mask=kv_ok[:, None], other=0.0)
            if F32_DOT:
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * scale_log2
            # -inf would pass for a masked key; as NaN it poisons the row like NaN and +inf do.
            s = tl.where(s == float("-inf"), float("nan"), s)
            if MASKED:
                visible = (t[None, :] <= pos[:, None]) & (t[None, :] > row_lo[:, None])
                s = tl.where(visible, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # A row with no visible key so far keeps m = -inf: subtract 0 instead (exp2(-inf) = 0).
                m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_sub = m_new
            alpha = tl.exp2(m_i - m_sub)
            p = tl.exp2(s - m_sub[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr, mask=kv_ok[:, None], other=0.0)
            if F32_DOT:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _prefill_kernel(
        Q, K, V, BT, SL, CU, O, LSE,
        QSTART,                      # [batch] first row of chunk b in q / out / lse (when HAS_QSTART)
        stride_qt, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh,
        stride_btb,
        batch, num_tiles, num_kv_heads, max_blocks, window, num_blocks,
        scale_log2,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, F32_DOT: tl.constexpr,
        HAS_QSTART: tl.constexpr,
    ):
        # Last tiles first: within a chunk later tiles see more keys, so the long programs start early.
        pid = num_tiles - 1 - tl.program_id(0)
        kvh = tl.program_id(1)
        b = tl.maximum(_find_seq(CU, pid, batch, BLOCK_Q), 0)     # >= 0 unless cu_seqlens_q[0] != 0
        q_start = tl.load(CU + b).to(tl.int32)
        q_len = tl.load(CU + b + 1).to(tl.int32) - q_start
        tile = pid - (q_start // BLOCK_Q + b)
        tok_lo = tile * BLOCK_Q
        if tok_lo < q_len:
            L = tl.load(SL + b).to(tl.int32)
            L = tl.maximum(tl.minimum(L, max_blocks * BLOCK_SIZE), 0)   # never read past the table row
            prefix = L - q_len
            num_q_heads = num_kv_heads * GROUP

            r = tl.arange(0, BLOCK_M)
            tok = tok_lo + r // GROUP
            head = kvh * GROUP + r % GROUP
            row_ok = (r < BLOCK_Q * GROUP) & (tok < q_len)
            pos = prefix + tok
            row_lo = tl.where(window > 0, pos - window, -1)             # keys t with row_lo < t <= pos
            d = tl.arange(0, HEAD_DIM)
            # A plan's prefill chunks inside a mixed batch: CU packs only these chunks (tile mapping and
            # lengths); their rows in the whole batch's q / out / lse start at QSTART.
            if HAS_QSTART:
                q_row = tl.load(QSTART + b).to(tl.int64) + tok
            else:
                q_row = (q_start + tok).to(tl.int64)
            q = tl.load(Q + (q_row * stride_qt + head.to(tl.int64) * stride_qh)[:, None] + d[None, :],
                        mask=row_ok[:, None], other=0.0)

            # Keys any row of the tile sees: [kv_lo, kv_hi); keys every row sees: [full_lo, pos_lo].
            pos_lo = prefix + tok_lo
            pos_hi = prefix + tl.minimum(tok_lo + BLOCK_Q, q_len) - 1
            kv_hi = tl.maximum(tl.minimum(pos_hi + 1, L), 0)
            kv_lo = tl.where(window > 0, tl.maximum(pos_lo - window + 1, 0), 0)
            kv_lo = tl.minimum(kv_lo, kv_hi)
            full_lo = tl.where(window > 0, tl.maximum(pos_hi - window + 1, 0), 0)
            t0 = (kv_lo // BLOCK_N) * BLOCK_N
            f_lo = tl.minimum(tl.maximum((full_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N, t0), kv_hi)
            f_hi = tl.minimum(tl.maximum((pos_lo + 1) // BLOCK_N * BLOCK_N, f_lo), kv_hi)

            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
            bt_row = BT + b.to(tl.int64) * stride_btb
            k_head = kvh.to(tl.int64) * stride_kh
            v_head = kvh.to(tl.int64) * stride_vh
            acc, m_i, l_i = _kv_range(acc, m_i, l_i, q, K, V, bt_row, k_head, v_head, pos, row_lo,
                                      kv_lo, kv_hi, t0, f_lo, num_blocks, stride_kb, stride_kt,
                                      stride_vb, stride_vt, scale_log2, HEAD_DIM, BLOCK_SIZE, BLOCK_N,
                                      True, F32_DOT)
            acc, m_i, l_i = _kv_range(acc, m_i, l_i, q, K, V, bt_row, k_head, v_head, pos, row_lo,
                                      kv_lo, kv_hi, f_lo, f_hi, num_blocks, stride_kb, stride_kt,
                                      stride_vb, stride_vt, scale_log2, HEAD_DIM, BLOCK_SIZE, BLOCK_N,
                                      False, F32_DOT)
            acc, m_i, l_i = _kv_range(acc, m_i, l_i, q, K, V, bt_row, k_head, v_head, pos, row_lo,
                                      kv_lo, kv_hi, f_hi, kv_hi, num_blocks, stride_kb, stride_kt,
                                      stride_vb, stride_vt, scale_log2, HEAD_DIM, BLOCK_SIZE, BLOCK_N,
                                      True, F32_DOT)

            # l == 0: the row saw no key (out 0, lse -inf). NaN fails both tests and stays NaN.
            empty = l_i == 0.0
            out = acc * tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))[:, None]
            log2_l = tl.log2(tl.where(empty, 1.0, l_i))
            lse = tl.where(empty, float("-inf"), (m_i + log2_l) * 0.6931471805599453)
            o_row = q_row * num_q_heads + head
            tl.store(O + o_row[:, None] * HEAD_DIM + d[None, :], out.to(O.dtype.element_ty),
                     mask=row_ok[:, None])
            tl.store(LSE + o_row, lse, mask=row_ok)


class PrefillLaunch:
    """One prefill-attention launch prepared up to ``q`` and the caches (see
    :class:`~kvtriton.ops.attention.DecodeLaunch`): launch config, outputs, index tensors, launcher.

    ``q_start`` (int32/int64 ``[batch]``, optional): the first row of chunk ``b`` in ``q``/``out``/``lse``
    when ``cu_seqlens_q`` packs only a subset of a larger batch's chunks (a plan's mixed batch); ``out``
    and ``lse`` are then the whole packed buffers.
    """

    def __init__(self, *, total_q: int, num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 cu_seqlens_q: torch.Tensor, scale: float, window: int = 0, out: torch.Tensor | None = None,
                 lse: torch.Tensor | None = None, q_start: torch.Tensor | None = None, out_rows: int | None = None):
        hq, hkv, d = num_q_heads, num_kv_heads, head_dim
        rows = total_q if out_rows is None else out_rows
        self.out = _empty((rows, hq, d), dtype, device) if out is None else out
        self.lse = _empty((rows, hq), torch.float32, device) if lse is None else lse
        self.kernel = None
        self.fill_empty = False
        batch, max_blocks = block_tables.shape
        if total_q == 0 or hq == 0:
            return
        if batch == 0:  # only reachable with cu_seqlens_q[-1] != total_q, where values went unchecked
            self.fill_empty = True
            return
        group = hq // hkv
        cfg = prefill_launch_config(total_q, batch, group, d, dtype.itemsize)
        self.cfg = cfg
        num_tiles = total_q // cfg.block_q + batch
        has_qstart = q_start is not None
        self.kernel = KernelLauncher(_prefill_kernel, (num_tiles, hkv), dict(
            Q=None, K=None, V=None, BT=block_tables, SL=seq_lens, CU=cu_seqlens_q, O=None, LSE=None,
            QSTART=q_start if has_qstart else cu_seqlens_q,
            stride_qt=None, stride_qh=None, stride_kb=None, stride_kt=None, stride_kh=None,
            stride_vb=None, stride_vt=None, stride_vh=None, stride_btb=block_tables.stride(0),
            batch=batch, num_tiles=num_tiles, num_kv_heads=hkv, max_blocks=max_blocks, window=window,
            num_blocks=None, scale_log2=float(scale) * _LOG2E,
            GROUP=group, HEAD_DIM=d, BLOCK_SIZE=block_size,
            BLOCK_M=cfg.block_m, BLOCK_Q=cfg.block_q, BLOCK_N=cfg.block_n,
            # float32 needs IEEE products (TF32 would miss 1e-5); the interpreter's 16-bit dot is unreliable.
            F32_DOT=dtype == torch.float32 or device.type == "cpu", HAS_QSTART=has_qstart),
            _SLOTS, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))

    def launch(self, q, key_cache, value_cache, out=None, lse=None) -> None:
        """Launch on ``q`` and one layer's caches, writing ``out``/``lse`` (default: this launch's own
        buffers). Shapes, dtypes and devices must be those it was prepared for (not checked here)."""
        out = self.out if out is None else out
        lse = self.lse if lse is None else lse
        if self.kernel is None:
            if self.fill_empty:
                out.zero_()
                lse.fill_(float("-inf"))
            return
        with device_guard(q):
            self.kernel(q, key_cache, value_cache, out, lse, q.stride(0), q.stride(1),
                        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
                        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), key_cache.shape[0])


_SLOTS = ("Q", "K", "V", "O", "LSE", "stride_qt", "stride_qh", "stride_kb", "stride_kt", "stride_kh",
          "stride_vb", "stride_vt", "stride_vh", "num_blocks")


def prefill_reference(q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale: float,
                      window: int, pieces=None):
    """The vectorised PyTorch path (``reference.attention_pieces``), float32 like the kernel: ``(out,
    lse)``. ``pieces``: a plan's precomputed addressing."""
    total_q, hq, _ = q.shape
    if pieces is None:
        pieces = _ref.attention_pieces(block_tables, seq_lens, cu_seqlens_q, total_q=total_q, num_q_heads=hq,
                                       block_size=key_cache.shape[1], num_blocks=key_cache.shape[0],
                                       sliding_window=window or None, device=q.device)
    out, lse, _ = _ref.attention_pieces_run(pieces, q, key_cache, value_cache, total_q=total_q, scale=scale)
    return out, lse


# ----------------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------------

@custom_op("paged_prefill_attention", mutates_args=())
def _paged_prefill_attention_op(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                block_tables: torch.Tensor, seq_lens: torch.Tensor,
                                cu_seqlens_q: torch.Tensor, scale: float,
                                sliding_window: int) -> tuple[torch.Tensor, torch.Tensor]:
    window = int(sliding_window)
    # Called directly (torch.ops.kvtriton.*, opcheck, torch.compile) nothing has been normalised: the
    # kernel needs unit last strides on q, the caches and the index tensors.
    block_tables, seq_lens, cu_seqlens_q = as_index(block_tables), as_index(seq_lens), as_index(cu_seqlens_q)
    if not unit_last_stride(q):
        q = q.contiguous()
    if use_triton(q) and unit_last_stride(key_cache) and unit_last_stride(value_cache):
        total_q, hq, d = q.shape
        st = PrefillLaunch(total_q=total_q, num_q_heads=hq, num_kv_heads=key_cache.shape[2], head_dim=d,
                           block_size=key_cache.shape[1], dtype=q.dtype, device=q.device,
                           block_tables=block_tables, seq_lens=seq_lens, cu_seqlens_q=cu_seqlens_q, scale=scale,
                           window=window)
        st.launch(q, key_cache, value_cache)
        return st.out, st.lse
    return prefill_reference(q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale, window)


@_paged_prefill_attention_op.register_fake
def _(q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale, sliding_window):
    total_q, hq, d = q.shape
    return q.new_empty((total_q, hq, d)), q.new_empty((total_q, hq), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------
# Validation and the public entry point
# ----------------------------------------------------------------------------------------------------

def check_cu_values(cu, sl, total_q: int) -> None:
    """Value checks of ``cu_seqlens_q`` on host arrays (``cu [batch + 1]``, ``seq_lens [batch]`` or None to
    skip the last check): from 0 to ``total_q``, non-decreasing, no chunk longer than its sequence.
    ValueError naming the first bad sequence."""
    cu = cu.astype(np.int64, copy=False)
    if cu[0] != 0 or cu[-1] != total_q:
        raise ValueError(f"cu_seqlens_q must start at 0 and end at total_q = q.shape[0] = {total_q}, "
                         f"got {int(cu[0])} and {int(cu[-1])}")
    chunk = cu[1:] - cu[:-1]
    neg = np.flatnonzero(chunk < 0)
    if neg.size:
        b = int(neg[0])
        raise ValueError(f"cu_seqlens_q must be non-decreasing, got cu_seqlens_q[{b}] = {int(cu[b])} > "
                         f"cu_seqlens_q[{b + 1}] = {int(cu[b + 1])}")
    short = np.flatnonzero(chunk > sl) if sl is not None else ()
    if len(short):
        b = int(short[0])
        raise ValueError(f"seq_lens[{b}] = {int(sl[b])} must be >= its chunk length "
                         f"cu_seqlens_q[{b + 1}] - cu_seqlens_q[{b}] = {int(chunk[b])} (seq_lens "
                         f"counts the cached prefix plus the chunk)")


def check_prefill_indices(block_tables, seq_lens, cu_seqlens_q, device) -> int:
    """Shapes and dtypes of the three index tensors (ValueError); returns ``batch``."""
    check_index("block_tables", block_tables, ndim=2, device=device)
    batch = block_tables.shape[0]
    check_index("cu_seqlens_q", cu_seqlens_q, ndim=1, device=device)
    if cu_seqlens_q.shape[0] != batch + 1:
        raise ValueError(f"cu_seqlens_q must have shape [batch + 1] = [{batch + 1}] (block_tables rows + 1), "
                         f"got {tuple(cu_seqlens_q.shape)}")
    check_index("seq_lens", seq_lens, ndim=1, device=device)
    if seq_lens.shape[0] != batch:
        raise ValueError(f"seq_lens must have shape [batch] = [{batch}] (block_tables rows), "
                         f"got {tuple(seq_lens.shape)}")
    return batch


def _validate(q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale, sliding_window):
    num_blocks, block_size, _, _ = check_qkv(q, key_cache, value_cache, block_tables=block_tables,
                                             seq_lens=seq_lens, cu_seqlens_q=cu_seqlens_q)
    check_scale_window(scale, sliding_window)
    batch = check_prefill_indices(block_tables, seq_lens, cu_seqlens_q, q.device)
    # Shapes and dtypes always; index values where that needs no device sync (CPU, or debug checks),
    # read once (one device-to-host copy on CUDA).
    if values_checkable(block_tables, seq_lens, cu_seqlens_q):
        bt, sl, cu = host_values(block_tables, seq_lens, cu_seqlens_q)
        if batch:
            check_table_values(bt, sl, block_size=block_size, num_blocks=num_blocks)
        check_cu_values(cu, sl, q.shape[0])


def paged_prefill_attention(q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, *, scale=None,
                            sliding_window=None, return_lse=False):
    """Causal attention of packed query chunks over their sequences' paged K/V (chunked prefill).

    Args:
        q: ``[total_q, num_q_heads, head_dim]`` float16/bfloat16/float32, the chunks packed back to back
            (any strides on the first two dimensions).
        key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, q's dtype, any
            stride on the block dimension (e.g. views into an arena), contiguous last dimension. The
            chunks' own K/V must already be in the pages (``append_kv``).
        block_tables: int32 ``[batch, max_blocks]`` (int64 accepted), physical block of each logical
            block; entries past a sequence's length are never read.
        seq_lens: int32 ``[batch]`` (int64 accepted), tokens per sequence: cached prefix plus chunk.
        cu_seqlens_q: int32 ``[batch + 1]`` (int64 accepted), chunk ``b`` is
            ``q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]]``; non-decreasing from 0 to ``total_q``, every chunk
            no longer than its sequence. Empty chunks are allowed.
        scale: softmax scale, default ``1/sqrt(head_dim)``.
        sliding_window: query at position ``p`` attends only to keys ``p - sliding_window < t <= p``
            (the decode op's window for a one-token chunk).
        return_lse: also return float32 ``[total_q, num_q_heads]`` natural-log log-sum-exp of the scores.

    Query ``i`` of a chunk of ``n`` tokens in a sequence of ``L`` sits at position ``L - n + i`` and sees
    keys ``t <= L - n + i``. Returns ``out`` ``[total_q, num_q_heads, head_dim]`` in q's dtype, or
    ``(out, lse)``.

    Non-finite values, as in :func:`~kvtriton.ops.paged_decode_attention`: scores ``q.k * scale`` are
    formed in float32 and ``scale`` must lie in ``(0, MAX_SCALE]``. If any score a query head attends to
    is not finite (NaN or +-inf in ``q`` or in a key it attends to, or overflow), that query head's
    ``out`` and ``lse`` are NaN; other queries and heads are unaffected, on both paths. NaN or inf in a
    value vector propagates into ``out`` as IEEE arithmetic gives, which (as in FlashAttention) may also
    reach queries of the same chunk that do not attend to that token (``0 * inf``).
    """
    # Index views the kernel cannot address (non-unit last stride) are copied before the value checks,
    # so the checks and the kernel read the same tensors.
    block_tables, seq_lens, cu_seqlens_q = as_index(block_tables), as_index(seq_lens), as_index(cu_seqlens_q)
    _validate(q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale, sliding_window)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if not unit_last_stride(q):
        q = q.contiguous()
    out, lse = _paged_prefill_attention_op(
        q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, float(scale),
        0 if sliding_window is None else int(sliding_window))
    return (out, lse) if return_lse else out
