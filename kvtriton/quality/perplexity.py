"""Perplexity of a long natural-language text under token eviction.

Protocol. The text is the GNU GPL version 3 (``/usr/share/common-licenses/GPL-3``, about 8,000 SmolLM2
tokens), tokenised once as plain text (no chat template). Window ``i`` starts at a seeded offset; its
first ``prompt_tokens`` tokens are the prompt, prefilled in one step (and, under eviction, cut to the
budget as after a generation's prefill); the next ``target_tokens`` tokens are scored teacher-forced:
each is fed as a decode step, with the strategy applied as during generation, and the log-probability
the model gave it before it was fed is recorded (``PagedEngine.score``). Perplexity is
``exp(-mean log p)`` over every scored token of every window. The full-cache reference
(``reference_logprobs``) is one plain forward of the model over prompt + targets (its own attention, no
kvtriton code), so the engine's full cache must match it.
"""

from __future__ import annotations

import functools
import math
import random
from pathlib import Path

import torch

from ..checks import check_int

__all__ = ["PPL_TEXT", "text_ids", "windows", "reference_logprobs", "engine_logprobs", "perplexity",
           "perplexity_from_logprobs"]

PPL_TEXT = Path("/usr/share/common-licenses/GPL-3")


@functools.lru_cache(maxsize=4)
def _read_ids(tokenizer, path: str) -> tuple:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"perplexity text {path} not found (Debian's license texts, package base-files); "
                                "pass text_path= another long plain-text file")
    return tuple(tokenizer(p.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"])


def text_ids(tokenizer, path=PPL_TEXT) -> list[int]:
    """The token ids of the text at ``path`` (GPL-3 by default)."""
    return list(_read_ids(tokenizer, str(path)))


def windows(ids, *, prompt_tokens: int, target_tokens: int, num_windows: int, seed: int = 0):
    """``[(prompt ids, target ids)]``: ``num_windows`` windows of ``prompt_tokens + target_tokens`` consecutive
    tokens of ``ids`` at seeded offsets (evenly spread, each jittered). ValueError naming the argument when
    the text is too short for one window."""
    prompt_tokens = check_int("prompt_tokens", prompt_tokens, 1)
    target_tokens = check_int("target_tokens", target_tokens, 1)
    num_windows = check_int("num_windows", num_windows, 1)
    seed = check_int("seed", seed, 0)
    span = prompt_tokens + target_tokens
    room = len(ids) - span
    if room < 0:
        raise ValueError(f"prompt_tokens + target_tokens must be at most {len(ids)} (the text's tokens), got "
                         f"{prompt_tokens} + {target_tokens}")
    rng = random.Random(f"ppl:{seed}:{prompt_tokens}:{target_tokens}")
    step = room / num_windows
    out = []
    for i in range(num_windows):
        o = min(room, int(i * step + rng.random() * step))
        out.append((list(ids[o:o + prompt_tokens]), list(ids[o + prompt_tokens:o + span])))
    return out


@torch.inference_mode()
def reference_logprobs(model, prompt_ids, target_ids) -> torch.Tensor:
    """float64 ``[len(target_ids)]``: log p(target_j | prompt, target_<j) from one plain forward of ``model``
    (the full cache, the model's own attention)."""
    ids = torch.tensor([list(prompt_ids) + list(target_ids)], dtype=torch.long, device=model.device)
    n = len(target_ids)
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=n + 1).logits[0, :-1].double()
    lp = torch.log_softmax(logits, dim=-1)
    return lp.gather(1, torch.tensor(list(target_ids), device=lp.device)[:, None])[:, 0].cpu()


def engine_logprobs(engine, prompt_ids, target_ids) -> torch.Tensor:
    """``engine.score(prompt_ids, target_ids)`` (teacher-forced under the engine's eviction) as float64."""
    score = getattr(engine, "score", None)
    if score is None:
        raise RuntimeError("this PagedEngine has no score() (teacher-forced scoring under token eviction); "
                           "use reference_logprobs for the full cache")
    return torch.as_tensor(score(list(prompt_ids), list(target_ids)), dtype=torch.float64).cpu()


def perplexity_from_logprobs(logprobs) -> float:
    """``exp(-mean)`` of the log-probabilities (a tensor or a list of tensors)."""
    if isinstance(logprobs, (list, tuple)):
        logprobs = torch.cat([torch.as_tensor(x, dtype=torch.float64).flatten() for x in logprobs])
    return math.exp(-float(logprobs.double().mean()))


def perplexity(score_fn, windows_) -> dict:
    """Perplexity over ``windows_`` (see :func:`windows`) with ``score_fn(prompt, target) -> log-probs``:
    ``{"perplexity", "nll" (mean negative log-likelihood), "scored_tokens", "window_perplexity": [...]}``."""
    per = [score_fn(p, t) for p, t in windows_]
    return {"perplexity": perplexity_from_logprobs(per), "nll": -float(torch.cat(per).mean()),
            "scored_tokens": int(sum(x.numel() for x in per)),
            "window_perplexity": [perplexity_from_logprobs(x) for x in per]}
