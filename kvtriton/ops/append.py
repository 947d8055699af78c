"""``append_kv``: write new tokens' K and V into the paged cache at their slots (vLLM's
``reshape_and_cache``)."""

from __future__ import annotations

import torch

from . import reference
from ._backend import HAS_TRITON, use_triton
from ._common import (as_index, check_cache, check_index, check_kv_cache, check_range, custom_op,
                      device_guard, needs_i64_heads, unit_last_stride, values_checkable)
from .gather import token_tile

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _append_kv_kernel(key_ptr, value_ptr, kc_ptr, vc_ptr, slot_ptr, num_tokens, num_slots,
                          block_size, H, D,
                          k_st, k_sh, v_st, v_sh,
                          kc_sb, kc_st, kc_sh, vc_sb, vc_st, vc_sh,
                          BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                          I64_HEADS: tl.constexpr):
        # One program per BLOCK_T tokens x BLOCK_H heads: a [BLOCK_T, BLOCK_H, BLOCK_D] tile of K and
        # one of V, each row a contiguous head_dim run, so loads and stores are full-width vectors.
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = t < num_tokens
        slot = tl.load(slot_ptr + t, mask=t_mask, other=-1).to(tl.int64)
        # Negative slots are padding; slots past the cache are skipped (checked on the host when cheap).
        t_mask = t_mask & (slot >= 0) & (slot < num_slots)
        blk = slot // block_size
        off = slot - blk * block_size
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        m = t_mask[:, None, None] & ((h < H)[:, None] & (d < D)[None, :])[None, :, :]
        t64 = t.to(tl.int64)
        # Token bases in int64 (block id * block stride passes 2^31 in a large arena); the within-token
        # part (head * stride + d) stays int32 unless a head stride makes it pass 2^31 (heads-outermost
        # layouts): I64_HEADS, chosen on the host.
        if I64_HEADS:
            h = h.to(tl.int64)
        k_in = key_ptr + (t64 * k_st)[:, None, None] + ((h * k_sh)[:, None] + d[None, :])[None, :, :]
        v_in = value_ptr + (t64 * v_st)[:, None, None] + ((h * v_sh)[:, None] + d[None, :])[None, :, :]
        kc = kc_ptr + (blk * kc_sb + off * kc_st)[:, None, None] + ((h * kc_sh)[:, None] + d[None, :])[None, :, :]
        vc = vc_ptr + (blk * vc_sb + off * vc_st)[:, None, None] + ((h * vc_sh)[:, None] + d[None, :])[None, :, :]
        k = tl.load(k_in, mask=m)
        v = tl.load(v_in, mask=m)
        tl.store(kc, k, mask=m)
        tl.store(vc, v, mask=m)


def _launch_params(num_tokens: int, H: int, D: int) -> tuple[int, int, int, int]:
    block_h, block_d, block_t = token_tile(H, D)
    # Small appends (a decode step of a small batch) would leave most SMs idle with 4096-element
    # tiles; shrink the token tile until there are a few hundred programs or one token per program.
    head_tiles = -(-H // block_h)
    while block_t > 1 and -(-num_tokens // block_t) * head_tiles < 512:
        block_t //= 2
    tile = block_t * block_h * block_d
    num_warps = 8 if tile >= 8192 else 4 if tile >= 2048 else 2
    return block_t, block_h, block_d, num_warps


@custom_op("append_kv", mutates_args=("key_cache", "value_cache"))
def _append_kv_op(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    # Called directly (torch.ops.kvtriton.append_kv, opcheck, torch.compile) nothing has been normalised:
    # the kernel needs a unit stride on the last dimension of every tensor it addresses.
    slot_mapping = as_index(slot_mapping)
    if not use_triton(key_cache) or not (unit_last_stride(key_cache) and unit_last_stride(value_cache)):
        reference.append_kv(key, value, key_cache, value_cache, slot_mapping)
        return
    num_tokens = key.shape[0]
    num_blocks, block_size, H, D = key_cache.shape
    if num_tokens == 0 or num_blocks == 0 or H * D == 0:
        return
    # Mixed dtypes are cast by PyTorch first (one extra pass, off the usual path): Triton's interpreter
    # truncates fp32 -> bf16 where the GPU and PyTorch round to nearest even, and results must match.
    key, value = key.to(key_cache.dtype), value.to(value_cache.dtype)
    key = key if unit_last_stride(key) else key.contiguous()
    value = value if unit_last_stride(value) else value.contiguous()
    block_t, block_h, block_d, num_warps = _launch_params(num_tokens, H, D)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(H, block_h))
    with device_guard(key_cache):
        _append_kv_kernel[grid](
            key, value, key_cache, value_cache, slot_mapping, num_tokens, num_blocks * block_size,
            block_size, H, D,
            key.stride(0), key.stride(1), value.stride(0), value.stride(1),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
            BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d,
            I64_HEADS=needs_i64_heads(H, D, key, value, key_cache, value_cache), num_warps=num_warps)


@_append_kv_op.register_fake
def _(key, value, key_cache, value_cache, slot_mapping):
    return None


def append_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
    """Write new tokens into the paged cache, in place.

    key, value: ``[num_tokens, num_kv_heads, head_dim]``, any dtype castable to the cache's, last
    dimension contiguous. key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``,
    any strides with the last dimension contiguous. slot_mapping: int64 (or int32) ``[num_tokens]``,
    ``slot = block * block_size + offset``; a negative slot is padding and is skipped. Slots must be
    distinct (two tokens written to one slot leave it undefined).
    """
    slot_mapping = as_index(slot_mapping)
    num_blocks, block_size, H, D = check_kv_cache(key_cache, value_cache)
    check_cache("key", key, ndim=3)
    check_cache("value", value, ndim=3)
    if tuple(key.shape[1:]) != (H, D):
        raise ValueError(f"key must have shape [num_tokens, {H}, {D}] (num_kv_heads, head_dim of the cache), "
                         f"got {tuple(key.shape)}")
    if value.shape != key.shape:
        raise ValueError(f"value shape {tuple(value.shape)} must equal key shape {tuple(key.shape)}")
    check_index("slot_mapping", slot_mapping, device=key_cache.device)
    for name, t in (("key", key), ("value", value)):
        if t.device != key_cache.device:
            raise ValueError(f"{name} is on {t.device} but key_cache is on {key_cache.device}")
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping must have shape [num_tokens] = [{key.shape[0]}], "
                         f"got {tuple(slot_mapping.shape)}")
    if values_checkable(slot_mapping):
        check_range("slot_mapping", slot_mapping, 0, num_blocks * block_size, mask=slot_mapping >= 0)
    _append_kv_op(key, value, key_cache, value_cache, slot_mapping)
