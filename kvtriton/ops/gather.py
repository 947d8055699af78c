"""Pages to contiguous memory and back: ``gather_kv`` (ragged tokens), ``gather_blocks`` and
``scatter_blocks`` (whole blocks, e.g. a staging buffer for offload to host memory).

The whole-block kernel here (``_block_copy_kernel``) is also what ``move_blocks`` launches: a block is
treated as ``[rows, cols]`` with ``cols`` contiguous (one dense row for a contiguous cache or arena
block), and every program copies one ``BLOCK``-element tile of one block, so the hot loop is a wide
vectorised load and store from a 64-bit base offset.
"""

from __future__ import annotations

import math

import torch

from . import reference
from ._backend import HAS_TRITON, use_triton
from ._common import (as_index, block_layout, check_block_tables, check_cache, check_index,
                      check_kv_cache, check_range, check_same_device, custom_op, device_guard,
                      needs_i64_heads, next_pow2, unit_last_stride, values_checkable)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _block_copy_kernel(src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr, n_src_blocks, n_dst_blocks,
                           src_stride_b, src_stride_r, dst_stride_b, dst_stride_r,
                           cols, tiles_per_row, total_tiles,
                           SRC_INDEXED: tl.constexpr, DST_INDEXED: tl.constexpr,
                           SKIP_SAME: tl.constexpr, EVEN: tl.constexpr, BLOCK: tl.constexpr):
        # Program (i, j) copies tiles j, j + grid[1], ... of pair i. Block ids are promoted to int64
        # before they meet a stride: id * stride passes 2^31 elements in a large arena.
        i = tl.program_id(0)
        if SRC_INDEXED:
            s = tl.load(src_ids_ptr + i).to(tl.int64)
        else:
            s = i.to(tl.int64)
        if DST_INDEXED:
            d = tl.load(dst_ids_ptr + i).to(tl.int64)
        else:
            d = i.to(tl.int64)
        # Ids out of range are skipped rather than followed: on CUDA, ranges are checked only under
        # debug_checks(), and a bad id must never turn into a wild write.
        ok = (s >= 0) & (s < n_src_blocks) & (d >= 0) & (d < n_dst_blocks)
        if SKIP_SAME:
            ok = ok & (s != d)
        if ok:
            src_base = src_ptr + s * src_stride_b
            dst_base = dst_ptr + d * dst_stride_b
            offs = tl.arange(0, BLOCK)
            for t in range(tl.program_id(1), total_tiles, tl.num_programs(1)):
                r = t // tiles_per_row
                c0 = (t - r * tiles_per_row) * BLOCK
                r64 = r.to(tl.int64)
                src = src_base + r64 * src_stride_r + c0 + offs
                dst = dst_base + r64 * dst_stride_r + c0 + offs
                if EVEN:
                    x = tl.load(src)
                    tl.store(dst, x)
                else:
                    mask = c0 + offs < cols
                    x = tl.load(src, mask=mask)
                    tl.store(dst, x, mask=mask)

    @triton.jit
    def _gather_kv_kernel(kc_ptr, vc_ptr, k_out_ptr, v_out_ptr, block_tables_ptr, seq_lens_ptr, cu_ptr,
                          num_tokens, max_blocks, bt_stride, num_blocks, block_size, H, D,
                          kc_sb, kc_st, kc_sh, vc_sb, vc_st, vc_sh,
                          BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                          I64_HEADS: tl.constexpr):
        # One program per (sequence, logical block) x head tile; programs past a sequence's end exit.
        pid = tl.program_id(0)
        b = pid // max_blocks
        j = pid - b * max_blocks
        n = tl.load(seq_lens_ptr + b)
        start = j * block_size
        if start < n:
            phys = tl.load(block_tables_ptr + b.to(tl.int64) * bt_stride + j).to(tl.int64)
            if (phys >= 0) & (phys < num_blocks):
                ntok = tl.minimum(n - start, block_size)
                row0 = tl.load(cu_ptr + b).to(tl.int64) + start
                h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
                if I64_HEADS:  # head * stride passes 2^31 (see append_kv)
                    h = h.to(tl.int64)
                dd = tl.arange(0, BLOCK_D)
                hd_mask = (h < H)[:, None] & (dd < D)[None, :]
                k_inner = (h * kc_sh)[:, None] + dd[None, :]
                v_inner = (h * vc_sh)[:, None] + dd[None, :]
                o_inner = (h * D)[:, None] + dd[None, :]
                k_blk = kc_ptr + phys * kc_sb
                v_blk = vc_ptr + phys * vc_sb
                for t0 in range(0, ntok, BLOCK_T):
                    t = t0 + tl.arange(0, BLOCK_T)
                    t64 = t.to(tl.int64)
                    # Rows outside [0, num_tokens) are skipped: on CUDA, lengths are checked against
                    # num_tokens only under debug_checks(), and a bad length must never become a wild
                    # store (negative lengths make cu_seqlens, hence row0, negative).
                    row = row0 + t64
                    m = ((t < ntok) & (row >= 0) & (row < num_tokens))[:, None, None] & hd_mask[None, :, :]
                    k = tl.load(k_blk + (t64 * kc_st)[:, None, None] + k_inner[None, :, :], mask=m)
                    v = tl.load(v_blk + (t64 * vc_st)[:, None, None] + v_inner[None, :, :], mask=m)
                    o = (row * (H * D))[:, None, None] + o_inner[None, :, :]
                    tl.store(k_out_ptr + o, k, mask=m)
                    tl.store(v_out_ptr + o, v, mask=m)


# ---------------------------------------------------------------------------------------------------
# Launch helpers (shared with move.py)

def _tile_params(cols: int, elem_size: int) -> tuple[int, int]:
    """(BLOCK, num_warps): tiles of up to 16 KiB, so each thread of 8 warps moves four 16-byte vectors."""
    block = min(next_pow2(cols), max(16384 // elem_size, 128))
    block = max(block, 16)
    nbytes = block * elem_size
    num_warps = 8 if nbytes >= 8192 else 4 if nbytes >= 2048 else 2 if nbytes >= 512 else 1
    return block, num_warps


def launch_block_copy(src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor | None,
                      dst_ids: torch.Tensor | None, n: int, *, skip_same: bool = False) -> bool:
    """Copy ``n`` blocks ``src[src_ids[i]] -> dst[dst_ids[i]]`` (identity where ids is None).

    Returns False (copying nothing) when the per-block layouts do not collapse to ``[rows, cols]`` with
    a contiguous last dimension; the caller then takes the PyTorch path.
    """
    layout = block_layout(src.shape[1:], src.stride()[1:], dst.stride()[1:])
    if layout is None:
        return False
    if n == 0 or math.prod(src.shape[1:]) == 0:
        return True
    rows, cols, (src_sr, dst_sr) = layout
    block, num_warps = _tile_params(cols, src.element_size())
    tiles_per_row = triton.cdiv(cols, block)
    total_tiles = rows * tiles_per_row
    grid = (n, min(total_tiles, 65535))
    ids_dummy = src_ids if src_ids is not None else dst_ids if dst_ids is not None else src
    with device_guard(dst):
        _block_copy_kernel[grid](
            src, dst, src_ids if src_ids is not None else ids_dummy,
            dst_ids if dst_ids is not None else ids_dummy,
            src.shape[0], dst.shape[0], src.stride(0), src_sr, dst.stride(0), dst_sr,
            cols, tiles_per_row, total_tiles,
            SRC_INDEXED=src_ids is not None, DST_INDEXED=dst_ids is not None, SKIP_SAME=skip_same,
            EVEN=cols % block == 0, BLOCK=block, num_warps=num_warps)
    return True


def _empty(shape, dtype, device):
    """Allocation of every output of this module's ops (one place, so tests can poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def token_tile(H: int, D: int, tile: int = 4096) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_D, BLOCK_T) for per-token copies: about ``tile`` elements per program-step."""
    block_d = next_pow2(D)
    block_h = min(next_pow2(H), max(1, tile // block_d))
    block_t = max(1, tile // (block_h * block_d))
    return block_h, block_d, block_t


# ---------------------------------------------------------------------------------------------------
# Registered ops (the device work) and their fake (shape-only) implementations

@custom_op("gather_kv", mutates_args=())
def _gather_kv_op(key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    block_tables, seq_lens = as_index(block_tables), as_index(seq_lens)
    batch = seq_lens.shape[0]
    _, block_size, H, D = key_cache.shape
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=key_cache.device)
    torch.cumsum(seq_lens, 0, dtype=torch.int32, out=cu[1:])
    if not use_triton(key_cache) or not (unit_last_stride(key_cache) and unit_last_stride(value_cache)):
        key, value, _ = reference.gather_kv(key_cache, value_cache, block_tables, seq_lens)
        return key, value, cu
    key = _empty((num_tokens, H, D), key_cache.dtype, key_cache.device)
    value = _empty((num_tokens, H, D), value_cache.dtype, value_cache.device)
    max_blocks = block_tables.shape[1]
    if batch and max_blocks and num_tokens:
        # 8192-element steps (16 KiB of K and of V in bf16): a 16-token block of 8 x 128 heads takes two.
        block_h, block_d, block_t = token_tile(H, D, tile=8192)
        block_t = min(block_t, next_pow2(block_size))
        num_warps = 8 if block_t * block_h * block_d >= 8192 else 4
        grid = (batch * max_blocks, triton.cdiv(H, block_h))
        with device_guard(key_cache):
            _gather_kv_kernel[grid](
                key_cache, value_cache, key, value, block_tables, seq_lens, cu,
                num_tokens, max_blocks, block_tables.stride(0), key_cache.shape[0], block_size, H, D,
                key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
                value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
                BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d,
                I64_HEADS=needs_i64_heads(H, D, key_cache, value_cache), num_warps=num_warps)
    return key, value, cu


@_gather_kv_op.register_fake
def _(key_cache, value_cache, block_tables, seq_lens, num_tokens):
    _, _, H, D = key_cache.shape
    return (key_cache.new_empty((num_tokens, H, D)), value_cache.new_empty((num_tokens, H, D)),
            seq_lens.new_empty((seq_lens.shape[0] + 1,), dtype=torch.int32))


@custom_op("gather_blocks", mutates_args=("out",))
def _gather_blocks_op(cache: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor) -> None:
    block_ids = as_index(block_ids)
    n = block_ids.shape[0]
    if use_triton(cache) and launch_block_copy(cache, out, block_ids, None, n):
        return
    out.copy_(reference.gather_blocks(cache, block_ids))


@_gather_blocks_op.register_fake
def _(cache, block_ids, out):
    return None


@custom_op("scatter_blocks", mutates_args=("cache",))
def _scatter_blocks_op(cache: torch.Tensor, block_ids: torch.Tensor, blocks: torch.Tensor) -> None:
    block_ids = as_index(block_ids)
    n = block_ids.shape[0]
    # Cast by PyTorch (rounds to nearest even everywhere, unlike the interpreter's fp32 -> bf16).
    if use_triton(cache) and launch_block_copy(blocks.to(cache.dtype), cache, None, block_ids, n):
        return
    reference.scatter_blocks(cache, block_ids, blocks)


@_scatter_blocks_op.register_fake
def _(cache, block_ids, blocks):
    return None


# ---------------------------------------------------------------------------------------------------
# Public entry points: validate, then call the registered op

def gather_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
              seq_lens: torch.Tensor, *, num_tokens: int | None = None):
    """Copy each sequence's tokens out of the paged cache into contiguous tensors.

    key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, any dtype, any strides
    with the last dimension contiguous. block_tables: int32/int64 ``[batch, max_blocks]``. seq_lens:
    int32/int64 ``[batch]``. ``num_tokens`` (= ``seq_lens.sum()``) avoids a device sync when given.

    Returns ``(key, value, cu_seqlens)``: key/value ``[num_tokens, num_kv_heads, head_dim]`` in the
    cache dtype, sequence b at rows ``cu_seqlens[b]:cu_seqlens[b+1]``; cu_seqlens int32 ``[batch+1]``.
    """
    block_tables, seq_lens = as_index(block_tables), as_index(seq_lens)
    num_blocks, block_size, _, _ = check_kv_cache(key_cache, value_cache)
    check_block_tables(block_tables, seq_lens, block_size=block_size, num_blocks=num_blocks,
                       device=key_cache.device)
    if num_tokens is None or values_checkable(seq_lens):
        total = int(seq_lens.sum()) if seq_lens.numel() else 0
        if num_tokens is None:
            num_tokens = total
        elif int(num_tokens) != total:
            raise ValueError(f"num_tokens must equal seq_lens.sum() = {total}, got {num_tokens}")
    if int(num_tokens) < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    return _gather_kv_op(key_cache, value_cache, block_tables, seq_lens, int(num_tokens))


def _check_block_ids(name: str, ids, cache: torch.Tensor) -> None:
    check_index(name, ids, device=cache.device)
    check_range(name, ids, 0, cache.shape[0])


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor, *, out: torch.Tensor | None = None):
    """Copy whole blocks by id: ``cache[block_ids]``.

    cache: any ``[num_blocks, ...]`` tensor with a contiguous last dimension (e.g. one layer's K cache,
    or an arena ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``). block_ids:
    int32/int64 ``[n]``. Returns (or fills ``out``, which it then returns) ``[n, *cache.shape[1:]]``
    in the cache dtype.
    """
    block_ids = as_index(block_ids)
    check_cache("cache", cache, ndim=None)
    _check_block_ids("block_ids", block_ids, cache)
    shape = (block_ids.shape[0], *cache.shape[1:])
    if out is None:
        out = _empty(shape, cache.dtype, cache.device)
    else:
        check_cache("out", out, ndim=None)
        check_same_device(cache=cache, out=out)
        if tuple(out.shape) != shape:
            raise ValueError(f"out must have shape {shape} ([n, *cache.shape[1:]]), got {tuple(out.shape)}")
        if out.dtype != cache.dtype:
            raise ValueError(f"out must have the cache dtype {cache.dtype}, got {out.dtype}")
    _gather_blocks_op(cache, block_ids, out)
    return out


def scatter_blocks(cache: torch.Tensor, block_ids: torch.Tensor, blocks: torch.Tensor) -> None:
    """Write whole blocks by id, in place: ``cache[block_ids] = blocks`` (the inverse of gather_blocks).

    cache: any ``[num_blocks, ...]`` tensor with a contiguous last dimension. block_ids: int32/int64
    ``[n]``, distinct. blocks: ``[n, *cache.shape[1:]]``, any dtype castable to the cache's, last
    dimension contiguous.
    """
    block_ids = as_index(block_ids)
    check_cache("cache", cache, ndim=None)
    _check_block_ids("block_ids", block_ids, cache)
    check_cache("blocks", blocks, ndim=None)
    check_same_device(cache=cache, blocks=blocks)
    shape = (block_ids.shape[0], *cache.shape[1:])
    if tuple(blocks.shape) != shape:
        raise ValueError(f"blocks must have shape {shape} ([n, *cache.shape[1:]]), got {tuple(blocks.shape)}")
    if values_checkable(block_ids) and torch.unique(block_ids).numel() != block_ids.numel():
        raise ValueError("block_ids must be distinct (a block written twice has no defined value)")
    _scatter_blocks_op(cache, block_ids, blocks)
