"""``PagedAttentionPlan``: plan a batch's attention once per step, run it once per layer.

A serving engine or a model loop calls attention once per layer with the same batch metadata. In the
spirit of FlashInfer's ``BatchPrefillWithPagedKVCacheWrapper`` / ``BatchDecodeWithPagedKVCacheWrapper``,
``plan(block_tables, seq_lens, cu_seqlens_q, ...)`` does, once per step, everything that depends only on
the metadata: validation (index values included, vectorised, on the host), the device copies of the
metadata (one host-to-device copy), the choice of kernels and of the split-KV factor, and the output and
scratch buffers. ``run(q, key_cache, value_cache)`` then checks only what it can see without reading
values (shapes, dtypes, devices of ``q`` and the caches against the plan) and launches.

Batches (``cu_seqlens_q`` in vLLM's convention: chunk ``b`` is ``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]``):

* ``cu_seqlens_q=None``: decode, one query per sequence (``q [batch, hq, d]``): the decode kernel.
* every chunk one token: the decode kernel (``q`` rows are the sequences).
* no chunk of one token: the prefill kernel over the whole batch, exactly as ``paged_prefill_attention``.
* mixed (some sequences decoding, some prefilling): two launches over one packed ``q``. The one-token
  chunks go to the decode kernel, which reads and writes their rows of ``q``/``out``/``lse`` through a
  row index: it packs a GQA group's query heads into one tile and splits long contexts (split-KV), where
  the prefill kernel would give each of them a query tile sized for the batch's longer chunks (up to
  128 rows for ``group`` live ones) and no split. The other chunks go to the prefill kernel, whose tiles
  are then sized for them. Empty chunks produce no rows and launch nothing.

Each part computes exactly what the functional op computes on the same sub-batch
(``paged_decode_attention`` on the one-token chunks, ``paged_prefill_attention`` on the others): same
kernels, same launch configuration, bit-identical results.

Where the Triton kernels do not run (CPU tensors without the interpreter, ``backend("reference")``), run
takes the vectorised PyTorch path of the functional ops, with the plan's addressing precomputed.

Host cost and CUDA graphs: on CUDA ``run`` allocates nothing, reads no device value and has no branch on
data; its launches bypass Triton's per-call argument binding after the first run
(``_launch.KernelLauncher``). It can be captured in a CUDA graph (run it once before capturing, so the
kernels are compiled). A later ``plan`` whose batch has the same shape signature (rows of each part,
block-table width, heads, dtype, scale, window) writes the new metadata into the same device buffers, so
a captured graph replays the new batch; any other ``plan`` allocates new buffers (capture again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..checks import check_int
from . import reference as _ref
from ._backend import use_triton
from ._common import (as_index, check_index, check_table_values, host_values, unit_last_stride,
                      values_checkable)
from .attention import (_MAX_SPLITS, DecodeLaunch, check_attention_shape, check_scale_window, decode_reference)
from .prefill import PrefillLaunch, check_cu_values, prefill_reference

__all__ = ["PagedAttentionPlan"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class _Part:
    """One launch of a plan: the decode or the prefill kernel over some of the batch's sequences."""

    kind: str                                # "decode" or "prefill"
    batch: int                               # sequences in this part
    num_rows: int                            # query rows in this part
    block_tables: torch.Tensor               # [batch, max_blocks] on the device (views of the plan's buffer)
    seq_lens: torch.Tensor                   # [batch]
    cu_seqlens_q: torch.Tensor | None        # [batch + 1], prefill parts only (packs this part's chunks)
    rows: torch.Tensor | None                # [num_rows] int64 rows of q/out/lse (None: all, in order)
    q_index: torch.Tensor | None             # what the kernel takes: decode q_rows / prefill q_start
    launch: DecodeLaunch | PrefillLaunch | None = None
    pieces: list | None = None               # reference-path addressing, built on first use
    rows_packed: torch.Tensor | None = None  # int32 view of rows in the plan's metadata buffer


@dataclass
class _State:
    mode: str                                # "decode", "prefill", "mixed" or "empty"
    batch: int
    num_rows: int
    q_shape: tuple
    cache_shape: tuple
    dtype: torch.dtype
    device: torch.device
    scale: float
    window: int
    num_splits: int | None
    return_lse: bool
    out: torch.Tensor
    lse: torch.Tensor
    parts: list = field(default_factory=list)
    meta: torch.Tensor | None = None         # every index tensor of every part, one int32 buffer
    signature: tuple = ()


@dataclass
class _PlanArgs:
    """``plan``'s arguments, validated: the attention shape and the batch's tables (host copies where read)."""

    hq: int
    d: int
    cache_shape: tuple                       # (num_blocks, block_size, num_kv_heads, head_dim)
    dtype: torch.dtype
    device: torch.device
    scale: float
    window: int
    num_splits: int | None
    return_lse: bool
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    batch: int
    max_blocks: int
    bt_h: np.ndarray | None                  # host values of block_tables / seq_lens (None: not read)
    sl_h: np.ndarray | None
    cu_h: np.ndarray | None                  # int64 host values of cu_seqlens_q (None: decode)


@dataclass
class _PartLayout:
    """One part's index arrays before they reach the device."""

    kind: str
    batch: int
    num_rows: int
    arrays: list                             # block_tables, seq_lens, [cu_seqlens_q], [q_index], [rows]
    has_rows: bool
    has_q_index: bool

    @property
    def signature(self) -> tuple:
        return (self.kind, self.batch, self.num_rows, tuple(tuple(a.shape) for a in self.arrays), self.has_rows)


class PagedAttentionPlan:
    """Attention over a paged K/V cache, planned once per batch and run once per layer.

    Example (runs on a CPU)::

        plan = PagedAttentionPlan()
        plan.plan(block_tables, seq_lens, cu_seqlens_q, num_q_heads=32, num_kv_heads=8, head_dim=128,
                  block_size=16, num_blocks=kc.shape[0], dtype=torch.bfloat16, device="cuda")
        for layer in range(num_layers):
            out = plan.run(q[layer], key_cache[layer], value_cache[layer])   # [total_q, 32, 128]

    ``run`` returns the plan's own output buffer, overwritten by the next ``run`` (or ``plan``) of the
    same plan: use it (or copy it) before the next layer, or pass ``out=`` (and ``lse=``) to write
    elsewhere. A plan is not thread-safe; use one per thread (or per CUDA stream).

    Methods: :meth:`plan`, :meth:`run`; :attr:`mode`, :attr:`num_rows` and :meth:`describe` say what was
    planned.
    """

    def __init__(self):
        self._state: _State | None = None

    # ------------------------------------------------------------------------------------------------
    # plan
    # ------------------------------------------------------------------------------------------------

    def plan(self, block_tables, seq_lens, cu_seqlens_q=None, *, num_q_heads: int, num_kv_heads: int,
             head_dim: int, block_size: int, num_blocks: int, dtype: torch.dtype, device=None, scale=None,
             sliding_window=None, return_lse: bool = False, num_splits=None) -> "PagedAttentionPlan":
        """Validate the batch and prepare its launches. Returns ``self``.

        Args:
            block_tables: int32 ``[batch, max_blocks]`` (int64 accepted), on the host (preferred: the
                values are checked and copied with no device sync) or already on ``device``.
            seq_lens: int32 ``[batch]`` (int64 accepted), keys per sequence: cached prefix plus chunk.
                Same placement rules as ``block_tables``.
            cu_seqlens_q: None (decode: one query per sequence, ``q [batch, hq, d]``) or int32/int64
                ``[batch + 1]`` on the host (its values choose the launches and the buffer sizes, as
                FlashInfer's ``qo_indptr``): non-decreasing from 0, every chunk no longer than its
                sequence; ``q [cu_seqlens_q[-1], hq, d]``.
            num_q_heads, num_kv_heads, head_dim, block_size: the model's attention shape (``head_dim`` a
                power of two in [16, 256], ``block_size`` a power of two in [1, 256], ``num_q_heads`` a
                multiple of ``num_kv_heads``, at most 128 times it).
            num_blocks: blocks in each layer's cache (``key_cache.shape[0]``); block ids are checked
                against it and ``run`` accepts caches of exactly ``[num_blocks, block_size,
                num_kv_heads, head_dim]``.
            dtype: q's and the caches' dtype (float16, bfloat16, float32).
            device: where ``run`` runs (default: ``block_tables``' device).
            scale: softmax scale in ``(0, MAX_SCALE]``, default ``1/sqrt(head_dim)``.
            sliding_window: a query at position ``p`` sees keys ``p - sliding_window < t <= p``.
            return_lse: ``run`` also returns float32 ``[rows, num_q_heads]`` log-sum-exp.
            num_splits: force the decode kernel's split-KV factor (default: the heuristic's choice,
                made here).

        Values (block ids in ``[0, num_blocks)``, lengths within the table, ``cu_seqlens_q``) are
        checked once here, vectorised: always for host tensors, for device tensors only under
        ``debug_checks()`` (one device-to-host copy). Bad input raises ValueError/IndexError naming the
        argument, and leaves the previous plan in place, unchanged.
        """
        args = _check_plan_args(block_tables, seq_lens, cu_seqlens_q, num_q_heads=num_q_heads,
                                num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
                                num_blocks=num_blocks, dtype=dtype, device=device, scale=scale,
                                sliding_window=sliding_window, return_lse=return_lse, num_splits=num_splits)
        # Everything validated: build the new state (the old one stays until the swap at the end).
        mode, num_rows, parts_spec = _choose_kernels(args.cu_h, args.batch)
        layouts = [_part_layout(args, kind, seqs, starts, num_rows) for kind, seqs, starts in parts_spec]
        q_shape = (num_rows, args.hq, args.d)
        signature = (mode, args.batch, args.max_blocks, q_shape, args.cache_shape, args.dtype, args.device,
                     args.scale, args.window, args.num_splits, args.return_lse,
                     tuple(lay.signature for lay in layouts))
        flat = [a for lay in layouts for a in lay.arrays]
        if self._refill(signature, flat, args.device):
            return self
        self._state = _new_state(args, mode, num_rows, q_shape, signature, layouts, flat)
        return self

    def _refill(self, signature, flat, device) -> bool:
        """Write the new metadata into the current plan's buffers when the shapes are the same (captured
        CUDA graphs stay valid); False when a new state is needed."""
        old = self._state
        if old is None or old.signature != signature or old.meta is None or not flat:
            return False
        old.meta.copy_(_pack(flat, device))
        for p in old.parts:
            p.pieces = None
            if p.rows is not None:
                p.rows.copy_(p.rows_packed)
        return True

    # ------------------------------------------------------------------------------------------------
    # run
    # ------------------------------------------------------------------------------------------------

    def run(self, q, key_cache, value_cache, *, out=None, lse=None):
        """Attention of ``q`` over one layer's caches, as planned.

        Args:
            q: ``[rows, num_q_heads, head_dim]`` in the planned dtype on the planned device (``rows`` =
                batch for a decode plan, ``cu_seqlens_q[-1]`` otherwise), last dimension contiguous.
            key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` as planned, any
                stride on the block dimension, contiguous last dimension. The chunks' own K/V must
                already be in the pages (``append_kv``).
            out: optional ``[rows, num_q_heads, head_dim]`` contiguous tensor to write instead of the
                plan's buffer; lse: likewise, float32 ``[rows, num_q_heads]`` (only with ``return_lse``).

        Returns ``out``, or ``(out, lse)`` when planned with ``return_lse``: valid until this plan's next
        ``run`` or ``plan``, which may overwrite them (on the kernel path they are the plan's own buffers;
        the PyTorch path may return new tensors). Pass ``out=``/``lse=`` to keep results across layers.
        Under ``torch.compile`` the registered ops run instead of the planned launches (same kernels and
        results) and the outputs are new tensors.
        """
        st = self._state
        if st is None:
            raise RuntimeError("PagedAttentionPlan.run() before plan()")
        self._check_run(st, q, key_cache, value_cache, out, lse)
        if torch.compiler.is_compiling():
            o, l = _run_ops(st, q, key_cache, value_cache)
            return (o, l) if st.return_lse else o
        if st.parts:
            if q.stride(-1) != 1 and q.shape[-1] > 1:
                q = q.contiguous()
            if st.parts[0].launch is not None and use_triton(q):
                out = st.out if out is None else out
                lse = st.lse if lse is None else lse
                for p in st.parts:
                    p.launch.launch(q, key_cache, value_cache, out, lse)
            else:
                out, lse = _run_reference(st, q, key_cache, value_cache, out, lse)
        else:
            out = st.out if out is None else out
            lse = st.lse if lse is None else lse
        return (out, lse) if st.return_lse else out

    @staticmethod
    def _check_run(st, q, key_cache, value_cache, out, lse):
        for name, t in (("q", q), ("key_cache", key_cache), ("value_cache", value_cache)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != st.dtype:
                raise ValueError(f"{name} dtype {t.dtype} must be the planned dtype {st.dtype}")
            if t.device != st.device:
                raise ValueError(f"{name} is on {t.device} but the plan is for {st.device}")
        if tuple(q.shape) != st.q_shape:
            raise ValueError(f"q must have the planned shape [rows, num_q_heads, head_dim] = {list(st.q_shape)}, "
                             f"got {list(q.shape)}")
        for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
            if tuple(t.shape) != st.cache_shape:
                raise ValueError(f"{name} must have the planned shape [num_blocks, block_size, num_kv_heads, "
                                 f"head_dim] = {list(st.cache_shape)}, got {list(t.shape)}")
            if not unit_last_stride(t):
                raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {t.stride()}")
        if out is not None:
            if (not isinstance(out, torch.Tensor) or tuple(out.shape) != st.q_shape or out.dtype != st.dtype
                    or out.device != st.device or not out.is_contiguous()):
                raise ValueError(f"out must be a contiguous {st.dtype} tensor of shape {list(st.q_shape)} on "
                                 f"{st.device}")
        if lse is not None:
            if not st.return_lse:
                raise ValueError("lse= needs a plan made with return_lse=True")
            if (not isinstance(lse, torch.Tensor) or tuple(lse.shape) != st.q_shape[:2]
                    or lse.dtype != torch.float32 or lse.device != st.device or not lse.is_contiguous()):
                raise ValueError(f"lse must be a contiguous float32 tensor of shape {list(st.q_shape[:2])} on "
                                 f"{st.device}")

    # ------------------------------------------------------------------------------------------------
    # introspection
    # ------------------------------------------------------------------------------------------------

    @property
    def mode(self) -> str | None:
        """"decode", "prefill", "mixed" or "empty" (None before the first plan)."""
        return None if self._state is None else self._state.mode

    @property
    def num_rows(self) -> int:
        """Query rows ``run`` takes: batch for a decode plan, ``cu_seqlens_q[-1]`` otherwise."""
        return self._state.num_rows

    def describe(self) -> list[dict]:
        """One dict per launch: kernel, sequences, rows and (on the kernel path) launch configuration."""
        st = self._state
        res = []
        for p in st.parts or []:
            info = {"kernel": p.kind, "sequences": p.batch, "rows": p.num_rows, "row_index": p.rows is not None}
            if p.launch is not None and getattr(p.launch, "cfg", None) is not None:
                info["config"] = p.launch.cfg
            res.append(info)
        return res


def _check_plan_args(block_tables, seq_lens, cu_seqlens_q, *, num_q_heads, num_kv_heads, head_dim, block_size,
                     num_blocks, dtype, device, scale, sliding_window, return_lse, num_splits) -> _PlanArgs:
    """Every check ``plan`` makes, before anything changes: the attention shape, the tables (their values
    too where they can be read), then ``cu_seqlens_q``."""
    hq, hkv, d, bs, nb = _check_attention_args(num_q_heads, num_kv_heads, head_dim, block_size, num_blocks,
                                               dtype, scale, sliding_window, num_splits)
    block_tables, seq_lens, dev = _check_tables(block_tables, seq_lens, device)
    batch, max_blocks = block_tables.shape
    bt_h, sl_h = _read_tables(block_tables, seq_lens)
    if bt_h is not None and batch:
        check_table_values(bt_h, sl_h, block_size=bs, num_blocks=nb)
    cu_h = None if cu_seqlens_q is None else _check_cu_seqlens(cu_seqlens_q, batch, sl_h)
    return _PlanArgs(hq=hq, d=d, cache_shape=(nb, bs, hkv, d), dtype=dtype, device=dev,
                     scale=float(1.0 / math.sqrt(d) if scale is None else scale),
                     window=0 if sliding_window is None else int(sliding_window), num_splits=num_splits,
                     return_lse=bool(return_lse), block_tables=block_tables, seq_lens=seq_lens, batch=batch,
                     max_blocks=max_blocks, bt_h=bt_h, sl_h=sl_h, cu_h=cu_h)


def _check_attention_args(num_q_heads, num_kv_heads, head_dim, block_size, num_blocks, dtype, scale,
                          sliding_window, num_splits):
    """The model's attention shape, dtype, scale, window and split factor; returns ``(hq, hkv, d, bs, nb)``."""
    hq = check_int("num_q_heads", num_q_heads, 1)
    hkv = check_int("num_kv_heads", num_kv_heads, 1)
    d = check_int("head_dim", head_dim, 1)
    bs = check_int("block_size", block_size, 1)
    nb = check_int("num_blocks", num_blocks, 0)
    check_attention_shape(hq, hkv, d, bs)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of float16, bfloat16, float32, got {dtype!r}")
    check_scale_window(scale, sliding_window)
    check_int("num_splits", num_splits, 1, _MAX_SPLITS, allow_none=True,
              allowed=f"an int in [1, {_MAX_SPLITS}] or None")
    return hq, hkv, d, bs, nb


def _check_tables(block_tables, seq_lens, device):
    """``block_tables`` and ``seq_lens`` as index tensors of matching batch, on the host or on the plan's
    device; returns them and that device."""
    block_tables, seq_lens = as_index(block_tables), as_index(seq_lens)
    check_index("block_tables", block_tables, ndim=2)
    check_index("seq_lens", seq_lens, ndim=1)
    dev = block_tables.device if device is None else torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens)):
        if t.device.type != "cpu" and t.device != dev:
            raise ValueError(f"{name} must be on the host or on {dev}, got {t.device}")
    batch = block_tables.shape[0]
    if seq_lens.shape[0] != batch:
        raise ValueError(f"seq_lens must have shape [batch] = [{batch}] (block_tables rows), "
                         f"got {tuple(seq_lens.shape)}")
    return block_tables, seq_lens, dev


def _check_cu_seqlens(cu_seqlens_q, batch, sl_h) -> np.ndarray:
    """``cu_seqlens_q``'s values as int64 host array, checked against the lengths where they were read."""
    cu_seqlens_q = as_index(cu_seqlens_q)
    check_index("cu_seqlens_q", cu_seqlens_q, ndim=1)
    if cu_seqlens_q.device.type != "cpu":
        raise ValueError(f"cu_seqlens_q must be a host (CPU) tensor: plan reads its values to choose the "
                         f"launches and size the buffers (as FlashInfer's qo_indptr); got "
                         f"{cu_seqlens_q.device}")
    if cu_seqlens_q.shape[0] != batch + 1:
        raise ValueError(f"cu_seqlens_q must have shape [batch + 1] = [{batch + 1}] (block_tables rows + "
                         f"1), got {tuple(cu_seqlens_q.shape)}")
    (cu_h,) = host_values(cu_seqlens_q)
    cu_h = cu_h.astype(np.int64)
    check_cu_values(cu_h, sl_h.astype(np.int64) if sl_h is not None else None, int(cu_h[-1]))
    return cu_h


def _choose_kernels(cu_h, batch):
    """``(mode, num_rows, parts)``: each part a ``(kind, sequences, q start rows or None)`` launch."""
    if cu_h is None:
        return ("decode" if batch else "empty"), batch, ([("decode", np.arange(batch), None)] if batch else [])
    num_rows = int(cu_h[-1])
    qlen = cu_h[1:] - cu_h[:-1]
    one = np.flatnonzero(qlen == 1)
    many = np.flatnonzero(qlen > 1)
    if num_rows == 0:
        return "empty", num_rows, []
    if many.size == 0:
        return "decode", num_rows, [("decode", one, cu_h[one])]
    if one.size == 0:
        return "prefill", num_rows, [("prefill", np.arange(batch), None)]
    return "mixed", num_rows, [("decode", one, cu_h[one]), ("prefill", many, cu_h[many])]


def _part_layout(args: _PlanArgs, kind, seqs, starts, num_rows) -> _PartLayout:
    """One part's index arrays: its block tables and lengths, then (prefill) its ``cu_seqlens_q``, then
    ``q_index`` (what the kernel needs to find its rows; absent: rows 0.. of the part) and ``rows`` (its
    rows of q/out/lse for the PyTorch path and torch.compile; absent: all of them, in order)."""
    whole = seqs.shape[0] == args.batch
    arrays = list(_part_tables(args, seqs, whole))
    if kind == "prefill":
        cu_p, rows, q_index = _prefill_rows(args.cu_h, seqs, starts, whole)
        arrays.append(cu_p)
        n_rows = int(cu_p[-1])
    else:
        n_rows = seqs.shape[0]
        rows, q_index = _decode_rows(starts, n_rows, num_rows)
    if q_index is not None:
        arrays.append(q_index)
    if rows is not None:
        arrays.append(rows)
    return _PartLayout(kind, seqs.shape[0], n_rows, arrays, rows is not None, q_index is not None)


def _part_tables(args: _PlanArgs, seqs, whole):
    """The part's block-table rows and lengths: host arrays, or device tensors whose values are never read."""
    if args.bt_h is not None:
        return (args.bt_h, args.sl_h) if whole else (args.bt_h[seqs], args.sl_h[seqs])
    if whole:
        return args.block_tables, args.seq_lens
    idx = _to_device(seqs, args.device)
    return args.block_tables.index_select(0, idx), args.seq_lens.index_select(0, idx)


def _prefill_rows(cu_h, seqs, starts, whole):
    """A prefill part's ``(cu_seqlens_q, rows, q_start)``, its chunks packed in order."""
    if whole:
        return cu_h, None, None
    ql = (cu_h[1:] - cu_h[:-1])[seqs]
    cu_p = np.concatenate([[0], np.cumsum(ql)])
    rows = np.repeat(starts - cu_p[:-1], ql) + np.arange(int(cu_p[-1]))
    q_index = None if (starts == cu_p[:-1]).all() else starts
    return cu_p, rows, q_index


def _decode_rows(starts, n_rows, num_rows):
    """A decode part's ``(rows, q_rows)``: None where its rows are the plan's rows 0.. in order."""
    identity = starts is None or (starts == np.arange(n_rows)).all()
    rows = None if identity and n_rows == num_rows else (np.arange(n_rows) if starts is None else starts)
    return rows, (None if identity else starts)


def _new_state(args: _PlanArgs, mode, num_rows, q_shape, signature, layouts, flat) -> _State:
    """Fresh device buffers for the plan: one metadata buffer (viewed by every part), ``out`` and ``lse``,
    and each part's kernel launch where the Triton kernels run."""
    dev = args.device
    meta = _pack(flat, dev) if flat else None
    views = iter(_views(meta, flat) if flat else [])
    out = torch.empty(q_shape, dtype=args.dtype, device=dev)
    lse = torch.empty((num_rows, args.hq), dtype=torch.float32, device=dev)
    state = _State(mode, args.batch, num_rows, q_shape, args.cache_shape, args.dtype, dev, args.scale,
                   args.window, args.num_splits, args.return_lse, out, lse, [], meta, signature)
    probe = torch.empty(0, device=dev)
    for lay in layouts:
        bt_v, sl_v = next(views), next(views)
        cu_v = next(views) if lay.kind == "prefill" else None
        qi_v = next(views) if lay.has_q_index else None
        rows_v = next(views) if lay.has_rows else None
        part = _Part(lay.kind, lay.batch, lay.num_rows, bt_v, sl_v, cu_v, None if rows_v is None else rows_v.long(),
                     qi_v, rows_packed=rows_v)
        if use_triton(probe):
            part.launch = _make_launch(state, part)
        state.parts.append(part)
    return state


def _read_tables(block_tables, seq_lens):
    """Host arrays of the tables and lengths where reading them needs no device sync (host tensors) or
    debug checks allow one; ``(None, None)`` otherwise (the plan then works on the device copies)."""
    on_host = block_tables.device.type == "cpu" and seq_lens.device.type == "cpu"
    if on_host or values_checkable(block_tables, seq_lens):
        bt, sl = host_values(block_tables, seq_lens)
        return bt, sl
    return None, None


def _to_device(a: np.ndarray, device) -> torch.Tensor:
    """A host array on ``device`` with no device sync: staged through pinned memory for CUDA (a copy from
    pageable memory may wait for the stream), so the copy is queued behind the work already queued."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _pack(arrays, device) -> torch.Tensor:
    """All index arrays in one int32 buffer on ``device``: one host-to-device copy when they are host arrays."""
    if all(isinstance(a, np.ndarray) for a in arrays):
        return _to_device(np.concatenate([np.asarray(a).reshape(-1).astype(np.int32) for a in arrays]), device)
    parts = [(_to_device(np.asarray(a, dtype=np.int32), device) if isinstance(a, np.ndarray) else a)
             .reshape(-1).to(device=device, dtype=torch.int32) for a in arrays]
    return torch.cat(parts)


def _views(buf, arrays):
    res, start = [], 0
    for a in arrays:
        n = int(np.prod(a.shape))
        res.append(buf[start:start + n].view(tuple(a.shape)))
        start += n
    return res


def _make_launch(st: _State, p: _Part):
    nb, bs, hkv, d = st.cache_shape
    hq = st.q_shape[1]
    common = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=bs, dtype=st.dtype, device=st.device,
                  block_tables=p.block_tables, seq_lens=p.seq_lens, scale=st.scale, window=st.window,
                  out=st.out, lse=st.lse)
    if p.kind == "decode":
        return DecodeLaunch(batch=p.batch, num_splits=st.num_splits, q_rows=p.q_index, **common)
    return PrefillLaunch(total_q=p.num_rows, cu_seqlens_q=p.cu_seqlens_q, q_start=p.q_index,
                         out_rows=st.num_rows, **common)


def _run_reference(st: _State, q, key_cache, value_cache, out, lse):
    """The PyTorch path. A one-part plan without ``out=`` returns the computed tensors themselves (no
    copy into the plan's buffers: they too are valid until the next run, as the contract says)."""
    if len(st.parts) == 1 and st.parts[0].rows is None and out is None and lse is None:
        p = st.parts[0]
        if p.pieces is not None and len(p.pieces) == 1 and p.pieces[0].out_src is None:
            # What decode_reference / prefill_reference do with these pieces, without their call layers.
            o, l, _ = _ref._attend(p.pieces[0], q, key_cache, value_cache, st.scale, False)
            return o, l
        return _reference_part(st, p, q, key_cache, value_cache)
    out = st.out if out is None else out
    lse = st.lse if lse is None else lse
    for p in st.parts:
        o, l = _reference_part(st, p, q, key_cache, value_cache)
        if p.rows is None:
            out.copy_(o)
            lse.copy_(l)
        else:
            out.index_copy_(0, p.rows, o)
            lse.index_copy_(0, p.rows, l)
    return out, lse


def _reference_part(st: _State, p: _Part, q, key_cache, value_cache):
    qp = q if p.rows is None else q.index_select(0, p.rows)
    if p.pieces is None:
        p.pieces = _ref.attention_pieces(p.block_tables, p.seq_lens, p.cu_seqlens_q, total_q=p.num_rows,
                                         num_q_heads=st.q_shape[1], block_size=st.cache_shape[1],
                                         num_blocks=st.cache_shape[0], sliding_window=st.window or None,
                                         device=st.device)
    if p.kind == "decode":
        o, l, _ = decode_reference(qp, key_cache, value_cache, p.block_tables, p.seq_lens, st.scale, st.window,
                                   False, pieces=p.pieces)
        return o, l
    return prefill_reference(qp, key_cache, value_cache, p.block_tables, p.seq_lens, p.cu_seqlens_q, st.scale,
                             st.window, pieces=p.pieces)


def _run_ops(st: _State, q, key_cache, value_cache):
    """The registered ops on each part (torch.compile traces these): new output tensors."""
    out = lse = None
    for p in st.parts:
        qp = q if p.rows is None else q.index_select(0, p.rows)
        if p.kind == "decode":
            o, l, _ = torch.ops.kvtriton.paged_decode_attention(qp, key_cache, value_cache, p.block_tables,
                                                                p.seq_lens, st.scale, st.window, False,
                                                                st.num_splits or 0)
        else:
            o, l = torch.ops.kvtriton.paged_prefill_attention(qp, key_cache, value_cache, p.block_tables,
                                                              p.seq_lens, p.cu_seqlens_q, st.scale, st.window)
        if p.rows is None:
            out, lse = o, l
        else:
            if out is None:
                out = q.new_zeros(st.q_shape)
                lse = q.new_zeros(st.q_shape[:2], dtype=torch.float32)
            out = out.index_copy(0, p.rows, o)
            lse = lse.index_copy(0, p.rows, l)
    if out is None:
        out = q.new_zeros(st.q_shape)
        lse = q.new_full(st.q_shape[:2], float("-inf"), dtype=torch.float32)
    return out, lse
