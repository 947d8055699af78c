"""Which Hugging Face models the integration can run, checked once at setup.

kvtriton's paged ops compute causal softmax attention of ``num_q_heads`` query heads over ``num_kv_heads``
K/V heads (GQA, any group up to 128) with one ``head_dim`` (a power of two in [16, 256]) shared by K and
V, an optional per-layer sliding window, and a softmax scale. Keys are cached after RoPE, which
transformers applies before the cache update, so any RoPE variant works. Anything else a model's attention
needs (multi-latent attention, logit soft-capping, attention sinks, chunked attention, linear-attention or
hybrid layers, K/V shared across layers, bidirectional attention, encoder-decoder cross-attention) cannot
be expressed, and such a model is refused here with a message naming what is missing, before any memory
is set aside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import is_int

__all__ = ["AttentionLayout", "UnsupportedModelError", "check_model"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class UnsupportedModelError(ValueError):
    """The model's attention needs something kvtriton's paged attention cannot express."""


@dataclass(frozen=True)
class AttentionLayout:
    """What the paged cache of a model holds: one K/V page set per attention layer."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    sliding_windows: tuple          # per layer: None (full attention) or the window in tokens
    vocab_size: int
    model_type: str

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    if get is None:
        return config
    try:
        return get(decoder=True)
    except TypeError:  # older signatures
        return get()


def _refuse(model_type: str, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"model type {model_type!r} is not supported by kvtriton's paged attention: "
                                 f"{what}")


def check_model(model_or_config, dtype: torch.dtype | None = None) -> AttentionLayout:
    """The :class:`AttentionLayout` of a ``transformers`` causal LM (or its config), or
    :class:`UnsupportedModelError` naming what the paged ops cannot express.

    ``dtype`` defaults to the model's (a config alone: its ``dtype``/``torch_dtype``, else float32).
    """
    model = None if _is_config(model_or_config) else model_or_config
    config = model_or_config if model is None else getattr(model, "config", None)
    if config is None:
        raise TypeError(f"model must be a transformers model or config, got {type(model_or_config).__name__}")
    if getattr(config, "is_encoder_decoder", False):
        raise _refuse(getattr(config, "model_type", "?"), "encoder-decoder models (cross-attention) are not "
                      "supported; only decoder-only causal LMs")
    cfg = _text_config(config)
    mt = str(getattr(cfg, "model_type", None) or getattr(config, "model_type", "?"))

    _refuse_variants(cfg, mt)
    num_layers, hq, hkv, head_dim = _head_geometry(cfg, mt)
    windows = _layer_windows(cfg, mt, num_layers)
    dtype = _layout_dtype(model, cfg, mt, dtype)
    if model is not None:
        _check_instance(model, mt, num_layers)
    return AttentionLayout(num_layers, hq, hkv, head_dim, dtype, tuple(windows),
                           int(getattr(cfg, "vocab_size", 0) or 0), mt)


def _refuse_variants(cfg, mt: str) -> None:
    """Attention variants the ops cannot compute: UnsupportedModelError naming the first one found."""
    for attr, what in (("kv_lora_rank", "multi-latent attention (MLA: K/V compressed to a latent of rank "
                                        "kv_lora_rank={v}); the paged cache holds per-head K and V"),
                       ("attn_logit_softcapping", "attention logit soft-capping (attn_logit_softcapping={v})"),
                       ("attention_chunk_size", "chunked attention (attention_chunk_size={v})"),
                       ("kv_sharing_modes", "K/V shared across layers (kv_sharing_modes)"),
                       ("num_kv_shared_layers", "K/V shared across layers (num_kv_shared_layers={v})")):
        v = getattr(cfg, attr, None)
        if v:
            raise _refuse(mt, what.format(v=v))
    if getattr(cfg, "is_causal", True) is False:
        raise _refuse(mt, "bidirectional (non-causal) attention (config.is_causal=False)")
    if getattr(cfg, "position_embedding_type", None) == "alibi" or getattr(cfg, "alibi", False):
        raise _refuse(mt, "ALiBi position biases (added to the attention scores)")


def _head_geometry(cfg, mt: str) -> tuple[int, int, int, int]:
    """``(num_layers, num_q_heads, num_kv_heads, head_dim)``, refusing what the ops cannot take."""
    num_layers = _int_attr(cfg, mt, "num_hidden_layers")
    hq = _int_attr(cfg, mt, "num_attention_heads")
    hkv = getattr(cfg, "num_key_value_heads", None)
    hkv = hq if hkv is None else hkv
    if not isinstance(hkv, int) or hkv < 1:
        raise _refuse(mt, f"num_key_value_heads must be a positive int, got {hkv!r} (per-layer head counts are "
                      "not supported)")
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim is None:
        head_dim = _int_attr(cfg, mt, "hidden_size") // hq
    v_dim = getattr(cfg, "v_head_dim", None)
    if v_dim is not None and v_dim != head_dim:
        raise _refuse(mt, f"values with their own head size (v_head_dim={v_dim} != head_dim={head_dim})")
    if not isinstance(head_dim, int) or head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise _refuse(mt, f"head_dim={head_dim!r}; the paged ops take a power of two in [16, 256]")
    if hq % hkv:
        raise _refuse(mt, f"num_attention_heads={hq} is not a multiple of num_key_value_heads={hkv}")
    if hq // hkv > 128:
        raise _refuse(mt, f"a GQA group of {hq // hkv} query heads per K/V head; the paged ops take at most 128")
    return num_layers, hq, hkv, head_dim


def _layer_windows(cfg, mt: str, num_layers: int) -> list:
    """Each layer's sliding window (None: full attention), refusing other layer types."""
    layer_types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if layer_types is None:
        use = getattr(cfg, "use_sliding_window", True)
        kind = "sliding_attention" if (window is not None and use is not False) else "full_attention"
        layer_types = [kind] * num_layers
    layer_types = list(layer_types)[:num_layers]
    windows = []
    for i, kind in enumerate(layer_types):
        if kind == "full_attention":
            windows.append(None)
        elif kind == "sliding_attention":
            if not is_int(window) or window < 1:
                raise _refuse(mt, f"layer {i} is a sliding-window layer with sliding_window={window!r}; the paged "
                              "ops take a window of int >= 1 tokens")
            windows.append(int(window))
        else:
            bad = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
            idx = [j for j, t in enumerate(layer_types) if t in bad]
            raise _refuse(mt, f"layers {idx[:8]}{'...' if len(idx) > 8 else ''} are of type {bad}; only "
                          "'full_attention' and 'sliding_attention' layers can run on the paged cache")
    return windows


def _layout_dtype(model, cfg, mt: str, dtype):
    """The dtype the paged cache holds: ``dtype``, else the model's (a config's ``dtype``/``torch_dtype``),
    else float32; refused unless float32, float16 or bfloat16."""
    if dtype is None:
        if model is not None:
            dtype = getattr(model, "dtype", None)
        else:
            dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
            if isinstance(dtype, str):
                dtype = getattr(torch, dtype, None)
        dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    if dtype not in _DTYPES:
        raise _refuse(mt, f"dtype {dtype}; the paged ops take float32, float16 or bfloat16")
    return dtype


def _check_instance(model, mt: str, num_layers: int) -> None:
    """A model instance dispatches attention through AttentionInterface, has no attention sinks, and has
    one attention module with a ``layer_idx`` per layer."""
    if not getattr(model, "_supports_attention_backend", False):
        raise _refuse(mt, f"{type(model).__name__} does not dispatch its attention through transformers' "
                      "AttentionInterface (_supports_attention_backend is False)")
    seen = set()
    for name, mod in model.named_modules():
        if getattr(mod, "sinks", None) is not None and isinstance(getattr(mod, "sinks"), torch.Tensor):
            raise _refuse(mt, f"attention sinks ({name}.sinks: a learned logit added to every softmax)")
        if type(mod).__name__.endswith("Attention") and hasattr(mod, "layer_idx"):
            li = getattr(mod, "layer_idx")
            if isinstance(li, int) and 0 <= li < num_layers:
                seen.add(li)
    if len(seen) != num_layers:
        raise _refuse(mt, f"found attention modules with a layer_idx for {len(seen)} of the {num_layers} layers "
                      "(the paged cache is indexed by module.layer_idx)")


def _is_config(obj) -> bool:
    try:
        from transformers import PretrainedConfig
    except ImportError:  # pragma: no cover - the package guards this import
        return hasattr(obj, "model_type") and not hasattr(obj, "forward")
    return isinstance(obj, PretrainedConfig)


def _int_attr(cfg, mt, name):
    v = getattr(cfg, name, None)
    if not is_int(v) or v < 1:
        raise _refuse(mt, f"config.{name} must be a positive int, got {v!r}")
    return v
