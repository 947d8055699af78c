"""Paged decode attention (flash-decoding over a paged K/V cache) in Triton.

One query token per sequence attends to its sequence's K/V, read block by block through the block table.
Design, for a memory-bound op on Hopper-class GPUs:

* one program per (sequence, KV head, split): all ``num_q_heads // num_kv_heads`` query heads of a GQA
  group are processed together, so each K/V byte is read from memory exactly once;
* each loop iteration loads a tile of ``BLOCK_N`` tokens that spans ``BLOCK_N // block_size`` pages
  (wide, well-pipelined loads instead of one small page at a time), scores it with ``tl.dot`` and
  accumulates in float32, with ``log2(e)`` folded into the softmax scale so the softmax uses ``exp2``;
* split-KV: when ``batch * num_kv_heads`` programs would not fill the GPU, each sequence's context is cut
  into ``num_splits`` equal runs of tiles; a second, tiny kernel merges the partial ``(max, sum, acc)``
  triples and writes the output, the log-sum-exp and (optionally) the per-block attention mass;
* per-block attention mass needs the final log-sum-exp: the first pass stores, per logical block, the
  probability mass relative to the running max in force when its tile was scored, together with that
  max; the merge kernel rescales it with ``exp2(max - lse)``. No second read of K.

Block offsets are computed in int64 (``block_id * block_stride`` passes 2^31 in large arenas). The launch
heuristics live in :func:`decode_launch_config` so they can be tuned in one place.

One code path: :class:`DecodeLaunch` prepares a launch (config, buffers, launchers) and launches it; the
functional op builds one per call, :class:`~kvtriton.ops.PagedAttentionPlan` one per plan. Where the
kernels do not run (CPU tensors without Triton's interpreter, ``backend("reference")``) both take
:func:`decode_reference`: the vectorised PyTorch path of ``reference.attention_pieces``, in float32 with
the kernels' rules for masking and non-finite scores.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..checks import check_int, check_number
from . import reference as _ref
from ._backend import HAS_TRITON, use_triton
from ._common import (as_index, check_block_tables, check_cache, check_same_device, check_tensor, custom_op,
                      device_guard, unit_last_stride)
from ._launch import KernelLauncher

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - platforms without triton run the reference only
    triton = None
    tl = None

__all__ = ["paged_decode_attention", "decode_launch_config", "DecodeLaunchConfig", "DecodeLaunch", "MAX_SCALE"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
_MAX_SPLITS = 128
# Largest accepted softmax scale. Real models use 1/sqrt(head_dim) or thereabouts (<= ~1); at 1e4 no
# float16 input can overflow a float32 score (|q.k| <= 256 * 65504^2 ~ 1.1e12, times 1e4 * log2(e)).
MAX_SCALE = 1e4


# ----------------------------------------------------------------------------------------------------
# Launch heuristics
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecodeLaunchConfig:
    """Tile sizes and split count of one ``paged_decode_attention`` launch."""

    num_splits: int     # context partitions per (sequence, KV head); 1 = no merge pass
    block_n: int        # tokens per loop iteration (a multiple of block_size)
    group_pad: int      # query heads per program, padded to a tl.dot-friendly size
    num_warps: int
    num_stages: int


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def decode_launch_config(batch: int, num_kv_heads: int, group: int, head_dim: int, block_size: int,
                         max_context: int, elem_size: int, num_sms: int,
                         num_splits: int | None = None) -> DecodeLaunchConfig:
    """Choose tile sizes and the split-KV factor (all launch heuristics live here).

    ``max_context`` is an upper bound of the tokens any sequence attends to (``max_blocks * block_size``,
    or the sliding window if smaller), known on the host without a device sync.

    * ``block_n``: 8192 elements of K per tile (64 tokens at head_dim 128, 32 at 256, 128 at 64; half
      that in float32), at least one page, never more than the context needs.
    * ``num_warps``: 4 up to 8192-element 16-bit tiles at head_dim <= 128, else 8. Compiled for sm_90 these
      use ~110 registers per thread and ~39 KiB of shared memory at ``num_stages=2``, so about
      ``ctas_per_sm = 4`` programs (2 with 8 warps) are resident per SM.
    * ``num_stages``: 2 (K/V of the next tile in flight while this one is used) when two stages of K
      and V fit in 160 KiB of shared memory, else 1.
    * ``num_splits``: with ``P = batch * num_kv_heads`` programs and ``slots = num_sms * ctas_per_sm``
      resident ones, a batch that does not fill the slots has its context cut into ``floor(slots / P)``
      splits, so that all programs are resident in a single wave (no tail) and each streams one long
      contiguous run; every split keeps at least 2 tiles. A batch of more than one wave (``P > slots``)
      is cut into up to 3 splits of at least 12 tiles each: shorter programs even out the last,
      partial wave. Measured on an H200 (bf16, 32/8 heads, head_dim 128, block 16, graph-replayed):
      unsplit, batch 96 x 4096 tokens ran at 80% of the best split count's speed and batch 128 x 4096
      at 92%; 3 splits were within 1.5% of the best at batch 96, 128, 192 x 4096, and a context of 1024
      tokens (16 tiles) was best unsplit.
    """
    tile_elems = 8192 if elem_size <= 2 else 4096
    block_n = max(16, min(256, tile_elems // head_dim))
    block_n = max(block_n, block_size)
    block_n = min(block_n, max(16, block_size, _next_pow2(max_context)))
    group_pad = max(16, _next_pow2(group))                   # tl.dot needs M >= 16
    num_warps = 4 if (block_n * head_dim <= 8192 and head_dim <= 128 and elem_size <= 2) else 8
    tile_bytes = 2 * block_n * head_dim * elem_size          # one K and one V tile
    num_stages = 2 if 2 * tile_bytes <= 160 * 1024 else 1
    if num_splits is None:
        ctas_per_sm = 4 if num_warps == 4 else 2
        slots = max(1, num_sms) * ctas_per_sm
        programs = max(1, batch * num_kv_heads)
        tiles = max(1, -(-max_context // block_n))
        if programs > slots:
            num_splits = max(1, min(3, tiles // 12))
        else:
            num_splits = max(1, min(slots // programs, tiles // 2, _MAX_SPLITS))
    return DecodeLaunchConfig(int(num_splits), block_n, group_pad, num_warps, num_stages)


def _empty(shape, dtype, device):
    """Allocation of every output and scratch buffer (one place, so tests can poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # the interpreter: small, so heuristics still exercise split-KV on long contexts


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _decode_partial_kernel(
        Q, K, V, BT, SL,
        O, LSE,                      # final outputs (written when not SPLIT)
        PM, PL, PACC,                # partials [batch, num_q_heads, num_splits] (+ [.., head_dim])
        MASS, MREF,                  # per-block partial mass and its reference max [batch, hq, max_blocks]
        QROW,                        # [batch] row of q / out / lse of each sequence (when HAS_QROW)
        stride_qb, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh,
        stride_btb,
        num_kv_heads, max_blocks, num_splits, window, num_blocks,
        scale_log2,
        GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr, WRITE_MASS: tl.constexpr, F32_DOT: tl.constexpr, FAST_LOG2: tl.constexpr,
        HAS_QROW: tl.constexpr,
    ):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // num_kv_heads
        kvh = pid % num_kv_heads
        num_q_heads = num_kv_heads * GROUP
        # A plan's decode sequences inside a mixed batch read and write their own rows of the packed
        # q / out / lse; partials and block mass stay indexed by b.
        if HAS_QROW:
            qrow = tl.load(QROW + b).to(tl.int64)
        else:
            qrow = b.to(tl.int64)

        n = tl.load(SL + b).to(tl.int32)                 # int32 token arithmetic, even for int64 lengths
        n = tl.minimum(n, max_blocks * BLOCK_SIZE)       # never read past the block-table row
        n = tl.maximum(n, 0)
        start = tl.where(window > 0, tl.maximum(n - window, 0), 0)
        # Tiles are aligned to BLOCK_N in absolute token positions, so every page lies in exactly one
        # tile (block_n is a multiple of block_size) and hence in exactly one split.
        first_tile = start // BLOCK_N
        last_tile = (n + BLOCK_N - 1) // BLOCK_N
        tiles_per_split = (last_tile - first_tile + num_splits - 1) // num_splits
        lo = first_tile + split * tiles_per_split
        hi = tl.minimum(lo + tiles_per_split, last_tile)

        g = tl.arange(0, G_PAD)
        d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        head = kvh * GROUP + g
        g_mask = g < GROUP
        q = tl.load(Q + qrow * stride_qb + head[:, None] * stride_qh + d[None, :],
                    mask=g_mask[:, None], other=0.0)

        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, HEAD_DIM], tl.float32)
        bt_row = BT + b.to(tl.int64) * stride_btb
        k_head = kvh.to(tl.int64) * stride_kh
        v_head = kvh.to(tl.int64) * stride_vh
        for tile in range(lo, hi):
            t = tile * BLOCK_N + offs_n
            valid = (t >= start) & (t < n)
            logical = t // BLOCK_SIZE
            phys = tl.load(bt_row + logical, mask=t < n, other=0).to(tl.int64)
            slot = (t % BLOCK_SIZE).to(tl.int64)
            # Block ids out of range are not followed (on CUDA they are checked only under
            # debug_checks(), and a bad id must not become a read outside the cache): such a token
            # reads K = V = 0.
            kv_ok = valid & (phys >= 0) & (phys < num_blocks)
            k = tl.load(K + (phys * stride_kb + slot * stride_kt + k_head)[:, None] + d[None, :],
                        mask=kv_ok[:, None], other=0.0)
            if F32_DOT:
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * scale_log2
            # Non-finite scores poison their row (out and lse NaN, see paged_decode_attention): NaN and
            # +inf do by themselves (through p = exp2(s - m)); -inf would pass for a masked token.
            s = tl.where(s == float("-inf"), float("nan"), s)
            s = tl.where(valid[None, :], s, float("-inf"))
            # Finite (or NaN/+inf, which poison l_i and acc): every visited tile has a valid token.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + (phys * stride_vb + slot * stride_vt + v_head)[:, None] + d[None, :],
                        mask=kv_ok[:, None], other=0.0)
            if F32_DOT:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
            if WRITE_MASS:
                # Mass of each page of this tile relative to m_new; merged later with exp2(m_new - lse).
                # Underflow here only drops pages whose true mass is below float32's range anyway.
                rel = logical - tile * (BLOCK_N // BLOCK_SIZE)
                row = (b * num_q_heads + head).to(tl.int64) * max_blocks
                for j in tl.static_range(BLOCK_N // BLOCK_SIZE):
                    blk = tile * (BLOCK_N // BLOCK_SIZE) + j
                    pj = tl.sum(tl.where(rel[None, :] == j, p, 0.0), 1)
                    # A tensor comparison: some interpreter versions reject a Python bool in a mask.
                    wmask = g_mask & ((g * 0 + blk) < max_blocks)
                    tl.store(MASS + row + blk, pj, mask=wmask)
                    tl.store(MREF + row + blk, m_new, mask=wmask)

        bh = (b * num_q_heads + head).to(tl.int64)
        if SPLIT:
            ps = bh * num_splits + split
            tl.store(PM + ps, m_i, mask=g_mask)
            tl.store(PL + ps, l_i, mask=g_mask)
            tl.store(PACC + ps[:, None] * HEAD_DIM + d[None, :], acc, mask=g_mask[:, None])
        else:
            # l == 0: no token attended (out 0, lse -inf). A NaN l (a non-finite score) is not "empty"
            # and stays NaN through 1/l and log2(l).
            empty = l_i == 0
            inv = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
            out = acc * inv[:, None]
            orow = qrow * num_q_heads + head
            tl.store(O + orow[:, None] * HEAD_DIM + d[None, :], out.to(O.dtype.element_ty),
                     mask=g_mask[:, None])
            l_safe = tl.where(empty, 1.0, l_i)
            if FAST_LOG2:
                # libdevice's log2 here costs ~50 registers across the whole loop (sm_90: 158 vs 96),
                # which drops occupancy from 4 to 3 programs per SM; lg2.approx is accurate to ~2^-22.
                log2_l = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [l_safe],
                                                   dtype=tl.float32, is_pure=True, pack=1)
            else:
                log2_l = tl.log2(l_safe)
            lse = tl.where(empty, float("-inf"), (m_i + log2_l) * 0.6931471805599453)
            tl.store(LSE + orow, lse, mask=g_mask)

    @triton.jit
    def _decode_merge_kernel(
        SL, PM, PL, PACC, O, LSE, MASS, MREF, QROW,
        num_q_heads, num_splits, max_blocks, window,
        HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_B: tl.constexpr, WRITE_MASS: tl.constexpr, HAS_QROW: tl.constexpr,
    ):
        b = tl.program_id(0)
        bh = b.to(tl.int64) * num_q_heads + tl.program_id(1)
        if HAS_QROW:
            orow = tl.load(QROW + b).to(tl.int64) * num_q_heads + tl.program_id(1)
        else:
            orow = bh
        d = tl.arange(0, HEAD_DIM)
        sp = tl.arange(0, SPLITS_PAD)
        base = bh * num_splits
        m_all = tl.load(PM + base + sp, mask=sp < num_splits, other=float("-inf"))
        l_all = tl.load(PL + base + sp, mask=sp < num_splits, other=0.0)
        m = tl.max(m_all, 0)
        m_safe = tl.where(m > float("-inf"), m, 0.0)      # every split empty (or m NaN): 0
        w_all = tl.where(m_all > float("-inf"), tl.exp2(m_all - m_safe), 0.0)
        # A split that met a non-finite score has l = NaN, and NaN * w is NaN even for w = 0, so l
        # is NaN then; l == 0 means every split was empty: zeros and lse = -inf.
        l = tl.sum(l_all * w_all, 0)
        empty = l == 0
        acc = tl.zeros([HEAD_DIM], tl.float32)
        for s in range(num_splits):
            ms = tl.load(PM + base + s)
            w = tl.where(ms > float("-inf"), tl.exp2(ms - m_safe), 0.0)
            acc += w * tl.load(PACC + (base + s) * HEAD_DIM + d)
        inv = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l))
        tl.store(O + orow * HEAD_DIM + d, (acc * inv).to(O.dtype.element_ty))
        lse2 = tl.where(empty, float("-inf"), m_safe + tl.log2(tl.where(empty, 1.0, l)))
        tl.store(LSE + orow, lse2 * 0.6931471805599453)

        if WRITE_MASS:
            n = tl.load(SL + b).to(tl.int32)
            n = tl.maximum(tl.minimum(n, max_blocks * BLOCK_SIZE), 0)
            start = tl.where(window > 0, tl.maximum(n - window, 0), 0)
            blk_lo = start // BLOCK_SIZE
            blk_hi = tl.where(n > start, (n + BLOCK_SIZE - 1) // BLOCK_SIZE, blk_lo)
            row = bh * max_blocks
            for c in range(0, max_blocks, BLOCK_B):
                blk = c + tl.arange(0, BLOCK_B)
                live = (blk >= blk_lo) & (blk < blk_hi)
                pm = tl.load(MASS + row + blk, mask=live, other=0.0)
                mr = tl.load(MREF + row + blk, mask=live, other=0.0)
                val = tl.where(live, pm * tl.exp2(mr - tl.where(empty, 0.0, lse2)), 0.0)
                tl.store(MASS + row + blk, val, mask=blk < max_blocks)


class DecodeLaunch:
    """One decode-attention launch prepared up to ``q`` and the caches: launch config (split-KV),
    output and scratch buffers, index tensors, and the kernel launchers.

    The functional op builds one per call; :class:`~kvtriton.ops.PagedAttentionPlan` builds one per plan
    and calls :meth:`launch` once per layer (then only the per-call arguments change, and launches skip
    Triton's argument binding: :class:`~kvtriton.ops._launch.KernelLauncher`).

    ``q_rows`` (int32/int64 ``[batch]``, optional): the row of ``q``, ``out`` and ``lse`` that sequence
    ``b`` reads and writes (a plan's decode sequences inside a packed mixed batch); ``out``/``lse`` are
    then the whole packed buffers. Without it row ``b`` is sequence ``b``. Block mass needs no ``q_rows``.
    """

    def __init__(self, *, batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 scale: float, window: int = 0, want_mass: bool = False, num_splits: int | None = None,
                 out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                 q_rows: torch.Tensor | None = None):
        hq, hkv, d = num_q_heads, num_kv_heads, head_dim
        group = hq // hkv
        max_blocks = block_tables.shape[1]
        max_context = max_blocks * block_size
        if window > 0:
            max_context = min(max_context, window + block_size)
        elem = dtype.itemsize
        cfg = decode_launch_config(batch, hkv, group, d, block_size, max_context, elem, _device_sms(device),
                                   num_splits)
        self.cfg = cfg
        self.out = _empty((batch, hq, d), dtype, device) if out is None else out
        self.lse = _empty((batch, hq), torch.float32, device) if lse is None else lse
        self.mass = _empty((batch, hq, max_blocks if want_mass else 0), torch.float32, device)
        self.partial = self.merge = None
        if batch == 0 or hq == 0:
            return
        split = cfg.num_splits > 1 or want_mass
        if split:
            pm = _empty((batch, hq, cfg.num_splits), torch.float32, device)
            pl = _empty((batch, hq, cfg.num_splits), torch.float32, device)
            pacc = _empty((batch, hq, cfg.num_splits, d), torch.float32, device)
        else:
            pm = pl = pacc = self.lse  # unused placeholders
        mref = _empty(self.mass.shape, torch.float32, device) if want_mass else self.lse
        mass_arg = self.mass if want_mass else self.lse
        has_qrow = q_rows is not None
        qrow = q_rows if has_qrow else seq_lens
        self.partial = KernelLauncher(_decode_partial_kernel, (batch * hkv, cfg.num_splits), dict(
            Q=None, K=None, V=None, BT=block_tables, SL=seq_lens, O=None, LSE=None, PM=pm, PL=pl, PACC=pacc,
            MASS=mass_arg, MREF=mref, QROW=qrow,
            stride_qb=None, stride_qh=None, stride_kb=None, stride_kt=None, stride_kh=None,
            stride_vb=None, stride_vt=None, stride_vh=None, stride_btb=block_tables.stride(0),
            num_kv_heads=hkv, max_blocks=max_blocks, num_splits=cfg.num_splits, window=window,
            num_blocks=None, scale_log2=float(scale) * _LOG2E,
            GROUP=group, G_PAD=cfg.group_pad, HEAD_DIM=d, BLOCK_SIZE=block_size, BLOCK_N=cfg.block_n,
            SPLIT=split, WRITE_MASS=want_mass,
            # float32 needs IEEE products (TF32 would miss 1e-5); the interpreter's 16-bit dot is unreliable.
            F32_DOT=dtype == torch.float32 or device.type == "cpu",
            FAST_LOG2=device.type == "cuda" and torch.version.hip is None, HAS_QROW=has_qrow),
            _PARTIAL_SLOTS, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        if split:
            self.merge = KernelLauncher(_decode_merge_kernel, (batch, hq), dict(
                SL=seq_lens, PM=pm, PL=pl, PACC=pacc, O=None, LSE=None, MASS=mass_arg, MREF=mref, QROW=qrow,
                num_q_heads=hq, num_splits=cfg.num_splits, max_blocks=max_blocks, window=window,
                HEAD_DIM=d, SPLITS_PAD=max(2, _next_pow2(cfg.num_splits)), BLOCK_SIZE=block_size,
                BLOCK_B=128, WRITE_MASS=want_mass, HAS_QROW=has_qrow),
                ("O", "LSE"), dict(num_warps=4 if d >= 128 else 2))

    def launch(self, q, key_cache, value_cache, out=None, lse=None) -> None:
        """Launch on ``q`` and one layer's caches, writing ``out``/``lse`` (default: this launch's own
        buffers). Shapes, dtypes and devices must be those it was prepared for (not checked here)."""
        if self.partial is None:
            return
        out = self.out if out is None else out
        lse = self.lse if lse is None else lse
        with device_guard(q):
            self.partial(q, key_cache, value_cache, out, lse, q.stride(0), q.stride(1),
                         key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
                         value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), key_cache.shape[0])
            if self.merge is not None:
                self.merge(out, lse)


_PARTIAL_SLOTS = ("Q", "K", "V", "O", "LSE", "stride_qb", "stride_qh", "stride_kb", "stride_kt", "stride_kh",
                  "stride_vb", "stride_vt", "stride_vh", "num_blocks")


def decode_reference(q, key_cache, value_cache, block_tables, seq_lens, scale: float, window: int,
                     want_mass: bool, pieces=None):
    """The vectorised PyTorch path (``reference.attention_pieces``), float32 like the kernels: ``(out,
    lse, mass)`` as the registered op returns them. ``pieces``: a plan's precomputed addressing."""
    batch, hq, _ = q.shape
    if pieces is None:
        pieces = _ref.attention_pieces(block_tables, seq_lens, None, total_q=batch, num_q_heads=hq,
                                       block_size=key_cache.shape[1], num_blocks=key_cache.shape[0],
                                       sliding_window=window or None, device=q.device)
    out, lse, mass = _ref.attention_pieces_run(pieces, q, key_cache, value_cache, total_q=batch, scale=scale,
                                               block_mass_width=block_tables.shape[1] if want_mass else None)
    if mass is None:
        mass = lse.new_empty((batch, hq, 0))
    return out, lse, mass


# ----------------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------------

@custom_op("paged_decode_attention", mutates_args=())
def _paged_decode_attention_op(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                               sliding_window: int, return_block_mass: bool,
                               num_splits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    window = int(sliding_window)
    # Called directly (torch.ops.kvtriton.*, opcheck, torch.compile) nothing has been normalised: the
    # kernel needs unit last strides on q, the caches, the block table and the lengths.
    block_tables, seq_lens = as_index(block_tables), as_index(seq_lens)
    if not unit_last_stride(q):
        q = q.contiguous()
    if use_triton(q) and unit_last_stride(key_cache) and unit_last_stride(value_cache):
        batch, hq, d = q.shape
        st = DecodeLaunch(batch=batch, num_q_heads=hq, num_kv_heads=key_cache.shape[2], head_dim=d,
                          block_size=key_cache.shape[1], dtype=q.dtype, device=q.device,
                          block_tables=block_tables, seq_lens=seq_lens, scale=scale, window=window,
                          want_mass=return_block_mass, num_splits=num_splits if num_splits > 0 else None)
        st.launch(q, key_cache, value_cache)
        return st.out, st.lse, st.mass
    return decode_reference(q, key_cache, value_cache, block_tables, seq_lens, scale, window, return_block_mass)
@_paged_decode_attention_op.register_fake
def _(q, key_cache, value_cache, block_tables, seq_lens, scale, sliding_window, return_block_mass,
      num_splits):
    batch, hq, d = q.shape
    mb = block_tables.shape[1] if return_block_mass else 0
    return (q.new_empty((batch, hq, d)),
            q.new_empty((batch, hq), dtype=torch.float32),
            q.new_empty((batch, hq, mb), dtype=torch.float32))


# ----------------------------------------------------------------------------------------------------
# Validation and the public entry point
# ----------------------------------------------------------------------------------------------------

def check_attention_shape(num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int) -> None:
    """ValueError unless the head counts, head_dim and block_size are ones the kernels take."""
    hq, hkv, d, bs = num_q_heads, num_kv_heads, head_dim, block_size
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two in [16, 256] (e.g. 64, 128, 256), got {d}")
    if bs < 1 or bs > 256 or bs & (bs - 1):
        raise ValueError(f"block_size (key_cache.shape[1]) must be a power of two in [1, 256], got {bs}")
    if hkv < 1 or hq < 1 or hq % hkv:
        raise ValueError(f"num_q_heads ({hq}) must be a positive multiple of num_kv_heads ({hkv})")
    if hq // hkv > 128:
        raise ValueError(f"num_q_heads // num_kv_heads must be at most 128, got {hq // hkv}")


def check_scale_window(scale, sliding_window) -> None:
    """ValueError unless ``scale`` is None or a float in ``(0, MAX_SCALE]`` and ``sliding_window`` None or
    an int >= 1."""
    check_number("scale", scale, positive=True, high=MAX_SCALE, allow_none=True,
                 allowed=f"a float in (0, {MAX_SCALE:g}] (or None for 1/sqrt(head_dim))")
    check_int("sliding_window", sliding_window, 1, allow_none=True, allowed="an int >= 1 or None")


def check_qkv(q, key_cache, value_cache, **index_tensors) -> tuple[int, int, int, int]:
    """Metadata checks shared by the attention ops: q ``[rows, num_q_heads, head_dim]`` float16/bfloat16/
    float32, both caches ``[num_blocks, block_size, num_kv_heads, head_dim]`` in q's dtype with a
    contiguous last dimension, everything (``index_tensors`` too) on one device. Returns
    ``(num_blocks, block_size, num_kv_heads, head_dim)``."""
    check_tensor("q", q, ndim=3, dtypes=_DTYPES)
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        check_cache(name, t)
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} must equal q dtype {q.dtype}")
    if value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache shape {tuple(value_cache.shape)} must equal key_cache shape "
                         f"{tuple(key_cache.shape)}")
    check_same_device(q=q, key_cache=key_cache, value_cache=value_cache, **index_tensors)
    num_blocks, block_size, hkv, dk = key_cache.shape
    if dk != q.shape[2]:
        raise ValueError(f"q head_dim {q.shape[2]} must equal the cache head_dim {dk}")
    check_attention_shape(q.shape[1], hkv, dk, block_size)
    return num_blocks, block_size, hkv, dk


def _validate(q, key_cache, value_cache, block_tables, seq_lens, scale, sliding_window, num_splits):
    num_blocks, block_size, _, _ = check_qkv(q, key_cache, value_cache, block_tables=block_tables,
                                             seq_lens=seq_lens)
    batch = q.shape[0]
    if block_tables.dim() == 2 and block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [batch={batch}, max_blocks], got shape {tuple(block_tables.shape)}")
    check_scale_window(scale, sliding_window)
    if num_splits is not None:
        check_int("num_splits", num_splits, 1, _MAX_SPLITS, allowed=f"an int in [1, {_MAX_SPLITS}] or None")
    # Shapes and dtypes always; index values where that needs no device sync (CPU, or debug checks).
    check_block_tables(block_tables, seq_lens, block_size=block_size, num_blocks=num_blocks, device=q.device)


def paged_decode_attention(q, key_cache, value_cache, block_tables, seq_lens, *, scale=None,
                           sliding_window=None, return_lse=False, return_block_mass=False,
                           num_splits=None):
    """Decode attention of one query token per sequence over a paged K/V cache.

    Args:
        q: ``[batch, num_q_heads, head_dim]`` float16/bfloat16/float32.
        key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, q's dtype, any
            stride on the block dimension (e.g. views into an arena), contiguous last dimension.
        block_tables: int32 ``[batch, max_blocks]`` (int64 accepted), physical block of each logical
            block; entries past a sequence's length are never read.
        seq_lens: int32 ``[batch]`` (int64 accepted), tokens per sequence (0 gives a zero output and lse = -inf).
        scale: softmax scale, default ``1/sqrt(head_dim)``.
        sliding_window: attend only to the last ``sliding_window`` tokens.
        return_lse: also return float32 ``[batch, num_q_heads]`` natural-log log-sum-exp of the scores.
        return_block_mass: also return float32 ``[batch, num_q_heads, max_blocks]``, the softmax
            probability summed over each logical block's tokens.
        num_splits: force the split-KV factor (default: chosen by :func:`decode_launch_config`).

    Returns ``out`` ``[batch, num_q_heads, head_dim]`` in q's dtype, or ``(out, lse?, block_mass?)``.

    Non-finite values. Scores ``q.k * scale`` are formed in float32; ``scale`` must lie in
    ``(0, MAX_SCALE]`` (1e4; ValueError otherwise). If any score a query head attends to is not finite
    (NaN or +-inf in ``q`` or in an attended key, or ``q.k`` or ``q.k * scale * log2(e)`` beyond float32's
    range), that head's ``out`` and ``lse`` are NaN, and so is its ``block_mass`` on the blocks it
    attends to; other heads and sequences are unaffected. Both paths (kernel and reference) follow this
    rule, with no host sync. NaN or inf in an attended value ``v`` propagates into ``out`` as IEEE
    arithmetic gives. Nothing here turns a NaN into a number or into ``lse = -inf`` (which means "no
    token attended").
    """
    block_tables, seq_lens = as_index(block_tables), as_index(seq_lens)
    _validate(q, key_cache, value_cache, block_tables, seq_lens, scale, sliding_window, num_splits)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if not unit_last_stride(q):
        q = q.contiguous()
    out, lse, mass = _paged_decode_attention_op(
        q, key_cache, value_cache, block_tables, seq_lens, float(scale),
        0 if sliding_window is None else int(sliding_window), bool(return_block_mass),
        0 if num_splits is None else int(num_splits))
    extra = []
    if return_lse:
        extra.append(lse)
    if return_block_mass:
        extra.append(mass)
    return (out, *extra) if extra else out
