"""Per-key attention scores from the log-sum-exp the attention ops return (``paged_attention_scores``).

Token-eviction rules (H2O, SnapKV, TOVA) rank cached keys by the attention they receive. The attention
kernels never form the probability matrix; they return each query's log-sum-exp ``lse`` of its scaled
scores (``return_lse=True``). With it, the probability of key ``t`` for query ``i`` is
``exp(q_i . k_t * scale - lse_i)``, computable key tile by key tile without a softmax pass. This op
recomputes those scores for a chunk of queries per sequence (an observation window: the last ``w``
queries of a prompt, or the one decode query) and sums them over the chunk's queries, per query head.

Design: one program per (sequence, KV head, tile of ``BLOCK_N`` keys). The tile's keys are read once
(through the block table) and the program loops over the chunk's queries, ``BLOCK_Q`` tokens times the
GQA group's query heads at a time (rows ``token * G_PAD + head``, as the prefill kernel packs them), so
one ``tl.dot`` scores a whole group; the probabilities are summed over tokens by a reshape to
``[BLOCK_Q, G_PAD, BLOCK_N]``. Query tiles wholly before the key tile (causally blind to it) are skipped.
Every output element is written (zeros past the sequence), so no buffer needs clearing. Offsets of
blocks are int64. The plain-PyTorch path is ``reference.paged_attention_scores`` (dense, float64).
"""

from __future__ import annotations

import math

import torch

from . import reference as _ref
from ._backend import HAS_TRITON, use_triton
from ._common import (as_index, check_table_values, check_tensor, custom_op, device_guard, host_values, next_pow2,
                      unit_last_stride, values_checkable)
from .attention import check_qkv, check_scale_window
from .prefill import check_cu_values

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - platforms without triton run the reference only
    triton = None
    tl = None

__all__ = ["paged_attention_scores"]

_LOG2E = 1.4426950408889634

if HAS_TRITON:

    @triton.jit
    def _scores_kernel(Q, K, BT, SL, CU, LSE, OUT,
                       stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_btb, stride_lt, stride_lh,
                       num_kv_heads, max_blocks, window, num_blocks, out_width, scale_log2,
                       GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                       F32_DOT: tl.constexpr):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        t0 = tl.program_id(2) * BLOCK_N
        L = tl.load(SL + b).to(tl.int32)
        L = tl.maximum(tl.minimum(L, max_blocks * BLOCK_SIZE), 0)     # never read past the table row
        q_start = tl.load(CU + b).to(tl.int32)
        q_len = tl.load(CU + b + 1).to(tl.int32) - q_start
        prefix = L - q_len
        d = tl.arange(0, HEAD_DIM)
        t = t0 + tl.arange(0, BLOCK_N)
        t_ok = t < L
        phys = tl.load(BT + b.to(tl.int64) * stride_btb + t // BLOCK_SIZE, mask=t_ok, other=0).to(tl.int64)
        # Block ids out of range are not followed (checked on CUDA only under debug_checks()): K reads 0.
        kv_ok = t_ok & (phys >= 0) & (phys < num_blocks)
        slot = (t % BLOCK_SIZE).to(tl.int64)
        k = tl.load(K + (phys * stride_kb + slot * stride_kt + kvh.to(tl.int64) * stride_kh)[:, None] + d[None, :],
                    mask=kv_ok[:, None], other=0.0)
        r = tl.arange(0, BLOCK_Q * G_PAD)
        g = r % G_PAD
        head = kvh * GROUP + g
        acc = tl.zeros([G_PAD, BLOCK_N], tl.float32)
        # Queries at positions < t0 see none of this tile's keys.
        i_lo = (tl.maximum(t0 - prefix, 0) // BLOCK_Q) * BLOCK_Q
        for i0 in range(i_lo, q_len, BLOCK_Q):
            tok = i0 + r // G_PAD
            row_ok = (tok < q_len) & (g < GROUP)
            q_row = (q_start + tok).to(tl.int64)
            q = tl.load(Q + (q_row * stride_qt + head.to(tl.int64) * stride_qh)[:, None] + d[None, :],
                        mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + q_row * stride_lt + head.to(tl.int64) * stride_lh, mask=row_ok, other=0.0)
            if F32_DOT:
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            pos = prefix + tok
            vis = row_ok[:, None] & t_ok[None, :] & (t[None, :] <= pos[:, None])
            vis = vis & ((window == 0) | (t[None, :] > pos[:, None] - window))
            p = tl.exp2(s * scale_log2 - (lse * 1.4426950408889634)[:, None])
            p = tl.where(vis, p, 0.0)
            acc += tl.sum(tl.reshape(p, [BLOCK_Q, G_PAD, BLOCK_N]), 0)
        gg = tl.arange(0, G_PAD)
        o_row = (b.to(tl.int64) * num_kv_heads * GROUP + kvh * GROUP + gg) * out_width
        tl.store(OUT + o_row[:, None] + t[None, :], acc, mask=(gg < GROUP)[:, None] & (t < out_width)[None, :])


def _launch(q, key_cache, block_tables, seq_lens, cu, lse, scale: float, window: int, max_q: int):
    total_q, hq, d = q.shape
    batch, max_blocks = block_tables.shape
    _, block_size, hkv, _ = key_cache.shape
    group = hq // hkv
    width = max_blocks * block_size
    out = torch.empty(batch, hq, width, dtype=torch.float32, device=q.device)
    if batch == 0 or width == 0 or hq == 0:
        return out.zero_()
    g_pad = next_pow2(group)
    # tl.dot needs at least 16 rows; decode chunks (one query) use the fewest rows that satisfy it.
    block_q = max(1, 16 // g_pad, min(64 // g_pad, next_pow2(max_q)))
    block_n = 64 if d <= 128 else 32
    grid = (batch, hkv, triton.cdiv(width, block_n))
    with device_guard(q):
        _scores_kernel[grid](
            q, key_cache, block_tables, seq_lens, cu, lse, out,
            q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            block_tables.stride(0), lse.stride(0), lse.stride(1),
            hkv, max_blocks, window, key_cache.shape[0], width, float(scale) * _LOG2E,
            GROUP=group, G_PAD=g_pad, HEAD_DIM=d, BLOCK_SIZE=block_size, BLOCK_Q=block_q, BLOCK_N=block_n,
            F32_DOT=q.dtype == torch.float32 or q.device.type == "cpu", num_warps=4)
    return out


@custom_op("paged_attention_scores", mutates_args=())
def _scores_op(q: torch.Tensor, key_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
               lse: torch.Tensor, cu_seqlens_q: torch.Tensor, scale: float, sliding_window: int,
               max_q: int) -> torch.Tensor:
    block_tables, seq_lens, cu_seqlens_q = as_index(block_tables), as_index(seq_lens), as_index(cu_seqlens_q)
    if not unit_last_stride(q):
        q = q.contiguous()
    if use_triton(q) and unit_last_stride(key_cache):
        return _launch(q, key_cache, block_tables, seq_lens, cu_seqlens_q, lse, scale, int(sliding_window),
                       max(1, int(max_q)))
    return _ref.paged_attention_scores(q, key_cache, block_tables, seq_lens, lse, cu_seqlens_q, scale=scale,
                                       sliding_window=int(sliding_window) or None)


@_scores_op.register_fake
def _(q, key_cache, block_tables, seq_lens, lse, cu_seqlens_q, scale, sliding_window, max_q):
    return q.new_empty((block_tables.shape[0], q.shape[1], block_tables.shape[1] * key_cache.shape[1]),
                       dtype=torch.float32)


def _validate(q, key_cache, block_tables, seq_lens, lse, cu_seqlens_q, scale, sliding_window) -> None:
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32, torch.int64))
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32, torch.int64))
    check_tensor("lse", lse, ndim=2, dtypes=(torch.float32,))
    check_qkv(q, key_cache, key_cache, block_tables=block_tables, seq_lens=seq_lens, lse=lse)
    check_scale_window(scale, sliding_window)
    batch = block_tables.shape[0]
    if seq_lens.shape[0] != batch:
        raise ValueError(f"seq_lens must have shape [batch] = [{batch}] (block_tables rows), "
                         f"got {tuple(seq_lens.shape)}")
    if tuple(lse.shape) != tuple(q.shape[:2]):
        raise ValueError(f"lse must have shape [total_q, num_q_heads] = {list(q.shape[:2])} (q's first two "
                         f"dimensions), got {tuple(lse.shape)}")
    if cu_seqlens_q is None:
        if q.shape[0] != batch:
            raise ValueError(f"without cu_seqlens_q, q holds one query per sequence: q.shape[0] must be "
                             f"{batch} (block_tables rows), got {q.shape[0]}")
    else:
        check_tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=(torch.int32, torch.int64), device=q.device)
        if cu_seqlens_q.shape[0] != batch + 1:
            raise ValueError(f"cu_seqlens_q must have shape [batch + 1] = [{batch + 1}], "
                             f"got {tuple(cu_seqlens_q.shape)}")
    if values_checkable(block_tables, seq_lens, cu_seqlens_q):
        vals = host_values(block_tables, seq_lens, *(() if cu_seqlens_q is None else (cu_seqlens_q,)))
        if batch:
            check_table_values(vals[0], vals[1], block_size=key_cache.shape[1], num_blocks=key_cache.shape[0])
        if cu_seqlens_q is not None:
            check_cu_values(vals[2], vals[1], q.shape[0])


def paged_attention_scores(q, key_cache, block_tables, seq_lens, lse, *, cu_seqlens_q=None, scale=None,
                           sliding_window=None, max_q_len=None):
    """The attention probability each cached key receives from a chunk of queries, summed over the
    chunk's queries, per query head, from the log-sum-exp the attention op returned for those queries.

    Args:
        q: ``[total_q, num_q_heads, head_dim]`` float16/bfloat16/float32 (after RoPE, as attended).
        key_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` in q's dtype (contiguous last dim).
        block_tables: int32 ``[batch, max_blocks]`` (int64 accepted; any view).
        seq_lens: int32 ``[batch]`` (int64 accepted), tokens per sequence (its chunk's included).
        lse: float32 ``[total_q, num_q_heads]``, each query's natural-log log-sum-exp of its scaled scores, as
            ``paged_prefill_attention(..., return_lse=True)`` / ``paged_decode_attention(..., return_lse=True)``
            return it (over the same keys, scale and window).
        cu_seqlens_q: int32 ``[batch + 1]`` (int64 accepted): chunk ``b`` is ``q[cu[b]:cu[b+1]]``, the
            LAST queries of sequence ``b`` (query ``i`` of ``n`` at position ``seq_lens[b] - n + i``, as in
            ``paged_prefill_attention``). None: one query per sequence (``q[b]``, decode).
        scale: softmax scale (default ``1/sqrt(head_dim)``); sliding_window: as the attention ops.
        max_q_len: an upper bound of the chunk lengths (host hint for tile sizes; default ``total_q``).

    Returns float32 ``[batch, num_q_heads, max_blocks * block_size]``: entry ``[b, h, t]`` is
    ``sum_i exp(q_i . k_t * scale - lse_i)`` over the chunk's queries that see key ``t`` (0 for keys no
    query sees and positions past ``seq_lens[b]``). Per QUERY head: sum over a GQA group's heads to get a
    KV head's score. A NaN ``lse`` or score gives NaN on the keys that query sees.
    """
    block_tables, seq_lens, cu_seqlens_q = as_index(block_tables), as_index(seq_lens), as_index(cu_seqlens_q)
    _validate(q, key_cache, block_tables, seq_lens, lse, cu_seqlens_q, scale, sliding_window)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens_q is None:
        cu_seqlens_q = torch.arange(block_tables.shape[0] + 1, dtype=torch.int32, device=q.device)
        max_q_len = 1
    if not unit_last_stride(q):
        q = q.contiguous()
    if not unit_last_stride(lse):
        lse = lse.contiguous()
    return _scores_op(q, key_cache, block_tables, seq_lens, lse, cu_seqlens_q, float(scale),
                      0 if sliding_window is None else int(sliding_window),
                      q.shape[0] if max_q_len is None else int(max_q_len))
