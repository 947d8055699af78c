"""``append_kv``: write new tokens' K and V into the paged cache at their slots (vLLM's
``reshape_and_cache``)."""

from __future__ import annotations

import torch

from . import reference
from ._backend import HAS_TRITON, use_triton
from ._common import (as_index, check_cache, check_index, check_kv_cache, custom_op, device_guard, host_values,
                      needs_i64_heads, unit_last_stride, values_checkable)
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


def _slot_view(cache: torch.Tensor) -> torch.Tensor | None:
    """``cache [num_blocks, block_size, H, D]`` as ``[num_slots, H, D]`` (a view), when its blocks are laid
    out one after another (block stride = block_size x slot stride), else None."""
    shape, stride = cache.shape, cache.stride()
    if shape[0] > 1 and stride[0] != shape[1] * stride[1]:
        return None
    return cache.view(-1, shape[2], shape[3])


def _append_reference(key, value, key_cache, value_cache, slot_mapping, padded: bool | None = None) -> None:
    """The PyTorch path: ``index_copy_`` into slot views of the caches when they have them and no slot is
    padding (``padded`` False, or found so here), else ``reference.append_kv``."""
    if padded is None:
        padded = bool(slot_mapping.numel()) and bool((slot_mapping < 0).any())
    if not padded and key.shape[0]:
        kf, vf = _slot_view(key_cache), _slot_view(value_cache)
        if kf is not None and vf is not None:
            slots = slot_mapping if slot_mapping.dtype == torch.int64 else slot_mapping.long()
            kf.index_copy_(0, slots, key if key.dtype == kf.dtype else key.to(kf.dtype))
            vf.index_copy_(0, slots, value if value.dtype == vf.dtype else value.to(vf.dtype))
            return
    reference.append_kv(key, value, key_cache, value_cache, slot_mapping)


def _append_impl(key, value, key_cache, value_cache, slot_mapping, padded: bool | None = None) -> None:
    # Called directly (torch.ops.kvtriton.append_kv, opcheck, torch.compile) nothing has been normalised:
    # the kernel needs a unit stride on the last dimension of every tensor it addresses.
    slot_mapping = as_index(slot_mapping)
    if not use_triton(key_cache) or not (unit_last_stride(key_cache) and unit_last_stride(value_cache)):
        _append_reference(key, value, key_cache, value_cache, slot_mapping, padded)
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


@custom_op("append_kv", mutates_args=("key_cache", "value_cache"), impl=_append_impl)
def _append_kv_op(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    _append_impl(key, value, key_cache, value_cache, slot_mapping)


@_append_kv_op.register_fake
def _(key, value, key_cache, value_cache, slot_mapping):
    return None


_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8,
                 torch.float8_e4m3fn, torch.float8_e5m2) if hasattr(torch, "float8_e4m3fn") else (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8)


def _plain_args(key, value, key_cache, value_cache, slot_mapping) -> bool:
    """The common case in a few attribute reads (every condition implies what ``_check_args`` checks):
    plain tensors on one device, the usual layouts and dtypes, nothing else to report."""
    T = torch.Tensor
    if not (type(key) is T and type(value) is T and type(key_cache) is T and type(value_cache) is T
            and type(slot_mapping) is T) or torch.compiler.is_compiling():
        return False
    shape = key_cache.shape
    return (len(shape) == 4 and value_cache.shape == shape and key.dim() == 3 and key.shape == value.shape
            and key.shape[1] == shape[2] and key.shape[2] == shape[3] and slot_mapping.dim() == 1
            and slot_mapping.shape[0] == key.shape[0] and slot_mapping.dtype in (torch.int64, torch.int32)
            and key_cache.dtype == value_cache.dtype and key_cache.dtype in _CACHE_DTYPES
            and key.dtype in _CACHE_DTYPES and value.dtype in _CACHE_DTYPES
            and key_cache.stride(-1) == 1 and value_cache.stride(-1) == 1 and key.stride(-1) == 1
            and value.stride(-1) == 1 and key_cache.numel() > 0
            and key_cache.data_ptr() != value_cache.data_ptr()
            and (dev := key_cache.device) == value_cache.device and key.device == dev and value.device == dev
            and slot_mapping.device == dev)


def _check_args(key, value, key_cache, value_cache, slot_mapping) -> None:
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
    plain = _plain_args(key, value, key_cache, value_cache, slot_mapping)
    if not plain:
        _check_args(key, value, key_cache, value_cache, slot_mapping)       # raises the precise error
    num_blocks, block_size = key_cache.shape[0], key_cache.shape[1]
    padded = None
    n = slot_mapping.shape[0]
    cpu = key_cache.device.type == "cpu"
    if n and (cpu and plain or values_checkable(slot_mapping)):
        # One host read: negative slots are padding, the rest must lie in the cache.
        if n <= 256 and cpu:
            vals = slot_mapping.tolist()
            lo, hi = min(vals), max(vals)
        else:
            (slots,) = host_values(slot_mapping)
            lo, hi = int(slots.min()), int(slots.max())
        if hi >= num_blocks * block_size:
            raise IndexError(f"slot_mapping values must be in [0, {num_blocks * block_size}), got {hi}")
        padded = lo < 0
    if plain and cpu and not use_triton(key_cache):                        # the PyTorch path, inline
        _append_reference(key, value, key_cache, value_cache, slot_mapping, padded)
    elif _append_kv_op.eager(key):
        _append_kv_op.direct(key, value, key_cache, value_cache, slot_mapping, padded)
    else:
        _append_kv_op(key, value, key_cache, value_cache, slot_mapping)
