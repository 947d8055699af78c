"""Plain-PyTorch references of every op in ``kvtriton.ops``.

They define the semantics the Triton kernels must match, are what tests compare against, and are what
runs on CPU tensors when Triton's interpreter is off. Shapes follow vLLM/FlashInfer (NHD):
``key_cache``/``value_cache`` ``[num_blocks, block_size, num_kv_heads, head_dim]`` with any stride on the
block dimension; ``block_tables`` int32 ``[batch, max_blocks]``; ``seq_lens`` int32 ``[batch]``;
``slot_mapping`` int64 ``[num_tokens]`` (negative = padding).

The per-sequence loops of ``paged_decode_attention`` / ``paged_prefill_attention`` here are the tests'
float64 oracle. What the attention ops run on CPU is ``attention_pieces`` + ``attention_pieces_run`` at
the bottom: the same semantics, vectorised over the batch, in float32 with the kernels' rules.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

import torch


def append_kv(key, value, key_cache, value_cache, slot_mapping) -> None:
    """Write ``key``/``value`` ``[num_tokens, H, D]`` to the cache slots in ``slot_mapping`` (in place)."""
    block_size = key_cache.shape[1]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = key[valid].to(key_cache.dtype)
    value_cache[blocks, offsets] = value[valid].to(value_cache.dtype)


def gather_kv(key_cache, value_cache, block_tables, seq_lens):
    """Pages to contiguous: ``(key [total, H, D], value [total, H, D], cu_seqlens int32 [batch+1])``."""
    block_size = key_cache.shape[1]
    lens = seq_lens.long().tolist()
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32, device=key_cache.device)
    if lens:
        cu[1:] = torch.tensor(lens, device=key_cache.device).cumsum(0).to(torch.int32)
    ks, vs = [], []
    for b, n in enumerate(lens):
        t = torch.arange(n, device=key_cache.device)
        blk = block_tables[b].long()[t // block_size]
        ks.append(key_cache[blk, t % block_size])
        vs.append(value_cache[blk, t % block_size])
    shape = (0, *key_cache.shape[2:])
    key = torch.cat(ks) if ks else key_cache.new_empty(shape)
    value = torch.cat(vs) if vs else value_cache.new_empty(shape)
    return key, value, cu


def gather_blocks(cache, block_ids):
    """Whole blocks by id: ``cache[block_ids]``, shape ``[n, *cache.shape[1:]]``."""
    return cache[block_ids.long()].clone()


def scatter_blocks(cache, block_ids, blocks) -> None:
    """Inverse of ``gather_blocks``: ``cache[block_ids] = blocks`` (in place)."""
    cache[block_ids.long()] = blocks.to(cache.dtype)


def move_blocks(cache, src, dst) -> None:
    """Copy block ``src[i]`` to ``dst[i]`` for every i (in place).

    Allowed plans: ``dst`` ids are distinct, and no id is the destination of one pair and the source of
    another (so no block is read after it has been written); a pair with ``src[i] == dst[i]`` is a no-op.
    """
    if src.numel():
        cache[dst.long()] = cache[src.long()].clone()


def compact_tokens(key_cache, value_cache, block_tables, seq_lens, keep):
    """Pack each sequence's kept tokens (``keep`` bool ``[batch, max_tokens]``) densely into the front of
    its own blocks, in order; return the new lengths (int32 ``[batch]``). Slots past the new length are
    left as they were."""
    block_size = key_cache.shape[1]
    new_lens = torch.zeros_like(seq_lens, dtype=torch.int32)
    for b in range(seq_lens.shape[0]):
        n = int(seq_lens[b])
        t = torch.arange(n, device=key_cache.device)
        kept = t[keep[b, :n].bool()]
        m = kept.numel()
        src_blk = block_tables[b].long()[kept // block_size]
        dst_t = torch.arange(m, device=key_cache.device)
        dst_blk = block_tables[b].long()[dst_t // block_size]
        k = key_cache[src_blk, kept % block_size].clone()
        v = value_cache[src_blk, kept % block_size].clone()
        key_cache[dst_blk, dst_t % block_size] = k
        value_cache[dst_blk, dst_t % block_size] = v
        new_lens[b] = m
    return new_lens


def paged_decode_attention(q, key_cache, value_cache, block_tables, seq_lens, *, scale=None,
                           sliding_window=None, return_lse=False, return_block_mass=False,
                           compute_dtype=torch.float64):
    """Decode attention of one query token per sequence over its paged K/V.

    q ``[batch, num_q_heads, head_dim]``; out has q's shape and dtype. A head with a non-finite score
    (``q.k`` or ``q.k * scale * log2(e)`` not finite in float32) gets NaN out, lse and mass (on the blocks
    it attends to). With ``sliding_window=w`` a
    query attends to the last ``w`` tokens of its sequence. ``lse`` float32 ``[batch, num_q_heads]`` is
    the natural-log log-sum-exp of the scaled scores (-inf for an empty sequence). ``block_mass`` float32
    ``[batch, num_q_heads, max_blocks]`` is the attention probability summed over each logical block's
    tokens (0 outside the sequence or window). Computed in ``compute_dtype`` (float64 by default).
    """
    batch, hq, d = q.shape
    block_size, hkv = key_cache.shape[1], key_cache.shape[2]
    group = hq // hkv
    max_blocks = block_tables.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    out = torch.zeros(batch, hq, d, dtype=compute_dtype, device=q.device)
    lse = torch.full((batch, hq), float("-inf"), dtype=torch.float32, device=q.device)
    mass = torch.zeros(batch, hq, max_blocks, dtype=torch.float32, device=q.device)
    for b in range(batch):
        n = int(seq_lens[b])
        start = 0 if sliding_window is None else max(0, n - int(sliding_window))
        if n - start <= 0:
            continue
        t = torch.arange(start, n, device=q.device)
        blk = block_tables[b].long()[t // block_size]
        k = key_cache[blk, t % block_size].to(compute_dtype)       # [n, hkv, d]
        v = value_cache[blk, t % block_size].to(compute_dtype)
        k = k.repeat_interleave(group, dim=1)                        # [n, hq, d]
        v = v.repeat_interleave(group, dim=1)
        qk = torch.einsum("hd,nhd->hn", q[b].to(compute_dtype), k)
        s = qk * scale
        # The kernels form scores in float32 (scaled by log2(e) for exp2): a head with a score that is
        # not finite there (NaN/inf inputs, or overflow) gets NaN out, lse and block mass.
        bad = ~(torch.isfinite(qk.float()) & torch.isfinite((s * 1.4426950408889634).float())).all(-1)
        s = s.masked_fill(bad[:, None], float("nan"))
        lse[b] = torch.logsumexp(s, dim=-1).float()
        p = torch.softmax(s, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", p, v)
        mass[b].index_add_(1, t // block_size, p.float())
    out = out.to(q.dtype)
    extra = []
    if return_lse:
        extra.append(lse)
    if return_block_mass:
        extra.append(mass)
    return (out, *extra) if extra else out


def paged_prefill_attention(q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, *, scale=None,
                            sliding_window=None, return_lse=False, compute_dtype=torch.float64):
    """Causal attention of packed query chunks over their sequences' paged K/V (chunked prefill).

    q ``[total_q, num_q_heads, head_dim]``, chunk ``b`` is ``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]``; its K/V
    are already in the pages, so ``seq_lens[b]`` counts prefix plus chunk. Query ``i`` of a chunk of ``n``
    tokens sits at position ``p = seq_lens[b] - n + i`` and attends to keys ``t <= p`` (and ``t > p - w``
    with ``sliding_window=w``). out has q's shape and dtype; ``lse`` float32 ``[total_q, num_q_heads]`` is
    the natural-log log-sum-exp of the scaled scores (-inf where a query sees no key, out 0 there). A
    query head with an attended score that is not finite in float32 gets NaN out and lse. Computed in
    ``compute_dtype`` (float64 by default).
    """
    total_q, hq, d = q.shape
    block_size, hkv = key_cache.shape[1], key_cache.shape[2]
    group = hq // hkv if hkv else 0
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    out = torch.zeros(total_q, hq, d, dtype=compute_dtype, device=q.device)
    lse = torch.full((total_q, hq), float("-inf"), dtype=torch.float32, device=q.device)
    cu = cu_seqlens_q.long().tolist()
    for b in range(block_tables.shape[0]):
        q0, q1 = cu[b], cu[b + 1]
        n, length = q1 - q0, int(seq_lens[b])
        if n <= 0 or length <= 0:
            continue
        pos = torch.arange(length - n, length, device=q.device)                    # [n]
        t = torch.arange(length, device=q.device)
        blk = block_tables[b].long()[t // block_size]
        k = key_cache[blk, t % block_size].to(compute_dtype)                         # [L, hkv, d]
        v = value_cache[blk, t % block_size].to(compute_dtype)
        qb = q[q0:q1].to(compute_dtype).reshape(n, hkv, group, d)
        qk = torch.einsum("ikgd,tkd->kgit", qb, k)                                   # [hkv, g, n, L]
        s = qk * scale
        valid = t[None, :] <= pos[:, None]
        if sliding_window is not None:
            valid &= t[None, :] > pos[:, None] - int(sliding_window)
        # As in paged_decode_attention: a query head with an attended score that is not finite in
        # float32 (scaled by log2(e), as the kernels form it) gets NaN out and lse.
        finite = torch.isfinite(qk.float()) & torch.isfinite((s * 1.4426950408889634).float())
        bad = (valid & ~finite).any(-1)
        s = s.masked_fill(~valid, float("-inf")).masked_fill(bad[..., None], float("nan"))
        row_lse = torch.logsumexp(s, dim=-1)                                         # [hkv, g, n]
        # exp(s - lse), 0 where a row sees no key; NaN rows stay NaN.
        p = torch.where(torch.isneginf(row_lse)[..., None], 0.0, torch.exp(s - row_lse[..., None]))
        o = torch.einsum("kgit,tkd->ikgd", p, v)
        out[q0:q1] = o.reshape(n, hq, d)
        lse[q0:q1] = row_lse.permute(2, 0, 1).reshape(n, hq).float()
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out



def paged_attention_scores(q, key_cache, block_tables, seq_lens, lse, cu_seqlens_q=None, *, scale=None,
                           sliding_window=None, compute_dtype=torch.float64):
    """Attention probability each cached key receives, summed over a chunk of queries, per query head.

    q ``[total_q, num_q_heads, head_dim]`` (chunk ``b`` is ``q[cu[b]:cu[b+1]]``, the LAST queries of
    sequence ``b``, as in ``paged_prefill_attention``; ``cu_seqlens_q`` None: one query per sequence);
    ``lse`` float32 ``[total_q, num_q_heads]`` the natural-log log-sum-exp of each query's scaled scores.
    Returns float32 ``[batch, num_q_heads, max_blocks * block_size]``: ``sum_i exp(q_i . k_t * scale -
    lse_i)`` over the chunk's queries ``i`` that see key ``t`` (causal, window), 0 for keys past
    ``seq_lens[b]``. Computed densely in ``compute_dtype`` (float64 by default)."""
    total_q, hq, d = q.shape
    batch, max_blocks = block_tables.shape
    block_size, hkv = key_cache.shape[1], key_cache.shape[2]
    group = hq // hkv if hkv else 0
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    out = torch.zeros(batch, hq, max_blocks * block_size, dtype=torch.float32, device=q.device)
    cu = (torch.arange(batch + 1) if cu_seqlens_q is None else cu_seqlens_q).long().tolist()
    for b in range(batch):
        q0, q1 = cu[b], cu[b + 1]
        n, length = q1 - q0, min(int(seq_lens[b]), max_blocks * block_size)
        if n <= 0 or length <= 0:
            continue
        pos = torch.arange(length - n, length, device=q.device)
        t = torch.arange(length, device=q.device)
        blk = block_tables[b].long()[t // block_size]
        k = key_cache[blk, t % block_size].to(compute_dtype).repeat_interleave(group, dim=1)   # [L, hq, d]
        s = torch.einsum("ihd,thd->hit", q[q0:q1].to(compute_dtype), k) * scale                # [hq, n, L]
        valid = t[None, :] <= pos[:, None]
        if sliding_window is not None:
            valid &= t[None, :] > pos[:, None] - int(sliding_window)
        p = torch.exp(s - lse[q0:q1].to(compute_dtype).t()[:, :, None])
        out[b, :, :length] = torch.where(valid[None], p, 0.0).sum(1).float()
    return out

# ----------------------------------------------------------------------------------------------------
# Vectorised paged attention: what the attention ops and PagedAttentionPlan run where the Triton kernels
# do not (CPU tensors without the interpreter, ``backend("reference")``). Same semantics as the two
# loops above (the tests' oracle), with no per-sequence Python loop on small batches: the addressing
# (which block each key comes from, which keys each query sees) is worked out once on the host with
# numpy, and the attention of the whole batch is a handful of batched tensor ops over chunks padded
# to the longest one. Where padding would exceed ``_PAD_BUDGET`` score elements, sequences are taken in
# groups that fit.

_PAD_BUDGET = 1 << 22
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


class AttentionPiece(NamedTuple):
    """Host-planned addressing of a group of ``batch`` sequences (tensors on the compute device).

    Padded query row ``r = b * max_q + i`` is token ``i`` of chunk ``b``; keys are the ``tokens =
    max_blocks * block_size`` slots of the group's block-table rows, gathered block by block.
    """

    batch: int
    max_q: int
    max_blocks: int
    block_ids: torch.Tensor               # int64 [batch * max_blocks]: block of each table entry (0 if unused)
    invalid: torch.Tensor                 # bool [batch, max_q, tokens]: query row does not see key t
    v_zero: torch.Tensor | None           # int64: flat (b * tokens + t) keys whose V reads 0 (unattended)
    k_zero: torch.Tensor | None           # int64: flat keys whose K reads 0 (block id out of range)
    empty: torch.Tensor | None            # bool [batch, max_q]: rows that see no key (None: none)
    q_rows: torch.Tensor | None           # int64 [batch * max_q]: packed q row of each padded row
    out_src: torch.Tensor | None          # int64 [n]: padded rows that are real queries (None: all)
    out_dst: torch.Tensor | None          # int64 [n]: their packed output rows (None: 0..n-1, all rows)
    no_cache: bool                        # the cache has no blocks: every key reads 0


def _host(t) -> np.ndarray:
    return t.numpy() if t.device.type == "cpu" else t.cpu().numpy()


def attention_pieces(block_tables, seq_lens, cu_seqlens_q=None, *, total_q: int, num_q_heads: int,
                     block_size: int, num_blocks: int, sliding_window: int | None = None,
                     device=None) -> list[AttentionPiece]:
    """Plan the vectorised reference over a batch (numpy, on the host; CUDA inputs are read once).

    ``cu_seqlens_q`` None means one query per sequence (decode: ``q[b]``). Mirrors the kernels on
    unchecked input: lengths are clamped to the table row, block ids outside ``[0, num_blocks)`` read
    K = V = 0, and entries past a sequence's keys are never followed.
    """
    bt = _host(block_tables).astype(np.int64, copy=False)
    sl = _host(seq_lens).astype(np.int64, copy=False)
    batch, max_blocks = bt.shape
    if cu_seqlens_q is None:
        cu = np.arange(batch + 1, dtype=np.int64)
    else:
        cu = _host(cu_seqlens_q).astype(np.int64, copy=False)
    device = block_tables.device if device is None else torch.device(device)
    if batch == 0 or total_q == 0:
        return []
    tokens_of = np.clip(sl, 0, max_blocks * block_size)
    if cu_seqlens_q is None and batch * max_blocks * block_size * num_q_heads <= _PAD_BUDGET:
        return [_decode_piece(bt, tokens_of, block_size=block_size, num_blocks=num_blocks, window=sliding_window,
                              device=device)]
    qlen = np.clip(cu[1:] - cu[:-1], 0, total_q)
    max_q = max(1, int(qlen.max()))
    if batch == 1 or batch * max_q * max_blocks * block_size * num_q_heads <= _PAD_BUDGET:
        groups = [np.arange(batch)]
    else:                                   # big problems only: group sequences so padding stays bounded
        used = -(-tokens_of // block_size)
        groups, cur, cur_q, cur_b = [], [], 1, 1
        for b in range(batch):
            q_b, b_b = max(cur_q, int(qlen[b]), 1), max(cur_b, int(used[b]), 1)
            if cur and (len(cur) + 1) * q_b * b_b * block_size * num_q_heads > _PAD_BUDGET:
                groups.append(np.array(cur))
                cur, q_b, b_b = [], max(1, int(qlen[b])), max(1, int(used[b]))
            cur.append(b)
            cur_q, cur_b = q_b, b_b
        groups.append(np.array(cur))
    blocks_of = -(-tokens_of // block_size)
    pieces = []
    for g in groups:
        mb = max_blocks if len(groups) == 1 else max(1, int(blocks_of[g].max()))
        pieces.append(_piece(bt[g, :mb], tokens_of[g], cu[g], qlen[g], total_q=total_q, block_size=block_size,
                             num_blocks=num_blocks, window=sliding_window, device=device,
                             whole=len(groups) == 1))
    return pieces


def _tensor(a, device):
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device)


def _decode_piece(bt, length, *, block_size, num_blocks, window, device):
    """``_piece`` for one query per sequence and a table with every id in range (the common decode case,
    in fewer host operations); anything else takes the general ``_piece``."""
    batch, mb = bt.shape
    if bt.size and not (bt.min() >= 0 and bt.max() < num_blocks):
        return _piece(bt, length, np.arange(batch), np.ones(batch, dtype=np.int64), total_q=batch,
                      block_size=block_size, num_blocks=num_blocks, window=window, device=device, whole=True)
    tokens = mb * block_size
    t = np.arange(tokens)
    jb = t[::block_size]
    valid = t < length[:, None]
    used = jb < length[:, None]
    if window:
        start = np.maximum(length - window, 0)[:, None]
        valid &= t >= start
        used &= jb + block_size > start
        empty = length <= start[:, 0]
    else:
        empty = length == 0
    ids = bt if used.all() else np.where(used, bt, 0)
    invalid = ~valid
    v_zero = np.flatnonzero(invalid)
    return AttentionPiece(batch, 1, mb, _tensor(ids.reshape(-1).astype(np.int64, copy=False), device),
                          _tensor(invalid, device).view(batch, 1, tokens),
                          _tensor(v_zero, device) if v_zero.size else None, None,
                          _tensor(empty, device).view(batch, 1) if empty.any() else None,
                          None, None, None, num_blocks == 0)


def _piece(bt, length, q_start, qlen, *, total_q, block_size, num_blocks, window, device, whole):
    batch, mb = bt.shape
    tokens = mb * block_size
    max_q = max(1, int(qlen.max()))
    i = np.arange(max_q)
    row_ok = i[None, :] < qlen[:, None]
    q_row = q_start[:, None] + i[None, :]
    row_ok &= (q_row >= 0) & (q_row < total_q)              # unchecked cu_seqlens_q: never out of q
    pos = np.minimum(length, tokens)[:, None] - qlen[:, None] + i[None, :]
    t = np.arange(tokens)
    valid = (t[None, None, :] <= pos[:, :, None]) & row_ok[:, :, None]
    if window:
        valid &= t[None, None, :] > (pos - window)[:, :, None]
    attended = valid.any(1)                                                   # [batch, tokens]
    used = attended.reshape(batch, mb, block_size).any(-1)
    ok = (bt >= 0) & (bt < num_blocks)
    ids = np.where(used & ok, bt, 0)
    bad = used & ~ok
    k_zero = np.repeat(bad, block_size, axis=1) if bad.any() else None
    v_zero = ~attended if k_zero is None else (~attended | k_zero)
    k_zero = None if k_zero is None else np.flatnonzero(k_zero)
    v_zero = np.flatnonzero(v_zero)
    empty = ~valid.any(-1)
    rows = q_row.ravel()
    flat_ok = row_ok.ravel()
    if flat_ok.all() and whole and rows.shape[0] == total_q and (rows == np.arange(total_q)).all():
        q_rows = out_src = out_dst = None                       # padded rows are the packed rows
    else:
        q_rows = np.where(flat_ok, rows, 0)
        out_src = np.flatnonzero(flat_ok)
        dst = rows[out_src]
        out_dst = None if (whole and dst.shape[0] == total_q and (dst == np.arange(total_q)).all()) else dst

    def dev(a):
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return AttentionPiece(batch, max_q, mb, dev(ids.reshape(-1).astype(np.int64)), dev(~valid),
                          dev(v_zero) if v_zero.size else None, dev(k_zero),
                          dev(empty) if empty.any() else None, dev(q_rows), dev(out_src), dev(out_dst),
                          num_blocks == 0)


def attention_pieces_run(pieces, q, key_cache, value_cache, *, total_q: int, scale: float,
                         block_mass_width: int | None = None, out=None, lse=None):
    """Attention of packed queries ``q [total_q, num_q_heads, head_dim]`` (decode: one row per sequence)
    over the planned ``pieces``: ``(out [total_q, hq, d] in q's dtype, lse float32 [total_q, hq],
    block_mass)``, written into ``out``/``lse`` when given. ``block_mass`` (decode only) is float32
    ``[total_q, hq, block_mass_width]`` when a width (the block table's) is given, else None."""
    return_block_mass = block_mass_width is not None
    hq, d = q.shape[1], q.shape[2]
    single = len(pieces) == 1 and pieces[0].out_src is None
    if single and out is None and (not return_block_mass or pieces[0].max_blocks == block_mass_width):
        return _attend(pieces[0], q, key_cache, value_cache, scale, return_block_mass)
    if out is None:
        out = torch.zeros(total_q, hq, d, dtype=q.dtype, device=q.device)
    else:
        out.zero_()
    if lse is None:
        lse = torch.full((total_q, hq), float("-inf"), dtype=torch.float32, device=q.device)
    else:
        lse.fill_(float("-inf"))
    mass = None
    if return_block_mass:
        mass = torch.zeros(total_q, hq, block_mass_width, dtype=torch.float32, device=q.device)
    for p in pieces:
        o, l, m = _attend(p, q, key_cache, value_cache, scale, return_block_mass)
        if p.out_src is not None:
            o, l = o.index_select(0, p.out_src), l.index_select(0, p.out_src)
            m = m.index_select(0, p.out_src) if m is not None else None
        dst = p.out_dst
        if dst is None:
            n = o.shape[0]
            out[:n].copy_(o)
            lse[:n].copy_(l)
            if m is not None:
                mass[:n, :, :m.shape[2]].copy_(m)
        else:
            out.index_copy_(0, dst, o)
            lse.index_copy_(0, dst, l)
            if m is not None:
                mass[:, :, :m.shape[2]].index_copy_(0, dst, m)
    return out, lse, mass


def _attend(p: AttentionPiece, q, key_cache, value_cache, scale, want_mass):
    """One piece: ``(out [batch * max_q, hq, d], lse [batch * max_q, hq], mass or None)``."""
    B, Qm, mb = p.batch, p.max_q, p.max_blocks
    hq, d = q.shape[1], q.shape[2]
    bs, hkv = key_cache.shape[1], key_cache.shape[2]
    g = hq // hkv
    T = mb * bs
    qp = q if p.q_rows is None else q.index_select(0, p.q_rows)
    if p.no_cache:
        k = key_cache.new_zeros(B, T, hkv, d)
        v = value_cache.new_zeros(B, T, hkv, d)
    else:
        k = key_cache.index_select(0, p.block_ids).view(B, T, hkv, d)
        v = value_cache.index_select(0, p.block_ids).view(B, T, hkv, d)
    if p.k_zero is not None:
        k.view(B * T, hkv * d).index_fill_(0, p.k_zero, 0)
    if p.v_zero is not None:                      # their probability is 0, and 0 * NaN would be NaN
        v.view(B * T, hkv * d).index_fill_(0, p.v_zero, 0)
    # Into the batched-matmul layout [batch * kv_head, rows, head_dim], in float32.
    f32, contig = torch.float32, torch.contiguous_format
    if k.dtype == f32:
        k3, v3 = k.transpose(1, 2).reshape(B * hkv, T, d), v.transpose(1, 2).reshape(B * hkv, T, d)
    else:                                         # convert and lay out in one copy
        k3 = k.transpose(1, 2).to(f32, memory_format=contig).view(B * hkv, T, d)
        v3 = v.transpose(1, 2).to(f32, memory_format=contig).view(B * hkv, T, d)
    q3 = qp.reshape(B, Qm, hkv, g, d).transpose(1, 2)
    q3 = q3.reshape(B * hkv, Qm * g, d) if qp.dtype == f32 else q3.to(f32, memory_format=contig).view(
        B * hkv, Qm * g, d)
    # As the kernels do: float32 scores scaled by log2(e) (so exp2/log2), -inf turned into NaN before
    # masking, so that NaN and +-inf in an attended score (from the inputs or from float32 overflow)
    # make the row's max, sum, out and lse NaN.
    s = torch.bmm(q3, k3.transpose(1, 2)).view(B, hkv, Qm, g, T)
    s.mul_(float(scale) * _LOG2E).nan_to_num_(nan=math.nan, posinf=math.inf, neginf=math.nan)
    s.masked_fill_(p.invalid.view(B, 1, Qm, 1, T), -math.inf)
    m = s.amax(-1, keepdim=True)
    e = s.sub_(m).exp2_()                         # NaN on rows that see no key (m = -inf): fixed below
    l = e.sum(-1, keepdim=True)
    out = torch.bmm(e.view(B * hkv, Qm * g, T), v3).view(B, hkv, Qm, g, d).div_(l)
    if want_mass:
        prob = e.div_(l).masked_fill_(p.invalid.view(B, 1, Qm, 1, T), 0)
    lse = torch.add(l.log_(), m, alpha=_LN2)      # ln(l) + m * ln(2): m is a log2 max
    if p.empty is not None:
        empty = p.empty.view(B, 1, Qm, 1, 1)
        out.masked_fill_(empty, 0)
        lse.masked_fill_(empty, -math.inf)
    out = out.transpose(1, 2).to(q.dtype, memory_format=contig).reshape(B * Qm, hq, d)
    lse = lse.view(B, hkv, Qm, g).transpose(1, 2).reshape(B * Qm, hq)
    mass = None
    if want_mass:
        mass = prob.view(B, hkv, Qm, g, mb, bs).sum(-1).transpose(1, 2).reshape(B * Qm, hq, mb)
    return out, lse, mass
