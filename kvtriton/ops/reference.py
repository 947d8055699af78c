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

    q ``[batch, num_q_heads, head_dim]``; out has q's shape and dtype. With ``sliding_window=w`` a
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
        s = torch.einsum("hd,nhd->hn", q[b].to(compute_dtype), k) * scale
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
