"""``compact_tokens``: after a token-eviction policy (StreamingLLM, H2O, ...) has chosen which tokens of
each sequence to keep, pack the kept tokens densely, in order, into the front of the sequence's own
blocks, in place.

Strategy. A prefix sum of ``keep`` (on the device, ``torch.cumsum``) gives each kept token its
destination ``dest(t) = #kept before t``, and ``dest(t) <= t``. Tokens before the first dropped one do
not move, so work starts there. Because a destination slot may be the source of another kept token
that has not been read yet, a fully parallel copy would race. Instead, one program owns one sequence
(and a tile of heads: different heads are disjoint memory, so they run in parallel) and walks its
tokens in increasing order, ``BLOCK_T`` at a time: it loads the chunk's moving tokens, waits at a
barrier, then stores them. This is safe without a temporary buffer:

- within a chunk, every load happens before any store (the barrier), so a store may overwrite a slot
  of the same chunk that was just read;
- a chunk writes only to slots before its own last token (``dest(t) < t``), and later chunks read only
  slots after it, so no store ever hits a slot that is still to be read.

Sequences must not share blocks (prefix-shared blocks must be copied first): the programs of two
sequences run unordered.

Parallelism is therefore batch x head tiles; the head tile shrinks (down to one head) when the batch
is small, so the grid still covers the GPU. No device sync, no temporary beyond the [batch, max_tokens]
destination map.
"""

from __future__ import annotations

import torch

from . import reference
from ._backend import HAS_TRITON, use_triton
from ._common import (as_index, check_block_tables, check_kv_cache, check_range, check_tensor, custom_op,
                      device_guard, needs_i64_heads, next_pow2, unit_last_stride, values_checkable)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _compact_kernel(kc_ptr, vc_ptr, block_tables_ptr, dst_pos_ptr, start_ptr, end_ptr,
                        bt_stride, max_tokens, num_blocks, block_size, H, D,
                        kc_sb, kc_st, kc_sh, vc_sb, vc_st, vc_sh,
                        BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                        I64_HEADS: tl.constexpr):
        b = tl.program_id(0)
        start = tl.load(start_ptr + b)
        end = tl.load(end_ptr + b)
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        if I64_HEADS:  # head * stride passes 2^31 (see append_kv)
            h = h.to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        hd_mask = (h < H)[:, None] & (d < D)[None, :]
        k_inner = (h * kc_sh)[:, None] + d[None, :]
        v_inner = (h * vc_sh)[:, None] + d[None, :]
        bt_row = block_tables_ptr + b.to(tl.int64) * bt_stride
        pos_row = dst_pos_ptr + b.to(tl.int64) * max_tokens
        for t0 in range(start, end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_mask = t < end
            dp = tl.load(pos_row + t, mask=t_mask, other=-1)  # destination, -1 if the token stays
            mv = dp >= 0
            s_blk = tl.load(bt_row + t // block_size, mask=mv, other=0).to(tl.int64)
            d_blk = tl.load(bt_row + dp // block_size, mask=mv, other=0).to(tl.int64)
            mv = mv & (s_blk >= 0) & (s_blk < num_blocks) & (d_blk >= 0) & (d_blk < num_blocks)
            s_off = (t % block_size).to(tl.int64)
            d_off = (dp % block_size).to(tl.int64)
            m = mv[:, None, None] & hd_mask[None, :, :]
            k = tl.load(kc_ptr + (s_blk * kc_sb + s_off * kc_st)[:, None, None] + k_inner[None, :, :], mask=m)
            v = tl.load(vc_ptr + (s_blk * vc_sb + s_off * vc_st)[:, None, None] + v_inner[None, :, :], mask=m)
            # Every thread's loads of this chunk complete before any thread stores (see module doc).
            tl.debug_barrier()
            tl.store(kc_ptr + (d_blk * kc_sb + d_off * kc_st)[:, None, None] + k_inner[None, :, :], k, mask=m)
            tl.store(vc_ptr + (d_blk * vc_sb + d_off * vc_st)[:, None, None] + v_inner[None, :, :], v, mask=m)


def _launch_params(batch: int, H: int, D: int, device: torch.device) -> tuple[int, int, int, int]:
    block_d = next_pow2(D)
    block_h = next_pow2(H)
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    while block_h > 1 and batch * -(-H // block_h) < target:
        block_h //= 2
    # A program walks its sequence serially, so each step should move a lot: 8192 elements of K and of V
    # (32 KiB in bf16) per step keep enough bytes in flight per SM even with one program per SM.
    block_t = max(1, 8192 // (block_h * block_d))
    tile = block_t * block_h * block_d
    num_warps = 8 if tile >= 8192 else 4 if tile >= 2048 else 2
    return block_t, block_h, block_d, num_warps


@custom_op("compact_tokens", mutates_args=("key_cache", "value_cache"))
def _compact_tokens_op(key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
                       seq_lens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    block_tables, seq_lens = as_index(block_tables), as_index(seq_lens)
    if not use_triton(key_cache) or not (unit_last_stride(key_cache) and unit_last_stride(value_cache)):
        return reference.compact_tokens(key_cache, value_cache, block_tables, seq_lens, keep)
    batch, max_tokens = keep.shape
    device = key_cache.device
    num_blocks, block_size, H, D = key_cache.shape
    if batch == 0 or max_tokens == 0:
        return torch.zeros(batch, dtype=torch.int32, device=device)
    pos = torch.arange(max_tokens, device=device)
    # Lengths past the table row would read the next row's block ids (another sequence's blocks) as
    # this sequence's: on CUDA they are range-checked only under debug_checks(), so clamp here too.
    end = seq_lens.to(torch.int64).clamp(0, min(max_tokens, block_tables.shape[1] * block_size))
    kept = keep & (pos[None, :] < end[:, None])
    dest = torch.cumsum(kept, 1, dtype=torch.int32) - 1
    new_lens = kept.sum(1, dtype=torch.int32)
    moving = kept & (dest != pos[None, :])
    dst_pos = torch.where(moving, dest, -1).to(torch.int32).contiguous()
    start = torch.where(moving.any(1), moving.to(torch.int32).argmax(1), end).to(torch.int32)
    if H * D:
        block_t, block_h, block_d, num_warps = _launch_params(batch, H, D, device)
        grid = (batch, triton.cdiv(H, block_h))
        with device_guard(key_cache):
            _compact_kernel[grid](
                key_cache, value_cache, block_tables, dst_pos, start, end.to(torch.int32),
                block_tables.stride(0), max_tokens, num_blocks, block_size, H, D,
                key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
                value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
                BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d,
                I64_HEADS=needs_i64_heads(H, D, key_cache, value_cache), num_warps=num_warps)
    return new_lens


@_compact_tokens_op.register_fake
def _(key_cache, value_cache, block_tables, seq_lens, keep):
    return seq_lens.new_empty((seq_lens.shape[0],), dtype=torch.int32)


def compact_tokens(key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
                   seq_lens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Pack each sequence's kept tokens densely into the front of its own blocks, in order, in place.

    key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, any strides with the
    last dimension contiguous. block_tables: int32/int64 ``[batch, max_blocks]``; the blocks a sequence
    uses must not be used by another sequence. seq_lens: int32/int64 ``[batch]``, each at most
    ``max_tokens``. keep: bool ``[batch, max_tokens]``, True for each token to keep (entries past a
    sequence's length are ignored).

    Returns new_seq_lens int32 ``[batch]``. Slots past the new length keep their old contents; the blocks
    past ``ceil(new_len / block_size)`` can be freed.
    """
    # keep is only read by PyTorch ops (any layout); the tables and lengths reach the kernel.
    block_tables, seq_lens = as_index(block_tables), as_index(seq_lens)
    num_blocks, block_size, _, _ = check_kv_cache(key_cache, value_cache)
    batch, max_blocks = check_block_tables(block_tables, seq_lens, block_size=block_size,
                                           num_blocks=num_blocks, device=key_cache.device)
    check_tensor("keep", keep, ndim=2, dtypes=(torch.bool,), device=key_cache.device)
    if keep.shape[0] != batch:
        raise ValueError(f"keep must have shape [batch, max_tokens] with batch = {batch}, got {tuple(keep.shape)}")
    if batch and values_checkable(seq_lens, block_tables):
        check_range("seq_lens", seq_lens, 0, keep.shape[1] + 1)
        used = (seq_lens.long() + block_size - 1) // block_size
        ids = block_tables[torch.arange(max_blocks, device=block_tables.device)[None, :] < used[:, None]]
        if torch.unique(ids).numel() != ids.numel():
            raise ValueError("block_tables: a block is used twice (within or across sequences); compaction "
                             "writes in place and needs each used block to belong to one sequence")
    return _compact_tokens_op(key_cache, value_cache, block_tables, seq_lens, keep)
