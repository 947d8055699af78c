"""PagedCache: a transformers ``Cache`` whose K/V live in a kvtriton :class:`~kvtriton.CachePool`.

Used with the ``"kvtriton"`` attention (:func:`~kvtriton.hf.enable_paged_attention`)::

    enable_paged_attention(model)
    cache = PagedCache(model, budget_bytes=256 << 20, block_size=16)
    out = model.generate(**tok(prompts, return_tensors="pt", padding=True), cache=cache,
                         max_new_tokens=64, do_sample=False)       # transformers 5 also takes past_key_values=
    cache.release()

Each row of the batch is one :class:`~kvtriton.VirtualKVCache` holding only that row's real tokens: columns
where the 2D attention mask is 0 (left padding) are never written, and the kernels get per-row lengths.
transformers sees the usual padded coordinates (``get_seq_length`` counts the columns fed so far, as
DynamicCache does), so ``generate``'s position ids and masks are unchanged. Keys are stored after RoPE
(transformers rotates them before the cache update).

The cache stores nothing in ``update``: the attention function writes the layer's new K/V into the pages
with ``append_kv`` (it knows which columns are padding) and attends with the paged kernels. The block
tables and slot mappings of a forward are built once, at its first layer, under the pool's
``stable_blocks()`` (held until the last layer's attention), so a concurrent shrink or compaction of a shared
pool waits for the forward instead of moving blocks under it.

Not supported (raise NotImplementedError): beam search and other reordering (``reorder_cache``,
``batch_select_indices``, ``batch_repeat_interleave``), ``crop`` (assisted decoding).
"""

from __future__ import annotations

import math
import threading

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..checks import check_int
from ..errors import PoolExhaustedError
from ..memory import DEFAULT_CHUNK_BYTES, GPUMemoryAllocator
from ..spec import ModelSpec
from .attention import ATTN_IMPLEMENTATION, StepBatch, _local, register_paged_attention
from .support import check_model

__all__ = ["PagedCache", "pool_max_blocks", "make_pool"]


def make_pool(spec: ModelSpec, device, *, budget_bytes=None, num_blocks=None, policy="lru", name="hf"):
    """``(allocator, pool)``: a new one-pool arena for ``spec`` on ``device``, sized by ``budget_bytes`` (default:
    the allocator's, 1 GiB on CPU and 90% of free memory on CUDA) or by ``num_blocks`` (at least that many
    blocks; not both). Its chunks are whole blocks (about 2 MiB each, or a single block's worth when sized by
    ``num_blocks``), so every byte of the budget holds blocks."""
    block = spec.bytes_per_block
    k0 = 256 // math.gcd(block, 256)          # chunk sizes must be multiples of 256 bytes
    unit = block * k0
    if num_blocks is not None:
        if budget_bytes is not None:
            raise ValueError("give budget_bytes or num_blocks, not both")
        check_int("num_blocks", num_blocks, 1)
        chunk, budget = unit, -(-num_blocks // k0) * unit
    else:
        chunk, budget = unit * max(1, round(DEFAULT_CHUNK_BYTES / unit)), budget_bytes
    alloc = GPUMemoryAllocator(devices=[torch.device(device)], budget_bytes=budget, chunk_bytes=chunk)
    try:
        return alloc, alloc.create_pool(name, spec, policy=policy)
    except BaseException:
        alloc.close()
        raise


def model_pool(model, layout, *, block_size, pool=None, device=None, budget_bytes=None, num_blocks=None,
               policy="lru", name="hf"):
    """``(spec, allocator, pool)`` for ``model``'s attention ``layout``: ``pool`` when given (its block shape
    and dtype must be the model's), else a new one-pool arena from :func:`make_pool` (``allocator`` is then
    the caller's to close; None otherwise)."""
    spec = ModelSpec(layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype, block_size,
                     num_q_heads=layout.num_q_heads, name=f"hf-{layout.model_type}")
    if pool is None:
        dev = torch.device(device) if device is not None else model.device
        allocator, pool = make_pool(spec, dev, budget_bytes=budget_bytes, num_blocks=num_blocks, policy=policy,
                                    name=name)
        return spec, allocator, pool
    if pool.spec.block_shape != spec.block_shape or pool.spec.dtype != spec.dtype:
        raise ValueError(f"pool spec {pool.spec.block_shape} {pool.spec.dtype} does not match the model's "
                         f"{spec.block_shape} {spec.dtype} (layers, K/V, block_size, kv_heads, head_dim)")
    return spec, None, pool


def pool_max_blocks(pool) -> int:
    """The most blocks ``pool`` can ever hold: every block of its arena, or fewer under ``max_chunks``."""
    n = pool.num_blocks
    if pool.max_chunks is not None:
        n = min(n, pool.max_chunks * pool.arena.chunk_bytes // pool.block_bytes)
    return n


class _PagedLayer(CacheLayerMixin):
    """The per-layer view transformers expects (lengths for masks); the data lives in the pool."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, owner: "PagedCache", layer_idx: int, sliding: bool):
        super().__init__()
        self._owner = owner
        self.layer_idx = layer_idx
        self.is_sliding = sliding
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self._owner.update(key_states, value_states, self.layer_idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner._layer_len[self.layer_idx] + query_length, 0

    def get_seq_length(self) -> int:
        return self._owner._layer_len[self.layer_idx]

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        pass

    def offload(self):
        pass

    def prefetch(self):
        pass

    def reorder_cache(self, beam_idx) -> None:
        self._owner.reorder_cache(beam_idx)


class PagedCache(Cache):
    """A transformers ``Cache`` backed by a kvtriton pool (see the module docstring).

    Args:
        model: the ``transformers`` causal LM; checked with :func:`~kvtriton.hf.check_model`
            (UnsupportedModelError names what the paged ops cannot express).
        budget_bytes: size of the KV arena this cache creates (default: the allocator's: 1 GiB on CPU, 90%
            of free memory on CUDA). Ignored when ``pool`` is given.
        num_blocks: size the arena in blocks instead (at least this many; not with ``budget_bytes``).
        block_size: tokens per block (a power of two in [1, 256]).
        policy: eviction policy of the pool (a name from ``kvtriton.policies``).
        pool: use this :class:`~kvtriton.CachePool` (its spec must match the model) instead of creating one.
        device: where the pages live (default: the model's device).

    The cache is sized lazily: the first forward fixes the batch size. Call :meth:`release` (or use it as a
    context manager) to give the blocks back; a cache that created its pool also closes its arena then.
    """

    def __init__(self, model, *, budget_bytes: int | None = None, block_size: int = 16, policy="lru", pool=None,
                 device=None, num_blocks: int | None = None):
        layout = check_model(model)
        register_paged_attention()
        self.layout = layout
        self._config = model.config
        self.spec, self._allocator, pool = model_pool(
            model, layout, block_size=block_size, pool=pool, device=device, budget_bytes=budget_bytes,
            num_blocks=num_blocks, policy=policy, name="hf-paged-cache")
        self.pool = pool
        self.max_blocks = pool_max_blocks(pool)
        layers = [_PagedLayer(self, i, w is not None) for i, w in enumerate(layout.sliding_windows)]
        super().__init__(layers=layers)
        self._seqs = None                     # one VirtualKVCache per batch row, made at the first forward
        self._layer_len = [0] * layout.num_layers
        self._layer_steps = [0] * layout.num_layers
        self._steps = 0
        self._batch: StepBatch | None = None
        self._hold = None                     # (thread id, pool.stable_blocks() context) during a forward
        self._broken = None
        self._released = False

    # ------------------------------------------------------------------ transformers' Cache API
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Record that ``layer_idx`` saw this step's tokens; the ``"kvtriton"`` attention writes them."""
        self._check_usable()
        impl = getattr(self._config, "_attn_implementation", None)
        if impl != ATTN_IMPLEMENTATION:
            # Another attention would see only this step's K/V (this cache returns no history): refuse.
            raise RuntimeError(f"PagedCache needs the model's attention set to {ATTN_IMPLEMENTATION!r} (it is "
                               f"{impl!r}): call kvtriton.hf.enable_paged_attention(model) first")
        self._layer_len[layer_idx] += key_states.shape[-2]
        _local.pending = (self, layer_idx)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._layer_len[layer_idx] if layer_idx < len(self._layer_len) else 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("PagedCache does not support beam search (reorder_cache); use greedy or "
                                  "sampling with num_beams=1")

    def batch_select_indices(self, indices):
        raise NotImplementedError("PagedCache does not support selecting batch rows (batch_select_indices)")

    def batch_repeat_interleave(self, repeats: int):
        raise NotImplementedError("PagedCache does not support expanding the batch (num_return_sequences > 1 or "
                                  "beam search)")

    def crop(self, tokens_to_remove: int):
        raise NotImplementedError("PagedCache does not support crop (assisted decoding)")

    def reset(self):
        self.release()

    @property
    def is_compileable(self) -> bool:
        return False

    # ------------------------------------------------------------------ state
    @property
    def seq_lens(self) -> list[int]:
        """Real (non-padding) tokens held per batch row."""
        return [] if self._seqs is None else [s.seq_len for s in self._seqs]

    @property
    def sequences(self):
        """The rows' :class:`~kvtriton.VirtualKVCache` objects (None before the first forward)."""
        return None if self._seqs is None else list(self._seqs)

    def stats(self) -> dict:
        """The pool's statistics plus this cache's rows, steps and tokens."""
        s = dict(self.pool.stats())
        s.update(rows=0 if self._seqs is None else len(self._seqs), steps=self._steps,
                 tokens=sum(self.seq_lens))
        return s

    def release(self) -> None:
        """Give every block back (and close the arena this cache created); idempotent."""
        self._release_hold()
        if self._released:
            return
        self._released = True
        try:
            if self._seqs is not None and not self.pool.closed:
                for s in self._seqs:
                    if not s.released:
                        self.pool.release(s)
        finally:
            self._seqs = None
            if self._allocator is not None:
                self._allocator.close()

    close = release

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def __repr__(self):
        rows = 0 if self._seqs is None else len(self._seqs)
        return (f"PagedCache(layers={self.layout.num_layers}, block_size={self.spec.block_size}, rows={rows}, "
                f"steps={self._steps}{', released' if self._released else ''})")

    # ------------------------------------------------------------------ the attention function's side
    def _check_usable(self):
        if self._released:
            raise RuntimeError("this PagedCache was released; make a new one")
        if self._broken is not None:
            raise RuntimeError(f"this PagedCache is unusable after an earlier failure ({self._broken}); release "
                               "it and make a new one")

    def _release_hold(self):
        hold, self._hold = self._hold, None
        if hold is not None and hold[0] == threading.get_ident():
            hold[1].__exit__(None, None, None)

    def _batch_for(self, layer_idx: int, query, attention_mask) -> StepBatch:
        step = self._layer_steps[layer_idx]
        if step == self._steps:                 # the first layer of a new forward
            if self._batch is not None and self._batch.layers_done != self.layout.num_layers:
                self._release_hold()
                self._broken = "a forward failed part-way, leaving some layers' K/V unwritten"
                self._check_usable()
            try:
                self._build(query, attention_mask)
            except PoolExhaustedError as e:
                self._broken = f"out of KV memory: {e}"
                raise PoolExhaustedError(e.pool, e.requested, e.free, e.evictable, message=(
                    f"{e}; the PagedCache held {sum(self.seq_lens)} tokens in {len(self._seqs or ())} rows. Give it "
                    "a larger budget_bytes or num_blocks; this cache is now unusable (release it)")) from e
            except BaseException as e:
                self._broken = f"{type(e).__name__}: {e}"
                raise
            self._steps += 1
        elif step != self._steps - 1:
            self._broken = "layers fell out of step (a forward failed part-way)"
            self._check_usable()
        self._layer_steps[layer_idx] = step + 1
        return self._batch

    def _build(self, query, attention_mask) -> None:
        self._release_hold()
        b, _, s, _ = query.shape
        pool = self.pool
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"PagedCache takes a 2D padding mask [batch, kv_len], got attention_mask of shape "
                             f"{tuple(attention_mask.shape)}")
        if attention_mask is not None:
            valid = attention_mask[:, -s:].to(torch.bool)
            counts = valid.sum(1).tolist()
            token_index = None if all(c == s for c in counts) else valid.reshape(-1).nonzero().squeeze(1)
        else:
            counts, token_index = [s] * b, None
        if self._seqs is None:
            bs = self.spec.block_size
            need = sum(-(-c // bs) for c in counts)
            if need > self.max_blocks:
                raise ValueError(f"the batch's prompts need {need} blocks of {bs} tokens ({sum(counts)} tokens in "
                                 f"{b} rows) but the pool can hold at most {self.max_blocks}; give PagedCache a "
                                 "larger budget_bytes or use shorter prompts")
            self._seqs = [pool.request(0) for _ in range(b)]
        elif b != len(self._seqs):
            raise ValueError(f"this PagedCache holds {len(self._seqs)} rows; a forward with batch size {b} needs a "
                             "new cache")
        starts = [seq.seq_len for seq in self._seqs]
        for seq, n in zip(self._seqs, counts):
            seq.append(n)
        hold = pool.stable_blocks()
        hold.__enter__()
        self._hold = (threading.get_ident(), hold)
        try:
            dev = pool.device
            slots = [seq.slot_mapping(st, st + n) for seq, st, n in zip(self._seqs, starts, counts)]
            slot_mapping = torch.cat(slots) if slots else torch.zeros(0, dtype=torch.int64, device=dev)
            tables, lens = pool.batch_tensors(self._seqs)
            cu = torch.zeros(b + 1, dtype=torch.int32)
            cu[1:] = torch.tensor(counts, dtype=torch.int32).cumsum(0)
            if token_index is not None:
                token_index = token_index.to(dev)
            self._batch = StepBatch(pool, slot_mapping, tables, lens, cu.to(dev),
                                    decode_only=token_index is None and s == 1, token_index=token_index,
                                    num_layers=self.layout.num_layers, on_last_layer=self._release_hold)
        except BaseException:
            self._release_hold()
            raise
