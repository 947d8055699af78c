"""Input validation and ``torch.library`` registration shared by every op in ``kvtriton.ops``.

Every public op validates its arguments with these helpers before it touches memory, so that bad input
raises a ``ValueError`` (wrong shape, dtype, device or layout) or an ``IndexError`` (an id or length out
of range) that names the argument, and leaves every tensor as it was.

Metadata checks (shapes, dtypes, devices, strides) are free and always run. Checks that read index
values run only where they need no device sync: always for CPU tensors, for CUDA tensors only under
``debug_checks()`` / ``KVTRITON_DEBUG=1``, and never while ``torch.compile`` traces (the values are not
known then). ``values_checkable(t)`` says which case applies. Value checks read the values once, on the
host (``host_values``: numpy views of CPU tensors, one device-to-host copy for CUDA ones), and raise only
after a vectorised pass over them.

Stable API (other op modules import these):

- ``check_tensor(name, t, *, ndim=None, dtypes=None, device=None)``
- ``check_cache(name, t, *, ndim=4)``: a cache tensor whose last dimension is contiguous.
- ``check_kv_cache(key_cache, value_cache)`` -> ``(num_blocks, block_size, num_kv_heads, head_dim)``
- ``check_index(name, t, dtypes=INDEX_DTYPES, *, ndim=1, device=None)``
- ``as_index(t)``: ``t`` in the layout the kernels address (unit stride on the last dimension); a
  contiguous copy only when it is not. Every op applies it to every index argument at its public entry
  (before the value checks, so checks and kernel read the same tensor) and again in its registered op.
- ``unit_last_stride(t)`` -> bool
- ``check_same_device(**tensors)``
- ``values_checkable(*tensors)`` -> bool
- ``host_values(*tensors)`` -> numpy arrays of their values (one sync at most).
- ``check_range(name, t, low, high)``: ``low <= t < high`` (IndexError), when ``values_checkable``.
- ``check_block_tables(block_tables, seq_lens, *, block_size, num_blocks, device)``
- ``check_table_values(bt, sl, *, block_size, num_blocks)``: the same value checks on host arrays.
- ``custom_op(name, *, mutates_args)``: ``torch.library.custom_op`` in the ``kvtriton`` namespace, as a
  ``KVOp`` (eager calls on plain CPU and CUDA tensors skip the dispatcher).
- ``block_layout(shape, *strides)``: collapse a per-block layout to ``[rows, cols]`` for the copy kernels.
- ``needs_i64_heads(H, D, *tensors)``: whether ``head * stride(-2) + d`` can pass 2^31 in any tensor.
- ``device_guard(t)``: context making ``t``'s CUDA device current while a kernel launches.
- ``next_pow2(n)``
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import numpy as np
import torch

try:
    from torch._subclasses.fake_tensor import is_fake as _torch_is_fake
except Exception:  # pragma: no cover - private API moved
    _torch_is_fake = None

from ._backend import debug_checks

NAMESPACE = "kvtriton"
INDEX_DTYPES = (torch.int32, torch.int64)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes: Sequence[torch.dtype] | None = None,
                 device: torch.device | None = None) -> None:
    """Raise ValueError unless ``t`` is a tensor with ``ndim`` dims, a dtype in ``dtypes``, on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in ({_dtype_names(dtypes)}), got {t.dtype}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} must be on {device} (like the cache), got {t.device}")


def check_cache(name: str, t, *, ndim: int | None = 4) -> None:
    """A cache tensor: ``ndim`` dims (any number if None), last dimension contiguous (stride 1)."""
    check_tensor(name, t, ndim=ndim)
    if t.dim() < 1:
        raise ValueError(f"{name} must have a leading block dimension, got a 0-d tensor")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {t.stride()}")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} has unsupported dtype {t.dtype}")


def check_kv_cache(key_cache, value_cache) -> tuple[int, int, int, int]:
    """Check a layer's K and V caches ``[num_blocks, block_size, num_kv_heads, head_dim]``.

    Both 4-D, same shape, dtype and device, last dimension contiguous, any other strides; they must not
    be the same memory (ops that write both would race). Returns the four sizes.
    """
    check_cache("key_cache", key_cache)
    check_cache("value_cache", value_cache)
    if key_cache.shape != value_cache.shape:
        raise ValueError(f"value_cache shape {tuple(value_cache.shape)} must equal key_cache shape "
                         f"{tuple(key_cache.shape)}")
    if key_cache.dtype != value_cache.dtype:
        raise ValueError(f"value_cache dtype {value_cache.dtype} must equal key_cache dtype {key_cache.dtype}")
    check_same_device(key_cache=key_cache, value_cache=value_cache)
    if (key_cache.numel() and not torch.compiler.is_compiling() and not _is_fake(key_cache)
            and key_cache.data_ptr() == value_cache.data_ptr()):
        raise ValueError("key_cache and value_cache must be different memory, got the same data pointer")
    return tuple(key_cache.shape)  # type: ignore[return-value]


def check_index(name: str, t, dtypes: Sequence[torch.dtype] = INDEX_DTYPES, *, ndim: int | None = 1,
                device: torch.device | None = None) -> None:
    """An index tensor: integer dtype in ``dtypes`` (int32/int64 by default), ``ndim`` dims."""
    check_tensor(name, t, ndim=ndim, dtypes=dtypes, device=device)


def unit_last_stride(t: torch.Tensor) -> bool:
    """Whether consecutive elements of ``t``'s last dimension are consecutive in memory."""
    return t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1


def as_index(t):
    """``t`` itself when its last dimension has unit stride, else ``t.contiguous()``.

    The kernels read an index tensor (slot mapping, block ids, lengths: 1-D) as ``ptr + i``, and a
    block table's row as ``ptr + row * stride(0) + j``: a view with any other last-dimension stride
    (``t[::2]``, a column of a matrix, ``x.t()`` of a ``[max_blocks, batch]`` tensor, an expanded
    tensor) would be read as different values. Offset views (``t[1:]``) and padded rows keep their
    layout: the kernels take the data pointer and the row stride. Non-tensors pass through (the checks
    that follow name them).
    """
    if isinstance(t, torch.Tensor) and not unit_last_stride(t):
        return t.contiguous()
    return t


def check_same_device(**tensors) -> None:
    """Raise ValueError unless every given tensor is on the same device (names them in the message)."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    if not items:
        return
    first_name, first = items[0]
    for k, v in items[1:]:
        if v.device != first.device:
            raise ValueError(f"{k} is on {v.device} but {first_name} is on {first.device}; "
                             f"all tensors must be on one device")


def _is_fake(t) -> bool:
    if type(t) is torch.Tensor or _torch_is_fake is None:   # a FakeTensor is a subclass
        return False
    try:
        return bool(_torch_is_fake(t))
    except Exception:  # pragma: no cover
        return False


def values_checkable(*tensors) -> bool:
    """Whether checks that read index values may run: no tracing, and CPU tensors or debug checks on."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if t is None:
            continue
        dev = t.device.type
        if dev == "meta" or _is_fake(t):
            return False
        if dev != "cpu" and not debug_checks():
            return False
    return True


def host_values(*tensors) -> list[np.ndarray]:
    """The values of integer tensors as numpy arrays, in their shapes: zero-copy views of CPU tensors;
    CUDA tensors are flattened into one int64 buffer and read back with a single copy (one sync)."""
    if all(t.device.type == "cpu" for t in tensors):
        return [t.numpy() for t in tensors]
    flat = torch.cat([t.reshape(-1).to(torch.int64) for t in tensors]).cpu().numpy()
    out, start = [], 0
    for t in tensors:
        n = t.numel()
        out.append(flat[start:start + n].reshape(tuple(t.shape)))
        start += n
    return out


def _out_of_range(name: str, vals: np.ndarray, low: int, high: int) -> None:
    if vals.size:
        lo, hi = int(vals.min()), int(vals.max())
        if lo < low or hi >= high:
            raise IndexError(f"{name} values must be in [{low}, {high}), got {lo if lo < low else hi}")


def check_range(name: str, t, low: int, high: int, *, mask=None) -> None:
    """Raise IndexError unless every value of ``t`` (where ``mask``) lies in ``[low, high)``.

    Runs only when ``values_checkable(t)``; a no-op otherwise. One host read of the values.
    """
    if t.numel() == 0 or not values_checkable(t):
        return
    if mask is None:
        (vals,) = host_values(t)
    else:
        vals, m = host_values(t, mask.to(torch.int64) if mask.device.type != "cpu" else mask)
        vals = vals[m.astype(bool, copy=False)]
    _out_of_range(name, vals, low, high)


def check_table_values(bt: np.ndarray, sl: np.ndarray, *, block_size: int, num_blocks: int) -> None:
    """The value checks of :func:`check_block_tables`, on host arrays ``bt [batch, max_blocks]`` and
    ``sl [batch]``: one vectorised pass, IndexError naming the argument and the allowed range."""
    max_blocks = bt.shape[1]
    _out_of_range("seq_lens", sl, 0, max_blocks * block_size + 1)
    if not bt.size or (bt.min() >= 0 and bt.max() < num_blocks):
        return                                  # every entry in range, padding included
    used = (sl.astype(np.int64) + block_size - 1) // block_size
    in_use = np.arange(max_blocks)[None, :] < used[:, None]
    if in_use.any():
        info = np.iinfo(bt.dtype)
        lo = int(np.min(bt, where=in_use, initial=info.max))
        hi = int(np.max(bt, where=in_use, initial=info.min))
        if lo < 0 or hi >= num_blocks:
            raise IndexError(f"block_tables values must be in [0, {num_blocks}), got {lo if lo < 0 else hi}")


def check_block_tables(block_tables, seq_lens, *, block_size: int, num_blocks: int, device) -> tuple[int, int]:
    """Check ``block_tables`` int32/int64 ``[batch, max_blocks]`` and ``seq_lens`` int32/int64 ``[batch]``.

    Shapes and dtypes always; when ``values_checkable``: ``0 <= seq_lens <= max_blocks * block_size`` and
    every block id a sequence uses (the first ``ceil(seq_len / block_size)`` of its row) in
    ``[0, num_blocks)``. Entries past a sequence's length are padding and may hold anything.
    Returns ``(batch, max_blocks)``.
    """
    check_index("block_tables", block_tables, ndim=2, device=device)
    check_index("seq_lens", seq_lens, ndim=1, device=device)
    batch, max_blocks = block_tables.shape
    if seq_lens.shape[0] != batch:
        raise ValueError(f"seq_lens must have shape [batch] = [{batch}] (block_tables rows), "
                         f"got {tuple(seq_lens.shape)}")
    if batch and values_checkable(block_tables, seq_lens):
        bt, sl = host_values(block_tables, seq_lens)
        check_table_values(bt, sl, block_size=block_size, num_blocks=num_blocks)
    return batch, max_blocks


_DIRECT_DEVICES = ("cuda", "cpu")


def _modes_active() -> bool:
    try:
        return torch._C._len_torch_dispatch_stack() > 0 or torch._C._is_torch_function_mode_enabled()
    except AttributeError:  # pragma: no cover - private API moved: always dispatch
        return True


class KVOp:
    """A registered ``kvtriton::<name>`` op that eager calls on plain tensors reach without the dispatcher.

    Calling it with a plain (not a subclass) CUDA or CPU tensor first, outside ``torch.compile`` and
    with no Python dispatch or function mode active, runs the implementation directly: the ops are
    launch-bound at small sizes, and the dispatcher's Python round trip (15-20 us a call on a CPU) costs
    more than a kernel launch. Every other call (fake or meta tensors, tracing, tensor subclasses,
    dispatch modes) goes through ``torch.ops.kvtriton.<name>``, so ``opcheck``, ``torch.compile``,
    fake-tensor propagation and dispatch modes see the registered op. ``register_fake`` and ``op`` are
    the registered op's; ``direct(*args, **kw)`` calls the implementation (the public functions pass it
    what their validation learned).
    """

    def __init__(self, op, fn):
        self.op = op
        self._fn = fn
        self.register_fake = op.register_fake

    def eager(self, first) -> bool:
        """Whether a call whose first argument is ``first`` may skip the dispatcher: a plain CPU/CUDA
        tensor, no tracing, and no Python dispatch or function mode that expects to see the op."""
        return (type(first) is torch.Tensor and first.device.type in _DIRECT_DEVICES
                and not torch.compiler.is_compiling() and not _modes_active())

    def direct(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __call__(self, *args):
        if self.eager(args[0]):
            return self._fn(*args)
        return self.op(*args)


def custom_op(name: str, *, mutates_args: tuple[str, ...] | str, impl=None):
    """Decorator: register ``fn`` as ``torch.library.custom_op`` ``kvtriton::<name>`` for every device;
    returns a :class:`KVOp` whose direct calls run ``impl`` (default ``fn``; an ``impl`` may take extra
    keyword arguments that the registered op does not)."""
    def wrap(fn):
        return KVOp(torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=mutates_args)(fn),
                    impl if impl is not None else fn)
    return wrap


def block_layout(shape: Sequence[int], *strides: Sequence[int]) -> tuple[int, int, list[int]] | None:
    """Collapse the per-block dims (``shape``, one stride list per tensor) to ``[rows, cols]``.

    Dims are merged where they are contiguous with each other in every tensor, so a block that is one
    dense run of memory becomes ``rows == 1``. Returns ``(rows, cols, [row_stride of each tensor])`` when
    the result has at most two dims and a unit stride on the last, else None (the caller then takes the
    PyTorch path). Size-1 dims are ignored.
    """
    dims = [(s, [st[i] for st in strides]) for i, s in enumerate(shape) if s != 1]
    if not dims:
        return 1, 1, [0] * len(strides)
    merged: list[tuple[int, list[int]]] = [dims[-1]]
    for size, st in reversed(dims[:-1]):
        in_size, in_st = merged[0]
        if all(a == b * in_size for a, b in zip(st, in_st)):
            merged[0] = (size * in_size, in_st)
        else:
            merged.insert(0, (size, st))
    if len(merged) > 2 or any(s != 1 for s in merged[-1][1]):
        return None
    if len(merged) == 1:
        return 1, merged[0][0], [0] * len(strides)
    return merged[0][0], merged[1][0], list(merged[0][1])


def needs_i64_heads(num_heads: int, head_dim: int, *tensors: torch.Tensor) -> bool:
    """Whether a within-token offset ``head * t.stride(-2) + d`` can pass 2^31 in one of ``tensors``
    (``[..., num_heads, head_dim]``; e.g. a cache stored heads-outermost and permuted to NHD)."""
    return any((num_heads - 1) * abs(t.stride(-2)) + head_dim >= 2**31 for t in tensors)


def device_guard(t: torch.Tensor):
    """Make ``t``'s CUDA device current (Triton launches on the current device); no-op elsewhere and
    when it already is."""
    dev = t.device
    if dev.type != "cuda" or dev.index is None or dev.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(dev)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
