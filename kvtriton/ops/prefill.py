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
heuristics live in :func:`prefill_launch_config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import reference as _ref
from ._backend import HAS_TRITON, use_triton
from ._common import (as_index, check_block_tables, check_cache, check_index, check_same_device, check_tensor,
                      custom_op, device_guard, next_pow2, unit_last_stride, values_checkable)
from .attention import MAX_SCALE

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - platforms without triton run the reference only
    triton = None
    tl = None

__all__ = ["paged_prefill_attention", "prefill_launch_config", "PrefillLaunchConfig"]

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
        stride_qt, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh,
        stride_btb,
        batch, num_tiles, num_kv_heads, max_blocks, window, num_blocks,
        scale_log2,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, F32_DOT: tl.constexpr,
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


def _launch(q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale, window):
    total_q, hq, d = q.shape
    _, block_size, hkv, _ = key_cache.shape
    batch, max_blocks = block_tables.shape
    out = _empty((total_q, hq, d), q.dtype, q.device)
    lse = _empty((total_q, hq), torch.float32, q.device)
    if total_q == 0 or hq == 0:
        return out, lse
    if batch == 0:  # only reachable with cu_seqlens_q[-1] != total_q, where values went unchecked
        return out.zero_(), lse.fill_(float("-inf"))
    group = hq // hkv
    cfg = prefill_launch_config(total_q, batch, group, d, q.element_size())
    num_tiles = total_q // cfg.block_q + batch
    with device_guard(q):
        _prefill_kernel[(num_tiles, hkv)](
            q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, out, lse,
            q.stride(0), q.stride(1),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
            block_tables.stride(0),
            batch, num_tiles, hkv, max_blocks, window, key_cache.shape[0],
            float(scale) * _LOG2E,
            GROUP=group, HEAD_DIM=d, BLOCK_SIZE=block_size,
            BLOCK_M=cfg.block_m, BLOCK_Q=cfg.block_q, BLOCK_N=cfg.block_n,
            # float32 needs IEEE products (TF32 would miss 1e-5); the interpreter's 16-bit dot is unreliable.
            F32_DOT=q.dtype == torch.float32 or q.device.type == "cpu",
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
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
        return _launch(q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale, window)
    # Reference path: float64 for float32 inputs (exact to the 1e-5 contract), float32 otherwise.
    compute = torch.float64 if q.dtype == torch.float32 else torch.float32
    out, lse = _ref.paged_prefill_attention(
        q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale=scale,
        sliding_window=window if window > 0 else None, return_lse=True, compute_dtype=compute)
    return out.contiguous(), lse.contiguous()


@_paged_prefill_attention_op.register_fake
def _(q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale, sliding_window):
    total_q, hq, d = q.shape
    return q.new_empty((total_q, hq, d)), q.new_empty((total_q, hq), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------
# Validation and the public entry point
# ----------------------------------------------------------------------------------------------------

def _validate(q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale, sliding_window):
    check_tensor("q", q, ndim=3, dtypes=_DTYPES)
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        check_cache(name, t)
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} must equal q dtype {q.dtype}")
    if value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache shape {tuple(value_cache.shape)} must equal key_cache shape "
                         f"{tuple(key_cache.shape)}")
    check_same_device(q=q, key_cache=key_cache, value_cache=value_cache, block_tables=block_tables,
                      seq_lens=seq_lens, cu_seqlens_q=cu_seqlens_q)
    total_q, hq, d = q.shape
    num_blocks, block_size, hkv, dk = key_cache.shape
    if dk != d:
        raise ValueError(f"q head_dim {d} must equal the cache head_dim {dk}")
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two in [16, 256] (e.g. 64, 128, 256), got {d}")
    if block_size < 1 or block_size > 256 or block_size & (block_size - 1):
        raise ValueError(f"block_size (key_cache.shape[1]) must be a power of two in [1, 256], got {block_size}")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"num_q_heads ({hq}) must be a positive multiple of num_kv_heads ({hkv})")
    if hq // hkv > 128:
        raise ValueError(f"num_q_heads // num_kv_heads must be at most 128, got {hq // hkv}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
                or not 0 < scale <= MAX_SCALE:
            raise ValueError(f"scale must be a float in (0, {MAX_SCALE:g}] (or None for 1/sqrt(head_dim)), "
                             f"got {scale!r}")
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
            raise ValueError(f"sliding_window must be an int >= 1 or None, got {sliding_window!r}")
    check_index("block_tables", block_tables, ndim=2, device=q.device)
    batch = block_tables.shape[0]
    check_index("cu_seqlens_q", cu_seqlens_q, ndim=1, device=q.device)
    if cu_seqlens_q.shape[0] != batch + 1:
        raise ValueError(f"cu_seqlens_q must have shape [batch + 1] = [{batch + 1}] (block_tables rows + 1), "
                         f"got {tuple(cu_seqlens_q.shape)}")
    # Shapes and dtypes always; index values where that needs no device sync (CPU, or debug checks).
    check_block_tables(block_tables, seq_lens, block_size=block_size, num_blocks=num_blocks, device=q.device)
    if values_checkable(cu_seqlens_q, seq_lens):
        cu = cu_seqlens_q.long()
        if int(cu[0]) != 0 or int(cu[-1]) != total_q:
            raise ValueError(f"cu_seqlens_q must start at 0 and end at total_q = q.shape[0] = {total_q}, "
                             f"got {int(cu[0])} and {int(cu[-1])}")
        if batch:
            chunk = cu[1:] - cu[:-1]
            if bool((chunk < 0).any()):
                b = int((chunk < 0).nonzero()[0])
                raise ValueError(f"cu_seqlens_q must be non-decreasing, got cu_seqlens_q[{b}] = {int(cu[b])} > "
                                 f"cu_seqlens_q[{b + 1}] = {int(cu[b + 1])}")
            short = chunk > seq_lens.long()
            if bool(short.any()):
                b = int(short.nonzero()[0])
                raise ValueError(f"seq_lens[{b}] = {int(seq_lens[b])} must be >= its chunk length "
                                 f"cu_seqlens_q[{b + 1}] - cu_seqlens_q[{b}] = {int(chunk[b])} (seq_lens "
                                 f"counts the cached prefix plus the chunk)")


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
