"""Plain-PyTorch references of every op in ``kvtriton.ops``.

They define the semantics the Triton kernels must match, are what tests compare against, and are what
runs on CPU tensors when Triton's interpreter is off. Shapes follow vLLM/FlashInfer (NHD):
``key_cache``/``value_cache`` ``[num_blocks, block_size, num_kv_heads, head_dim]`` with any stride on the
block dimension; ``block_tables`` int32 ``[batch, max_blocks]``; ``seq_lens`` int32 ``[batch]``;
``slot_mapping`` int64 ``[num_tokens]`` (negative = padding).
"""

from __future__ import annotations

import math

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
