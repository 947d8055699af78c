"""Quality under token eviction, measured on a real model: seeded long-context tasks (pass-key, multi-key,
variable tracking), perplexity of a long text, and the evaluation and sweep that run them through
``kvtriton.hf.PagedEngine`` with and without token eviction.

Not imported by ``kvtriton``; needs torch and, to run a model, transformers (the ``models`` extra).
``kvtriton.quality.config`` (the knobs, ``QualityConfig``) imports neither.
"""

from .config import QualityConfig, QUALITY_TASKS, FULL

__all__ = ["QualityConfig", "QUALITY_TASKS", "FULL"]
