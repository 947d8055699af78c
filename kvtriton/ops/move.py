"""``move_blocks`` (compaction) and ``copy_blocks`` (copy-on-write): copy whole blocks ``src[i] -> dst[i]``
within one cache, all layers, K and V, in one launch.

Every pair is copied by independent programs with no ordering between them, which is only correct when
no block is read after it has been written. The allowed plans (``check_move_plan``) are exactly those:

- ``dst`` ids are distinct;
- no id is the destination of one pair and the source of another;
- a pair with ``src[i] == dst[i]`` is a no-op (skipped, so its id may also be another pair's source).

A source may feed several destinations (copy-on-write fan-out).
"""

from __future__ import annotations

import torch

from . import reference
from ._backend import use_triton
from ._common import as_index, check_cache, check_index, custom_op, values_checkable
from .gather import launch_block_copy


def check_move_plan(src: torch.Tensor, dst: torch.Tensor) -> None:
    """Raise ValueError unless ``src -> dst`` is an allowed plan (see the module docstring).

    Reads the ids: a device sync for CUDA tensors.
    """
    s, d = src.long().cpu(), dst.long().cpu()
    uniq, counts = torch.unique(d, return_counts=True)
    if (counts > 1).any():
        dup = int(uniq[counts > 1][0])
        raise ValueError(f"dst ids must be distinct: block {dup} is the destination of "
                         f"{int(counts[counts > 1][0])} pairs")
    real = s != d
    s_r, d_r = s[real], d[real]
    clash = torch.isin(d_r, s_r)
    if clash.any():
        x = int(d_r[clash][0])
        raise ValueError(f"block {x} is the destination of one pair and the source of another; a plan may "
                         f"not read a block after writing it (split it into two calls)")


@custom_op("move_blocks", mutates_args=("cache",))
def _move_blocks_op(cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    src, dst = as_index(src), as_index(dst)
    if use_triton(cache) and launch_block_copy(cache, cache, src, dst, src.shape[0], skip_same=True):
        return
    reference.move_blocks(cache, src, dst)


@_move_blocks_op.register_fake
def _(cache, src, dst):
    return None


def move_blocks(cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, *,
                validate: bool | None = None) -> None:
    """Copy block ``src[i]`` to block ``dst[i]`` of ``cache`` for every i, in place, in one launch.

    cache: any ``[num_blocks, ...]`` tensor with a contiguous last dimension and any block stride, e.g.
    an arena ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`` (all layers, K and V)
    or one layer's ``[num_blocks, block_size, num_kv_heads, head_dim]`` view of it. src, dst: int32/int64
    ``[n]``. The plan must satisfy the overlap rule of this module (ValueError otherwise).

    ``validate``: check ids and the overlap rule. None (default): when that needs no device sync (CPU
    ids, or ``debug_checks()``); True: always (syncs on CUDA); False: never.
    """
    # Normalised before the checks: the plan that is checked is the plan the kernel reads.
    src, dst = as_index(src), as_index(dst)
    check_cache("cache", cache, ndim=None)
    check_index("src", src, device=cache.device)
    check_index("dst", dst, device=cache.device)
    if src.shape != dst.shape:
        raise ValueError(f"dst shape {tuple(dst.shape)} must equal src shape {tuple(src.shape)}")
    if validate is None:
        validate = values_checkable(src, dst)
    if validate and src.numel():
        for name, ids in (("src", src), ("dst", dst)):
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= cache.shape[0]:
                raise IndexError(f"{name} values must be in [0, {cache.shape[0]}), got {lo if lo < 0 else hi}")
        check_move_plan(src, dst)
    _move_blocks_op(cache, src, dst)


def copy_blocks(cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, *,
                validate: bool | None = None) -> None:
    """Copy-on-write: the same op as ``move_blocks`` (same arguments, same overlap rule); a source may
    be copied to several destinations."""
    move_blocks(cache, src, dst, validate=validate)
