"""Model KV-cache shapes (`ModelSpec`) and named presets from published model configs."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(dtype) -> torch.dtype:
    """Accept a torch dtype or one of the names in ``_DTYPES``; raise ValueError naming the choices."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower().replace("torch.", "") in _DTYPES:
        return _DTYPES[dtype.lower().replace("torch.", "")]
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch dtype, got {dtype!r}")


@dataclass(frozen=True)
class ModelSpec:
    """The KV-cache shape of one model.

    A block holds ``block_size`` tokens of every layer's K and V, laid out contiguously as
    ``[num_layers, 2, block_size, num_kv_heads, head_dim]``; per layer, K and V are the NHD views
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` used by vLLM and FlashInfer.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16
    block_size: int = 16
    num_q_heads: int | None = None  # for attention benchmarks; defaults to num_kv_heads
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        for arg in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            v = getattr(self, arg)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{arg} must be a positive int, got {v!r}")
        if self.num_q_heads is None:
            object.__setattr__(self, "num_q_heads", self.num_kv_heads)
        elif self.num_q_heads < 1 or self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"num_q_heads must be a positive multiple of num_kv_heads={self.num_kv_heads}, "
                f"got {self.num_q_heads}")

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        """K and V of all layers for one token."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.element_size

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one block: ``(num_layers, 2, block_size, num_kv_heads, head_dim)``."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def with_(self, **changes) -> "ModelSpec":
        return replace(self, **changes)


# Shapes from the models' published configs (config.json: num_hidden_layers, num_key_value_heads,
# head_dim or hidden_size / num_attention_heads, torch_dtype).
PRESETS: dict[str, ModelSpec] = {
    "llama-3-8b": ModelSpec(32, 8, 128, torch.bfloat16, 16, num_q_heads=32, name="llama-3-8b"),
    "llama-3-70b": ModelSpec(80, 8, 128, torch.bfloat16, 16, num_q_heads=64, name="llama-3-70b"),
    "mistral-7b": ModelSpec(32, 8, 128, torch.bfloat16, 16, num_q_heads=32, name="mistral-7b"),
    "qwen2.5-7b": ModelSpec(28, 4, 128, torch.bfloat16, 16, num_q_heads=28, name="qwen2.5-7b"),
    # The original design's two pools. VISTA: a 7B-class vision-language decoder (Llama-style GQA);
    # its caches were 10 MB (5 blocks of 16 tokens here). DeepSeek-OCR: the DeepSeek-3B-MoE decoder
    # (12 layers, 10 heads of 128, no MLA); its caches were 5 MB.
    "vista": ModelSpec(32, 8, 128, torch.float16, 16, num_q_heads=32, name="vista"),
    "deepseek-ocr": ModelSpec(12, 10, 128, torch.bfloat16, 16, num_q_heads=10, name="deepseek-ocr"),
    # A tiny shape for tests and CPU demos.
    "tiny": ModelSpec(2, 2, 64, torch.float32, 16, num_q_heads=4, name="tiny"),
}

# Cache sizes of the original design's workloads, in bytes.
DESIGN_CACHE_BYTES = {"vista": 10 * 1024 * 1024, "deepseek-ocr": 5 * 1024 * 1024}


def get_spec(spec) -> ModelSpec:
    """A ModelSpec, or a preset name (see ``PRESETS``); unknown names raise ValueError listing them."""
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, str):
        key = spec.lower()
        if key in PRESETS:
            return PRESETS[key]
        raise ValueError(f"unknown model preset {spec!r}; valid presets: {', '.join(sorted(PRESETS))}")
    raise ValueError(f"model must be a ModelSpec or a preset name ({', '.join(sorted(PRESETS))}), got {spec!r}")
