"""One quality evaluation (a strategy, a budget, a task) on a real model through ``PagedEngine``, and sweeps.

``evaluate`` runs ``num_samples`` prompts of a retrieval task (``kvtriton.quality.tasks``) through
``PagedEngine.generate`` (greedy), or ``num_samples`` windows of the perplexity text through
``PagedEngine.score`` (``kvtriton.quality.perplexity``), with the strategy's eviction applied by the engine,
and returns one flat row: the quality (``accuracy`` and ``partial`` for retrieval, ``perplexity`` and
``nll`` for the text), the KV tokens and bytes held, and the time. The full cache is ``strategy="full"``
(or None): the engine without eviction; its perplexity comes from ``engine.score`` where the engine has
it, else from the plain forward of ``perplexity.reference_logprobs`` (the row says which, ``scorer``).

``sweep`` runs strategies x budgets x tasks, with the full cache once per task as the reference row.
"""

from __future__ import annotations

import inspect
import json
import math
import statistics
import time
from pathlib import Path

import torch

from ..checks import check_int
from . import perplexity as ppl
from . import tasks as T
from .config import FULL, QUALITY_TASKS, QualityConfig, check_budget, check_strategy_name

__all__ = ["evaluate", "sweep", "load_model", "engine_supports_eviction", "evaluate_config"]


def engine_supports_eviction() -> bool:
    """Whether ``kvtriton.hf.PagedEngine`` takes ``token_eviction=`` (token eviction in the engine)."""
    from ..hf import PagedEngine

    return "token_eviction" in inspect.signature(PagedEngine.__init__).parameters


_MODELS: dict = {}


def load_model(model: str = "smollm2", *, device: str = "cpu", dtype: str = "float32"):
    """``(model, tokenizer)``: ``smollm2`` or a local model path (``kvtriton.hf.load_smollm2``), loaded once
    per process (a sweep's jobs share it)."""
    from ..hf import load_smollm2

    key = (str(model), str(device), str(dtype))
    if key not in _MODELS:
        _MODELS.clear()                     # one model in memory at a time
        _MODELS[key] = load_smollm2(None if model in (None, "smollm2") else model, device=device, dtype=dtype)
    return _MODELS[key]


def _check_args(strategy, budget, task, context_tokens, num_samples, seed, depth):
    strategy = check_strategy_name(strategy)
    budget = check_budget(budget)
    if task not in QUALITY_TASKS:
        raise ValueError(f"task must be one of {', '.join(QUALITY_TASKS)}, got {task!r}")
    check_int("context_tokens", context_tokens, 1)
    check_int("num_samples", num_samples, 1)
    check_int("seed", seed, 0)
    if depth is not None:
        T.check_depth(depth)
    return strategy, budget


def _engine(model, strategy, budget, *, num_tokens: int, block_size: int, strategy_kwargs, pyramid):
    from ..hf import PagedEngine

    kw = dict(block_size=block_size, num_blocks=num_tokens // block_size + 16, policy="lru")
    if strategy != FULL:
        if not engine_supports_eviction():
            raise RuntimeError(f"strategy={strategy!r} needs token eviction in kvtriton.hf.PagedEngine "
                               "(token_eviction=...), which this version does not have; use strategy='full'")
        kw.update(token_eviction=strategy, token_budget=budget, token_eviction_kwargs=dict(strategy_kwargs or {}),
                  pyramid=bool(pyramid))
    return PagedEngine(model, **kw)


def _engine_row(engine) -> dict:
    """One request's figures from ``engine.stats()`` (reset before it): KV held at the peak per layer and
    summed over layers, bytes, the decode step time, and the strategy's own time."""
    st = engine.stats()
    log = engine.step_log()
    dec = [s["ms"] for s in log if s["prefill_tokens"] == 0]
    row = {"kv_tokens_held": st.get("kv_tokens_per_layer_peak"), "kv_bytes_held": st.get("kv_bytes_held_peak"),
           "kv_read_fraction": st.get("kv_read_fraction", 1.0), "score_s": st.get("score_s", 0.0),
           "compact_s": st.get("compact_s", 0.0), "tokens_evicted": st.get("tokens_evicted", 0),
           "decode_step_ms": statistics.fmean(dec) if dec else float("nan"),
           "prefill_s": sum(s["ms"] for s in log if s["prefill_tokens"] > 0) / 1e3}
    return row


def _mean_rows(rows: list[dict]) -> dict:
    out = {}
    for k in rows[0]:
        vals = [r[k] for r in rows if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
        vals = [v for v in vals if v == v]
        out[k] = statistics.fmean(vals) if vals else float("nan")
    return out


def _run_each(engine, items, run_one) -> list:
    """``run_one(item)`` for each item on ``engine``, its stats reset before: ``[(result, engine row)]``."""
    out = []
    for item in items:
        engine.reset_stats()
        res = run_one(item)
        out.append((res, _engine_row(engine)))
    return out


def _retrieval(model, tokenizer, strategy, budget, task, samples, *, max_new_tokens, block_size, strategy_kwargs,
               pyramid) -> dict:
    total = max(s.prompt_tokens for s in samples) + max_new_tokens
    with _engine(model, strategy, budget, num_tokens=total, block_size=block_size, strategy_kwargs=strategy_kwargs,
                 pyramid=pyramid) as engine:
        runs = _run_each(engine, samples, lambda s: engine.generate([s.prompt_ids], max_new_tokens=max_new_tokens)[0])
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o, _ in runs]
    row = _mean_rows([r for _, r in runs])
    exact = [T.exact_match(t, s.answer) for t, s in zip(texts, samples)]
    part = [T.partial_match(t, s.answer) for t, s in zip(texts, samples)]
    row.update(accuracy=statistics.fmean(exact), partial=statistics.fmean(part), quality=statistics.fmean(exact),
               answers=json.dumps([{"answer": s.answer, "output": t, "depth": round(s.depth, 3), "ok": bool(e)}
                                   for s, t, e in zip(samples, texts, exact)]))
    return row


def _perplexity(model, tokenizer, strategy, budget, wins, *, block_size, strategy_kwargs, pyramid,
                scorer: str = "engine") -> dict:
    total = max(len(p) + len(t) for p, t in wins)
    with _engine(model, strategy, budget, num_tokens=total, block_size=block_size, strategy_kwargs=strategy_kwargs,
                 pyramid=pyramid) as engine:
        if scorer == "reference" or getattr(engine, "score", None) is None:
            if strategy != FULL:
                raise RuntimeError("the perplexity under eviction needs PagedEngine.score")
            scorer = "reference"
            lps = [ppl.reference_logprobs(model, p, t) for p, t in wins]
            held = statistics.fmean(len(p) + len(t) - 1 for p, t in wins)
            row = {"kv_tokens_held": held, "kv_bytes_held": held * engine.spec.bytes_per_token}
        else:
            runs = _run_each(engine, wins, lambda w: ppl.engine_logprobs(engine, *w))
            lps = [lp for lp, _ in runs]
            row = _mean_rows([r for _, r in runs])
    row.update(perplexity=ppl.perplexity_from_logprobs(lps), nll=-float(torch.cat(lps).mean()),
               scored_tokens=int(sum(x.numel() for x in lps)), scorer=scorer,
               window_perplexity=json.dumps([round(ppl.perplexity_from_logprobs(x), 4) for x in lps]))
    row["quality"] = row["perplexity"]
    return row


def evaluate(model, tokenizer, *, strategy=FULL, budget=1.0, task: str = "passkey", context_tokens: int = 512,
             num_samples: int = 3, seed: int = 0, depth: float | None = None, max_new_tokens: int = 10,
             ppl_tokens: int = 64, block_size: int = 16, strategy_kwargs: dict | None = None,
             pyramid: bool = False, scorer: str = "engine") -> dict:
    """Quality of ``strategy`` at ``budget`` on ``task`` (see the module docstring): a flat dict.

    Keys: ``strategy`` (``full`` for the full cache), ``budget`` (1.0 for the full cache), ``task``,
    ``context_tokens`` (requested) and ``prompt_tokens`` (mean actual), ``num_samples``; ``quality`` (the
    task's measure: ``accuracy`` for retrieval, ``perplexity`` for the text), ``accuracy`` and ``partial``
    (retrieval; exact and per-digit), ``perplexity``, ``nll`` and ``scorer`` (text); ``kv_tokens_held``
    and ``kv_bytes_held`` (mean per request at its end), ``kv_fraction`` (of the full cache's tokens),
    ``decode_step_ms``, ``prefill_s`` and ``eval_s``; ``engine.*`` the engine's eviction counters and times.
    ValueError naming the argument for an unknown task or strategy (the valid names listed), a budget
    outside (0, 1] and below 1 token, a depth outside [0, 1], a context too short for the task.
    ``scorer="reference"`` scores the full cache's perplexity by a plain forward instead of ``engine.score``.
    """
    if scorer not in ("engine", "reference"):
        raise ValueError(f"scorer must be one of engine, reference, got {scorer!r}")
    strategy, budget = _check_args(strategy, budget, task, context_tokens, num_samples, seed, depth)
    t0 = time.perf_counter()
    common = dict(block_size=block_size, strategy_kwargs=strategy_kwargs, pyramid=pyramid)
    run_budget = 1.0 if strategy == FULL else budget
    if task == "perplexity":
        wins = ppl.windows(ppl.text_ids(tokenizer), prompt_tokens=context_tokens,
                           target_tokens=check_int("ppl_tokens", ppl_tokens, 1), num_windows=num_samples, seed=seed)
        row = _perplexity(model, tokenizer, strategy, run_budget, wins, scorer=scorer, **common)
        prompt_tokens, full_tokens = float(context_tokens), context_tokens + ppl_tokens - 1
    else:
        samples = T.make_samples(task, tokenizer, context_tokens=context_tokens, num_samples=num_samples, seed=seed,
                                 depth=depth)
        row = _retrieval(model, tokenizer, strategy, run_budget, task, samples,
                         max_new_tokens=check_int("max_new_tokens", max_new_tokens, 1), **common)
        prompt_tokens = statistics.fmean(s.prompt_tokens for s in samples)
        full_tokens = prompt_tokens + max_new_tokens - 1
    out = {"strategy": strategy, "budget": run_budget, "task": task, "context_tokens": context_tokens,
           "prompt_tokens": prompt_tokens, "num_samples": num_samples, "seed": seed}
    out.update(row)
    out["kv_fraction"] = out["kv_tokens_held"] / full_tokens if full_tokens else math.nan
    out["eval_s"] = time.perf_counter() - t0
    return out


def sweep(model, tokenizer, *, strategies, budgets, tasks, context_tokens: int = 512, num_samples: int = 3,
          seed: int = 0, out=None, progress: bool = False, **kw) -> list[dict]:
    """``evaluate`` over strategies x budgets x tasks; the full cache (``full`` among ``strategies`` or
    not) runs once per task as the reference row (``budget`` 1.0). Rows are appended to the JSON-lines file
    ``out`` as they come, when given. Returns the rows."""
    strategies = [check_strategy_name(s, "strategies") for s in strategies]
    budgets = [check_budget(b, "budgets") for b in budgets]
    for t in tasks:
        if t not in QUALITY_TASKS:
            raise ValueError(f"tasks must hold names from {', '.join(QUALITY_TASKS)}, got {t!r}")
    jobs = []
    for task in tasks:
        jobs.append((FULL, 1.0, task))
        jobs.extend((s, b, task) for s in strategies if s != FULL for b in budgets)
    rows = []
    for i, (s, b, task) in enumerate(jobs):
        row = evaluate(model, tokenizer, strategy=s, budget=b, task=task, context_tokens=context_tokens,
                       num_samples=num_samples, seed=seed, **kw)
        rows.append(row)
        if out is not None:
            with open(Path(out), "a") as f:
                f.write(json.dumps(row) + "\n")
        if progress:
            print(f"[{i + 1}/{len(jobs)}] {task} {s} {b}: quality={row['quality']:.4g} "
                  f"kv_tokens={row['kv_tokens_held']:.0f} ({row['eval_s']:.1f} s)", flush=True)
    return rows


_FULL_ROWS: dict = {}


def evaluate_config(cfg: QualityConfig, device: str = "cpu") -> dict:
    """``evaluate`` of one ``QualityConfig`` (the harness's entry): the model loaded once per process, and the
    full cache evaluated once per process for each task and setting (a sweep's full-cache jobs at several
    budgets repeat it)."""
    cfg.validate()
    model, tok = load_model(cfg.model, device=device, dtype=cfg.dtype)
    args = dict(strategy=cfg.strategy, budget=cfg.budget, task=cfg.task, context_tokens=cfg.context_tokens,
                num_samples=cfg.num_samples, seed=cfg.seed, depth=cfg.depth, max_new_tokens=cfg.max_new_tokens,
                ppl_tokens=cfg.ppl_tokens, block_size=cfg.block_size, strategy_kwargs=dict(cfg.strategy_kwargs),
                pyramid=cfg.pyramid)
    if check_strategy_name(cfg.strategy) != FULL:
        row = evaluate(model, tok, **args)
    else:
        key = json.dumps([cfg.model, device, cfg.dtype, {k: v for k, v in args.items() if k != "budget"}],
                         sort_keys=True, default=str)
        if key not in _FULL_ROWS:
            _FULL_ROWS[key] = evaluate(model, tok, **args)
        row = dict(_FULL_ROWS[key])
    row["model"] = cfg.model
    row["device"] = device
    return row
