"""kvtriton's paged attention as a transformers attention implementation (``"kvtriton"``).

transformers calls an attention function per layer with ``query [batch, num_q_heads, q_len, head_dim]`` and
``key``/``value [batch, num_kv_heads, q_len, head_dim]`` after RoPE and after the cache's ``update``. Ours
writes the new K/V into the pool's pages (``append_kv``) and attends over the pages: a step where every
sequence brings one token runs ``paged_decode_attention``, any other step (prompts, chunks, mixed prefill and
decode) ``paged_prefill_attention``. Where the tokens go comes from a :class:`StepBatch`, built once per model
forward and shared by all layers (the slots of a token are the same in every layer):

* :class:`~kvtriton.hf.PagedCache` (inside ``model.generate``): its ``update`` marks itself as the source of
  the next attention call of that layer, and builds the step's batch at the first layer. Each batch row is
  its own paged sequence holding only its real tokens: left padding (columns where the 2D attention mask is
  0) is never written, so the kernels see per-row lengths instead of masks.
* :class:`~kvtriton.hf.PagedEngine`: one packed row of variable-length chunks, with a batch set for the
  whole forward.

Without either (e.g. a plain ``model(...)`` call, which gets a DynamicCache) the function falls back to
transformers' SDPA with the mask transformers would have built, so enabling it never breaks a model.

The attention-mask function registered under the same name hands the 2D padding mask through unchanged
(transformers would otherwise expand it to 4D, which paged attention has no use for).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from .. import ops
from .support import AttentionLayout, UnsupportedModelError, check_model

__all__ = ["ATTN_IMPLEMENTATION", "StepBatch", "paged_attention_forward", "register_paged_attention",
           "enable_paged_attention"]

ATTN_IMPLEMENTATION = "kvtriton"


@dataclass
class StepBatch:
    """Where one model forward's tokens live in the pool (vLLM's attention metadata).

    ``slot_mapping`` int64 ``[num_tokens]`` (negative: a token whose K/V is already in the pages and is not
    written again); ``block_tables`` int32 ``[batch, max_blocks]``; ``seq_lens`` int32 ``[batch]`` (cached
    prefix plus this step's chunk); ``cu_seqlens_q`` int32 ``[batch + 1]`` (chunk ``b`` is tokens
    ``cu[b]:cu[b+1]`` of the packed step). ``token_index`` (int64, optional) picks the real tokens out of the
    flattened ``[hf_batch * q_len]`` inputs; the others (padding) get a zero output. ``decode_only``: one token
    per sequence and no padding, so the decode kernel runs. ``layer_attention`` (optional): a callable
    ``(layer, q, k, v, scale) -> out`` that writes and attends instead (token eviction: per-layer lengths and
    slots, see :mod:`kvtriton.hf.token_evict`), given the packed ``q [T, hq, d]``, ``k``/``v [T, hkv, d]``.
    """

    pool: object
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    decode_only: bool
    token_index: torch.Tensor | None = None
    num_layers: int = 0
    on_last_layer: object = None         # called after the attention of layer num_layers - 1
    attention_ns: int = 0                # host time spent in the attention calls of this step
    layers_done: int = field(default=0)
    layer_attention: object = None


class _Local(threading.local):
    pending = None   # (source, layer_idx): set by PagedCache.update, consumed by that layer's attention call
    scoped = None    # a StepBatch for a whole forward (PagedEngine)


_local = _Local()
_registered = False


def _take_batch(module, query, attention_mask) -> StepBatch | None:
    layer = getattr(module, "layer_idx", None)
    pending = _local.pending
    if pending is not None:
        _local.pending = None
        source, idx = pending
        if idx == layer:
            return source._batch_for(layer, query, attention_mask)
    return _local.scoped


class scoped_batch:
    """``with scoped_batch(batch): model(...)``: every kvtriton attention call of the forward uses ``batch``."""

    def __init__(self, batch: StepBatch):
        self.batch = batch

    def __enter__(self):
        self._old = _local.scoped
        _local.scoped = self.batch
        _local.pending = None
        return self.batch

    def __exit__(self, *exc):
        _local.scoped = self._old
        _local.pending = None
        return False


def paged_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                            sliding_window=None, softcap=None, **kwargs):
    """The ``"kvtriton"`` attention implementation (transformers' AttentionInterface signature).

    ``query`` ``[batch, num_q_heads, q_len, head_dim]``, ``key``/``value`` ``[batch, num_kv_heads, q_len,
    head_dim]`` (this step's tokens, after RoPE); returns ``(out [batch, q_len, num_q_heads, head_dim], None)``
    (no attention weights). Inference only: a module in training mode raises ValueError, and ``out`` carries no
    gradient.
    """
    batch = _take_batch(module, query, attention_mask)
    if batch is None:
        return _sdpa_fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                              sliding_window=sliding_window, softcap=softcap, **kwargs)
    t0 = time.perf_counter_ns()
    if softcap is not None or kwargs.get("s_aux") is not None:
        raise UnsupportedModelError("kvtriton's paged attention cannot apply logit soft-capping or attention "
                                    "sinks (got softcap or s_aux from the model)")
    if getattr(module, "training", False):
        raise ValueError("kvtriton's paged attention is for inference: call model.eval() (no gradient flows "
                         "through the paged cache)")
    with torch.no_grad():   # inference only: the pages are written in place and no gradient flows through them
        out = _paged_attention(batch, module.layer_idx, query, key, value, scaling, sliding_window)
    batch.attention_ns += time.perf_counter_ns() - t0
    batch.layers_done += 1
    if module.layer_idx == batch.num_layers - 1 and batch.on_last_layer is not None:
        batch.on_last_layer()
    return out, None


def _paged_attention(batch: StepBatch, layer: int, query, key, value, scaling, sliding_window):
    b, hq, s, d = query.shape
    hkv = key.shape[1]
    q = query.transpose(1, 2).reshape(b * s, hq, d)
    k = key.transpose(1, 2).reshape(b * s, hkv, d)
    v = value.transpose(1, 2).reshape(b * s, hkv, d)
    idx = batch.token_index
    if idx is not None:
        q, k, v = q[idx], k[idx], v[idx]
    if batch.layer_attention is not None:
        return batch.layer_attention(layer, q, k, v, scaling).view(b, s, hq, d)
    key_cache, value_cache = batch.pool.kv(layer)
    ops.append_kv(k, v, key_cache, value_cache, batch.slot_mapping)
    window = int(sliding_window) if sliding_window else None
    if batch.decode_only:
        out = ops.paged_decode_attention(q, key_cache, value_cache, batch.block_tables, batch.seq_lens,
                                         scale=scaling, sliding_window=window)
    else:
        out = ops.paged_prefill_attention(q, key_cache, value_cache, batch.block_tables, batch.seq_lens,
                                          batch.cu_seqlens_q, scale=scaling, sliding_window=window)
    if idx is not None:
        full = out.new_zeros(b * s, hq, d)
        full[idx] = out
        out = full
    return out.view(b, s, hq, d)


def _sdpa_fallback(module, query, key, value, attention_mask, **kwargs):
    """No paged cache in this forward: transformers' SDPA with the causal mask it would have built."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if kwargs.get("sliding_window"):
        raise UnsupportedModelError(
            "the 'kvtriton' attention runs sliding-window layers only on a kvtriton.hf.PagedCache or in a "
            "PagedEngine; pass past_key_values=PagedCache(model, ...) or go back with "
            "model.set_attn_implementation('sdpa')")
    kwargs.pop("sliding_window", None)
    if attention_mask is None or attention_mask.dim() == 2:
        q_len, kv_len = query.shape[2], key.shape[2]
        attention_mask = sdpa_mask(batch_size=query.shape[0], q_length=q_len, kv_length=kv_len,
                                   q_offset=kv_len - q_len, kv_offset=0, mask_function=causal_mask_function,
                                   attention_mask=None if attention_mask is None else attention_mask.bool(),
                                   allow_is_causal_skip=True, device=query.device)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _padding_mask_passthrough(batch_size=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0,
                              mask_function=None, attention_mask=None, **kwargs):
    """Mask 'creation' for ``"kvtriton"``: the 2D padding mask ``[batch, kv_len]`` (or None), unchanged."""
    return attention_mask


def register_paged_attention() -> str:
    """Register the ``"kvtriton"`` attention (and its mask function) with transformers; idempotent.
    Returns the implementation name, for ``model.set_attn_implementation``."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _padding_mask_passthrough)
        _registered = True
    return ATTN_IMPLEMENTATION


def enable_paged_attention(model) -> AttentionLayout:
    """Check that ``model`` can run on the paged ops (:func:`~kvtriton.hf.check_model`; UnsupportedModelError
    naming what is missing otherwise), register the ``"kvtriton"`` attention and switch the model to it.
    Returns the model's :class:`AttentionLayout`. Undo with ``model.set_attn_implementation("sdpa")``."""
    layout = check_model(model)
    register_paged_attention()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return layout
