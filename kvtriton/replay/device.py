"""Device replay: a discrete-event serving loop on the memory manager and the real kernels.

``replay_device(requests, model, policy, capacity_blocks=... | budget_bytes=..., config=...)`` serves a
request stream the way a continuous-batching engine does, on real device memory:

- **Clock.** A simulated clock in seconds. Requests arrive at ``arrival_s / config.time_compression``
  (all at 0 with ``ignore_arrivals``). A step advances the clock by its measured wall time (or by
  ``config.step_time_s``, which makes the schedule independent of the machine: deterministic for a seed,
  the measured kernel times left out) plus the cost model's prefill time of the prompts it admitted, and
  a compaction by its measured time; when nothing runs the clock jumps to the next arrival.
- **Admission.** Arrived requests wait in FIFO order. The head of the queue is admitted while the batch
  has room (``max_batch``) and the pool can hold its prompt: a prefix-cache lookup pins the longest
  cached run of its full prompt blocks (hits, shared), then blocks for the rest are allocated, evicting
  cached blocks under the pool's policy when no block is free. A head that does not fit waits (no
  reordering, so long prompts are not starved).
- **Prefill.** The K/V of the missed tokens are written with ``append_kv`` into every layer (synthetic
  random values, real bytes); then ``paged_prefill_attention`` runs over every layer for the missed
  tokens of all the sequences the step admitted, one batched call per layer and model (synthetic
  queries, ``num_q_heads`` of the model shape): the missed part attends to its prefix in the pages
  (prefix hits read from the cache) and causally to itself. So the prefill's attention time is
  measured, not modelled. What has no kernel here, the projections and the MLP (no model weights run),
  is a cost model: ``missed_tokens * config.prefill_s_per_token``. Its default, 1e-4 s (about 10k
  tokens/s, a 7-8B model's prefill on one H100), was the whole prefill's figure and stays as the linear
  layers' one: at the traces' prompt lengths attention is a few percent of a 7-8B model's prefill FLOPs
  (4·t·Hq·D per layer for a token at position t against 2·params: about 4% for Llama-3-8B at 2048-token
  prompts). A prompt's prefill time is its cost-model time, its measured ``append_kv`` time and its share
  of the step's attention time (each model's measured time shared in proportion to the query-key pairs a
  prompt computes: ``n * p + n * (n + 1) / 2`` for ``n`` missed tokens after ``p`` cached ones). The
  prompts of a step are charged one after another in admission order, and the first output token of a
  prompt comes at the end of its own prefill. With ``step_time_s`` the measured kernel times stay out of
  the clock and TTFT (only the cost model counts), so the schedule stays machine-independent. A prompt
  wholly in the cache computes nothing. Memory stays bounded at any shape: the synthetic K/V written per
  ``append_kv`` call and the queries per attention call are at most 8192 tokens
  (``engine.PREFILL_CHUNK_TOKENS``); a step with more missed tokens makes several calls per layer, and a
  longer prompt is cut into chunks, each attending to its prefix and the chunks before it (chunked
  prefill).
- **Decode.** Every step appends one token to each running sequence (a new block when the last one is
  full) and runs ``paged_decode_attention`` over each layer of the model shape for the whole batch.
  When a sequence needs a block and none is free or evictable, the most recently admitted running
  sequence is preempted by recompute: its blocks are released (its full prompt blocks stay cached,
  evictable) and it goes back to the front of the queue; on readmission it recomputes its prompt and
  the tokens generated so far.
- **Completion.** A sequence that has produced ``output_length`` tokens releases its cache; its full
  prompt blocks stay in the prefix cache, evictable under the policy (last blocks first).
- **Compaction.** Every ``compaction_check_every`` steps the pool's external fragmentation is read;
  above ``compaction_threshold``, and when packing the live (used and cached) blocks would empty at
  least one chunk, the pool is compacted (``CachePool.compact``: live blocks moved with
  ``move_blocks``, emptied chunks returned to the arena, block tables updated), timed apart from the
  steps. The pool claims all its chunks up front (``preallocate``) and grows back into returned ones
  on demand.

**Trace blocks to pool blocks.** A request's ``hash_ids`` name prefixes of ``block_tokens`` tokens (512
in the Mooncake traces); pool blocks hold ``block_size`` tokens (16 by default). Pool block ``k`` covers
tokens ``[k*block_size, (k+1)*block_size)`` and is keyed by the trace id covering its last token together
with its end position (``kvtriton.memory.hashing.expand_hash_ids``): each 512-token trace block becomes
``512 / block_size`` pool blocks with derived hashes, equal prefixes get equal keys, and different
positions inside one trace block get different keys. Only full pool blocks of the prompt are keyed (a
partial last block is private, as in vLLM, because decode writes into it).

**Metrics**: ``DeviceReplayResult.summary`` (every key in ``SUMMARY_KEYS``), ``timeseries`` (a row every
``record_every`` steps, ``TIMESERIES_KEYS``) and ``requests`` (a row per request, ``REQUEST_KEYS``);
what each means: :mod:`kvtriton.replay.metrics`.

**Several models.** With ``model`` a dict ``{name: spec}`` (or None: the presets the requests name),
each model gets its own ``CachePool`` in ONE arena of ``budget_bytes`` (the original design's VISTA and
DeepSeek-OCR pools): pools grow into free chunks on demand, a request is served by the pool its
``model`` field names, admission stays first come first served across models, ``max_batch`` bounds each
model's batch, a sequence that needs a block preempts within its own pool, and a request whose pool is
idle but cannot get memory makes the other pools evict their cached blocks and compact, giving chunks
back (counted as a compaction). Each step runs every model's kernels. The summary adds
``<model>.{requests, completed, hit_rate, prefill_tokens, decode_tokens, preemptions}`` and the time
series ``<model>.{used_blocks, held_bytes}``; ``capacity_blocks`` is 0 (``arena_bytes`` bounds them).
With one model the request's ``model`` field is not consulted.

**Step time split.** ``kernel``: the measured time of ``append_kv``, ``paged_prefill_attention`` and
``paged_decode_attention`` (CUDA events around the kernel launches on a GPU, ``perf_counter`` on the
CPU; the prefill attention's part is ``prefill_attention_s``, in the summary, the time series and each
request's row); ``memory``: host time in the memory manager and the replay's block-table bookkeeping
(allocation, prefix lookup, release, policy updates, block-table, slot-mapping and prefill-index
uploads); ``other``: the rest of the step's wall time (scheduling,
launch overhead, synchronisation).
**Modules.** ``device`` (this: the entry point and its argument checks), ``device_config`` (the knobs and
the result), ``sequences`` (requests to sequences and pool-block keys), ``engine`` (the loop, one small
method per phase), ``metrics`` (every counter, the summary and the time series).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Sequence

import torch

from ..checks import check_int
from ..devices import resolve_device
from ..spec import PRESETS
from ..workloads.request import Request
from .device_config import DeviceReplayConfig, DeviceReplayResult
from .engine import ReplayEngine
from .metrics import REQUEST_KEYS, SUMMARY_KEYS, TIMESERIES_KEYS
from .sequences import largest_needs, prepare_sequences, resolve_models

__all__ = ["DeviceReplayConfig", "DeviceReplayResult", "replay_device", "resolve_device", "SUMMARY_KEYS",
           "TIMESERIES_KEYS", "REQUEST_KEYS"]

# the Hydra harness (kvtriton/harness/param_checks.py) checks a workload against these before a run
_resolve_models = resolve_models
_prepare = prepare_sequences


def replay_device(requests: Sequence[Request], model="tiny", policy: str = "lru", *,
                  capacity_blocks: int | None = None, budget_bytes: int | None = None,
                  config: DeviceReplayConfig | None = None, progress: bool = False,
                  on_step: Callable[[dict], None] | None = None,
                  policy_kwargs: dict | None = None) -> DeviceReplayResult:
    """Serve ``requests`` on the device with pools of the model shapes under eviction ``policy``.

    ``model``: a ``ModelSpec`` or preset name (one pool serves every request); or a dict
    ``{name: ModelSpec or preset}``, or None (each request's ``model`` field names its preset), for
    several pools drawing chunks from one shared arena, each request served by the pool its ``model``
    field names. ``config`` may override layers, block size and dtype of every model.
    Memory: ``capacity_blocks`` (one model: blocks of ``block_size`` tokens) or ``budget_bytes`` (the
    arena; required with several models), exactly one of the two. ``progress``: a tqdm bar (if tqdm is
    installed). ``on_step``: called with each recorded time-series row. Returns a
    ``DeviceReplayResult`` (``summary`` keys: ``SUMMARY_KEYS``, plus ``<model>.<key>`` per model when
    there are several). Every argument is checked before any device memory is touched.

    ``config.compute="model"`` runs ``config.hf_model``'s forward passes instead of the cost model
    (:func:`kvtriton.replay.model_replay.replay_model`; ``model`` is then only the harness's shape, unused).
    The summary's ``compute`` says which ran.
    """
    from ..memory import GPUMemoryAllocator  # the memory package imports ops; keep replay import light

    cfg = _check_config(config)
    if cfg.compute == "model":  # the model's forward passes (kvtriton.replay.model_replay)
        from .model_replay import replay_model

        if model is not None and not isinstance(model, str) and not hasattr(model, "num_layers"):
            raise ValueError("compute='model' serves one model (config.hf_model); model must be one shape, "
                             f"got {type(model).__name__}")
        return replay_model(requests, _check_policy(policy, policy_kwargs), capacity_blocks=capacity_blocks,
                            budget_bytes=budget_bytes, config=cfg, policy_kwargs=policy_kwargs, on_step=on_step)
    specs, by_request = _model_specs(model, requests, cfg)
    policy_name = _check_policy(policy, policy_kwargs)
    device = resolve_device(cfg.device, name="config.device")
    capacity_blocks, budget_bytes = _check_memory(specs, capacity_blocks, budget_bytes)
    seqs = prepare_sequences(requests, cfg, specs, by_request)
    _check_fits(seqs, specs, capacity_blocks, budget_bytes)
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        engine = ReplayEngine(seqs, specs, policy_name, capacity_blocks, budget_bytes, cfg, device,
                              GPUMemoryAllocator, policy_kwargs=policy_kwargs)
        try:
            return engine.run(progress, on_step)
        finally:
            engine.close()


def _check_config(config) -> DeviceReplayConfig:
    cfg = config if config is not None else DeviceReplayConfig()
    if not isinstance(cfg, DeviceReplayConfig):
        raise ValueError(f"config must be a DeviceReplayConfig, got {type(cfg).__name__}")
    cfg.validate()
    return cfg


def _model_specs(model, requests, cfg: DeviceReplayConfig) -> tuple[dict, bool]:
    """``({pool name: spec}, whether requests pick their model)``; ``model=None``: the presets the
    requests name."""
    specs, by_request = resolve_models(model, cfg)
    if specs is None:
        names = sorted({r.model for r in (requests or []) if isinstance(r, Request)}, key=str)
        if None in names or not names:
            raise ValueError("model=None needs every request's model field set to a preset name "
                             f"({', '.join(sorted(PRESETS))})")
        specs, by_request = resolve_models({n: n for n in names}, cfg)
    return specs, by_request


def _check_policy(policy, policy_kwargs) -> str:
    """The policy's registered name; ValueError for an unknown, offline or badly parameterised one."""
    from ..policies import available_policies, canonical_name, make_policy, offline_policies

    policy_name = canonical_name(policy)
    if policy_kwargs is not None and not isinstance(policy_kwargs, dict):
        raise ValueError(f"policy_kwargs must be a dict of {policy_name}'s constructor arguments, "
                         f"got {policy_kwargs!r}")
    if policy_kwargs:
        try:  # bad arguments fail here, before any work
            make_policy(policy_name, **policy_kwargs)
        except TypeError as e:
            raise ValueError(f"policy_kwargs {sorted(policy_kwargs)} do not fit policy {policy_name!r}: {e}") from e
    if policy_name in offline_policies():
        valid = [p for p in available_policies() if p not in offline_policies()]
        raise ValueError(f"policy {policy!r} needs the trace's future and runs in the fast replay "
                         f"(kvtriton.replay.miss_ratio_curve); device replay policies: {', '.join(valid)}")
    return policy_name


def _check_memory(specs: dict, capacity_blocks, budget_bytes) -> tuple[int | None, int | None]:
    """``(capacity_blocks, budget_bytes)`` with exactly one set: one model gets a block count (from the
    budget when given in bytes), several share ``budget_bytes``."""
    if (capacity_blocks is None) == (budget_bytes is None):
        raise ValueError("give exactly one of capacity_blocks or budget_bytes")
    if len(specs) > 1:
        if capacity_blocks is not None:
            raise ValueError(f"with several models ({', '.join(sorted(specs))}) give budget_bytes (the shared "
                             f"arena), not capacity_blocks")
        _check_positive("budget_bytes", budget_bytes)
        return None, budget_bytes
    if capacity_blocks is not None:
        _check_positive("capacity_blocks", capacity_blocks)
        return capacity_blocks, None
    _check_positive("budget_bytes", budget_bytes)
    spec = next(iter(specs.values()))
    capacity_blocks = budget_bytes // spec.bytes_per_block
    if capacity_blocks < 1:
        raise ValueError(f"budget_bytes={budget_bytes} holds no block of {spec.bytes_per_block} bytes "
                         f"({spec.name}, block_size={spec.block_size})")
    return capacity_blocks, None


def _check_positive(name: str, v) -> None:
    check_int(name, v, 1, allowed="a positive int")


def _check_fits(seqs, specs: dict, capacity_blocks, budget_bytes) -> None:
    """ValueError when a pool cannot hold its largest request (it could never finish)."""
    multi = len(specs) > 1
    for name, spec, biggest, need in largest_needs(seqs, specs):
        have = capacity_blocks if not multi else budget_bytes // spec.bytes_per_block
        if need > have:
            what = f"capacity of {have} blocks" if not multi else \
                f"budget_bytes={budget_bytes} ({have} blocks of {name!r})"
            raise ValueError(
                f"{what} is below one request's need: request_id={biggest.req.request_id} holds "
                f"{biggest.max_tokens} tokens = {need} blocks of {spec.block_size} tokens; raise the "
                f"capacity or cap max_input_tokens / max_output_tokens")
