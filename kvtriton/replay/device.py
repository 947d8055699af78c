"""Device replay: a discrete-event serving loop on the memory manager and the real kernels.

``replay_device(requests, model, policy, capacity_blocks=... | budget_bytes=..., config=...)`` serves a
request stream the way a continuous-batching engine does, on real device memory:

- **Clock.** A simulated clock in seconds. Requests arrive at ``arrival_s / config.time_compression``
  (all at 0 with ``ignore_arrivals``). A step advances the clock by its measured wall time (or by
  ``config.step_time_s``, which makes the schedule independent of the machine: deterministic for a seed)
  plus the modelled prefill time of the prompts it admitted, and a compaction by its measured time;
  when nothing runs the clock jumps to the next arrival.
- **Admission.** Arrived requests wait in FIFO order. The head of the queue is admitted while the batch
  has room (``max_batch``) and the pool can hold its prompt: a prefix-cache lookup pins the longest
  cached run of its full prompt blocks (hits, shared), then blocks for the rest are allocated, evicting
  cached blocks under the pool's policy when no block is free. A head that does not fit waits (no
  reordering, so long prompts are not starved).
- **Prefill.** The K/V of the missed tokens are written with ``append_kv`` into every layer (synthetic
  random values, real bytes). No model weights exist, so the prefill's compute is a cost model:
  ``prefill_s = missed_tokens * config.prefill_s_per_token`` (default 1e-4 s: about 10k tokens/s, a
  7-8B model's prefill on one H100), plus the measured ``append_kv`` time. The first output token is
  produced by the prefill.
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

**Metrics** (``DeviceReplayResult.summary``, every key in ``SUMMARY_KEYS``, plain numbers):
``hit_rate`` (prefix-cache block hits over full prompt blocks looked up, first admissions only),
``token_hit_rate`` (``prefill_tokens_saved`` over ``prefill_tokens``), ``prefill_tokens_computed``
(missed tokens written, recomputation included; ``recompute_tokens`` is the part due to preemption),
``evictions``, ``preemptions``, ``queueing_delay_s_*`` (arrival to first admission) and ``ttft_s_*``
(arrival to first token: queueing, the modelled prefill time of the prompts admitted before it in its
step and its own, and the measured ``append_kv`` time) as mean/p50/p95/p99, ``decode_tokens`` and
``decode_tokens_per_s`` (over the wall time of the steps that decoded), ``step_{kernel,memory,other}_s``
and their ``_frac``, ``compactions``/``compaction_s``/``blocks_moved``/``chunks_returned``, and
``utilization_*``/``external_fragmentation_*`` (mean and max over the time series). ``timeseries`` has a
row every ``record_every`` steps: ``step, time_s, batch, waiting, admitted, finished, kernel_s,
memory_s, other_s, prefill_model_s, compaction_s, used_blocks, cached_blocks, free_blocks,
utilization, external_fragmentation, internal_fragmentation, evictions, preemptions, completed,
hit_rate`` (counts cumulative). ``requests`` has a row per request.

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

**Step time split.** ``kernel``: the measured time of ``append_kv`` and ``paged_decode_attention``
(CUDA events around the kernel launches on a GPU, ``perf_counter`` on the CPU); ``memory``: host time in
the memory manager and the replay's block-table bookkeeping (allocation, prefix lookup, release, policy
updates, block-table and slot-mapping uploads); ``other``: the rest of the step's wall time (scheduling,
launch overhead, synchronisation).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext as _nullcontext
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import PoolExhaustedError
from ..memory.hashing import expand_hash_ids
from ..spec import PRESETS, ModelSpec, get_spec, parse_dtype
from ..workloads.request import Request

__all__ = ["DeviceReplayConfig", "DeviceReplayResult", "replay_device", "resolve_device", "SUMMARY_KEYS"]


# ------------------------------------------------------------------------------------------- config

@dataclass
class DeviceReplayConfig:
    """Knobs of ``replay_device``. Scale-down knobs first; all sizes are positive or None (no limit)."""

    device: str = "auto"                      # "auto" (cuda if available else cpu), "cpu", "cuda", "cuda:N"
    max_requests: int | None = None           # replay only the first N requests
    time_compression: float = 1.0             # arrivals at arrival_s / time_compression
    ignore_arrivals: bool = False             # every request arrives at time 0
    num_layers: int | None = None             # override the model shape's layer count
    block_size: int | None = None             # override the model shape's tokens per block
    dtype: str | None = None                  # override the model shape's dtype
    max_input_tokens: int | None = None       # truncate prompts (their hash ids stay prefix-consistent)
    max_output_tokens: int | None = None      # cap generated tokens per request
    max_batch: int = 64                       # running sequences at most (per model)
    prefill_s_per_token: float = 1e-4         # prefill cost model (seconds per missed prompt token)
    step_time_s: float | None = None          # clock: a step lasts this long (None: its measured wall time)
    compaction_threshold: float | None = 0.5  # external fragmentation that triggers compaction; None: never
    compaction_check_every: int = 16          # steps between fragmentation checks
    chunk_bytes: int | None = None            # arena chunk size (None: about 2 MiB, whole blocks)
    preallocate: bool = True                  # claim every arena chunk up front (else grow on demand)
    record_every: int = 1                     # a time-series row every N steps
    check_invariants: bool = False            # validate the pool after every step (slow; for tests)
    warmup: bool | None = None                # compile the kernels before the loop (None: on CUDA only)
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and its allowed values."""
        for name in ("max_requests", "num_layers", "block_size", "max_input_tokens", "max_output_tokens",
                     "chunk_bytes"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"config.{name} must be None or a positive int, got {v!r}")
        for name in ("max_batch", "compaction_check_every", "record_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"config.{name} must be a positive int, got {v!r}")
        if not (isinstance(self.time_compression, (int, float)) and self.time_compression > 0
                and math.isfinite(self.time_compression)):
            raise ValueError(f"config.time_compression must be a positive finite number, "
                             f"got {self.time_compression!r}")
        if not (isinstance(self.prefill_s_per_token, (int, float)) and self.prefill_s_per_token >= 0
                and math.isfinite(self.prefill_s_per_token)):
            raise ValueError(f"config.prefill_s_per_token must be a finite number >= 0, "
                             f"got {self.prefill_s_per_token!r}")
        st = self.step_time_s
        if st is not None and not (isinstance(st, (int, float)) and st >= 0 and math.isfinite(st)):
            raise ValueError(f"config.step_time_s must be None or a finite number >= 0, got {st!r}")
        t = self.compaction_threshold
        if t is not None and not (isinstance(t, (int, float)) and 0.0 <= t < 1.0):
            raise ValueError(f"config.compaction_threshold must be None or in [0, 1), got {t!r}")
        if self.warmup is not None and not isinstance(self.warmup, bool):
            raise ValueError(f"config.warmup must be None, True or False, got {self.warmup!r}")
        if self.dtype is not None:
            parse_dtype(self.dtype)
        resolve_device(self.device)


def resolve_device(device) -> torch.device:
    """``"auto"`` -> cuda if available else cpu; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` checked."""
    if device is None or device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA device is available")
    idx = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= idx < torch.cuda.device_count():
        raise ValueError(f"device index must be in [0, {torch.cuda.device_count()}), got {device!r}")
    return torch.device("cuda", idx)


@dataclass
class DeviceReplayResult:
    """``summary``: plain numbers (see ``SUMMARY_KEYS``); ``timeseries``: one dict a recorded step;
    ``requests``: per-request rows (id, arrival, queueing delay, TTFT, hits, preemptions, finish)."""

    summary: dict
    timeseries: list[dict] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------- internals

class _Seq:
    """Serving state of one request."""

    __slots__ = ("req", "idx", "arrival", "prompt_len", "output_len", "keys", "cache", "blocks",
                 "seq_len", "generated", "slot", "admitted_at", "first_token_at", "finished_at",
                 "preemptions", "hit_blocks", "lookup_blocks", "admissions", "order", "model", "m")

    def __init__(self, req: Request, idx: int, arrival: float, prompt_len: int, output_len: int, keys,
                 model: str):
        self.req, self.idx, self.arrival, self.model = req, idx, arrival, model
        self.m = None             # the model's serving state (_Model)
        self.prompt_len, self.output_len, self.keys = prompt_len, output_len, keys
        self.cache = None
        self.blocks: list[int] = []
        self.seq_len = 0          # tokens whose K/V are in the cache
        self.generated = 0        # output tokens produced so far
        self.slot = -1            # row in the batch block table
        self.admitted_at = None
        self.first_token_at = None
        self.finished_at = None
        self.preemptions = 0
        self.hit_blocks = 0
        self.lookup_blocks = 0
        self.admissions = 0
        self.order = 0            # admission counter; the highest is preempted first

    @property
    def context_len(self) -> int:
        """Tokens whose K/V must be in the cache before the next decode step's new token."""
        return self.prompt_len + max(self.generated - 1, 0)

    @property
    def max_tokens(self) -> int:
        return self.prompt_len + self.output_len - 1


class _Timer:
    """Kernel time: CUDA events around launches on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pending: list = []
        self.host = 0.0

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, token) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._pending.append((token, ev))
        else:
            self.host += time.perf_counter() - token

    def collect(self) -> float:
        """Seconds measured since the last call (synchronises on CUDA)."""
        if self.cuda:
            torch.cuda.synchronize()
            s = sum(a.elapsed_time(b) for a, b in self._pending) / 1e3
            self._pending.clear()
            return s
        s, self.host = self.host, 0.0
        return s


def _percentiles(xs: Sequence[float], prefix: str) -> dict:
    if not xs:
        return {f"{prefix}_mean": 0.0, f"{prefix}_p50": 0.0, f"{prefix}_p95": 0.0, f"{prefix}_p99": 0.0}
    a = np.asarray(xs, dtype=np.float64)
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {f"{prefix}_mean": float(a.mean()), f"{prefix}_p50": float(p50), f"{prefix}_p95": float(p95),
            f"{prefix}_p99": float(p99)}


SUMMARY_KEYS = (
    "device", "model", "policy", "capacity_blocks", "arena_bytes", "block_size", "num_layers", "requests", "completed",
    "steps", "sim_time_s", "wall_s",
    "hit_rate", "token_hit_rate", "lookup_blocks", "hit_blocks", "prefill_tokens", "prefill_tokens_saved",
    "prefill_tokens_computed", "recompute_tokens", "evictions", "preemptions",
    "queueing_delay_s_mean", "queueing_delay_s_p50", "queueing_delay_s_p95", "queueing_delay_s_p99",
    "ttft_s_mean", "ttft_s_p50", "ttft_s_p95", "ttft_s_p99",
    "decode_tokens", "decode_time_s", "decode_tokens_per_s", "decode_kernel_s", "mean_batch",
    "step_kernel_s", "step_memory_s", "step_other_s", "step_total_s",
    "step_kernel_frac", "step_memory_frac", "step_other_frac",
    "prefill_kernel_s", "prefill_model_s", "compactions", "compaction_s", "blocks_moved", "chunks_returned",
    "utilization_mean", "utilization_max", "external_fragmentation_mean", "external_fragmentation_max",
)


def _prepare(requests, cfg: DeviceReplayConfig, specs: dict, by_request: bool):
    """Scale-down, the model of each request and its pool-block keys; ValueError on a bad request."""
    if requests is None or isinstance(requests, (str, bytes)):
        raise ValueError(f"requests must be a non-empty sequence of Request, got {requests!r}")
    reqs = list(requests)
    if cfg.max_requests is not None:
        reqs = reqs[:cfg.max_requests]
    if not reqs:
        raise ValueError("requests is empty: the trace has no requests to replay")
    only = next(iter(specs)) if not by_request else None
    seqs = []
    for i, r in enumerate(reqs):
        if not isinstance(r, Request):
            raise ValueError(f"requests[{i}] must be a Request, got {type(r).__name__}")
        if r.input_length < 1 or r.output_length < 1:
            raise ValueError(f"requests[{i}] (request_id={r.request_id}) needs input_length >= 1 and "
                             f"output_length >= 1, got {r.input_length} and {r.output_length}")
        if r.arrival_s < 0 or not math.isfinite(r.arrival_s):
            raise ValueError(f"requests[{i}] (request_id={r.request_id}) has arrival_s={r.arrival_s}; "
                             f"it must be finite and >= 0")
        name = only if only is not None else r.model
        if name not in specs:
            raise ValueError(f"requests[{i}] (request_id={r.request_id}) has model={r.model!r}; with several "
                             f"models every request's model must be one of {sorted(specs)}")
        spec = specs[name]
        prompt = r.input_length if cfg.max_input_tokens is None else min(r.input_length, cfg.max_input_tokens)
        out = r.output_length if cfg.max_output_tokens is None else min(r.output_length, cfg.max_output_tokens)
        keys = expand_hash_ids(r.hash_ids, r.block_tokens, spec.block_size, prompt) if r.hash_ids else []
        arrival = 0.0 if cfg.ignore_arrivals else r.arrival_s / cfg.time_compression
        seqs.append(_Seq(r, i, arrival, prompt, out, keys, name))
    # the replay serves in arrival order; a stable sort keeps the trace's order among equal times
    seqs.sort(key=lambda s: (s.arrival, s.idx))
    return seqs


def _resolve_models(model, cfg: DeviceReplayConfig) -> tuple[dict[str, ModelSpec], bool]:
    """``{pool name: spec}`` with the config's overrides, and whether requests pick their model."""
    changes = {k: v for k, v in (("num_layers", cfg.num_layers), ("block_size", cfg.block_size),
                                 ("dtype", cfg.dtype)) if v is not None}

    def one(m):
        spec = get_spec(m)
        return spec.with_(**changes) if changes else spec

    if model is None:
        return None, True
    if isinstance(model, dict):
        if not model:
            raise ValueError("model must name at least one model when given as a dict")
        for k in model:
            if not isinstance(k, str) or not k:
                raise ValueError(f"model dict keys must be non-empty pool names (str), got {k!r}")
        return {k: one(v) for k, v in model.items()}, True
    spec = one(model)
    return {spec.name: spec}, False


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
    """
    from ..memory import GPUMemoryAllocator  # the memory package imports ops; keep replay import light
    from ..policies import available_policies, canonical_name, make_policy, offline_policies

    cfg = config if config is not None else DeviceReplayConfig()
    if not isinstance(cfg, DeviceReplayConfig):
        raise ValueError(f"config must be a DeviceReplayConfig, got {type(cfg).__name__}")
    cfg.validate()
    specs, by_request = _resolve_models(model, cfg)
    if specs is None:  # model=None: the presets named by the requests
        names = sorted({r.model for r in (requests or []) if isinstance(r, Request)}, key=str)
        if None in names or not names:
            raise ValueError("model=None needs every request's model field set to a preset name "
                             f"({', '.join(sorted(PRESETS))})")
        specs, by_request = _resolve_models({n: n for n in names}, cfg)
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
    device = resolve_device(cfg.device)

    if (capacity_blocks is None) == (budget_bytes is None):
        raise ValueError("give exactly one of capacity_blocks or budget_bytes")
    multi = len(specs) > 1
    if capacity_blocks is not None:
        if multi:
            raise ValueError(f"with several models ({', '.join(sorted(specs))}) give budget_bytes (the shared "
                             f"arena), not capacity_blocks")
        if isinstance(capacity_blocks, bool) or not isinstance(capacity_blocks, int) or capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be a positive int, got {capacity_blocks!r}")
    else:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 1:
            raise ValueError(f"budget_bytes must be a positive int, got {budget_bytes!r}")
        if not multi:
            spec = next(iter(specs.values()))
            capacity_blocks = budget_bytes // spec.bytes_per_block
            if capacity_blocks < 1:
                raise ValueError(f"budget_bytes={budget_bytes} holds no block of {spec.bytes_per_block} bytes "
                                 f"({spec.name}, block_size={spec.block_size})")

    seqs = _prepare(requests, cfg, specs, by_request)
    for name, spec in specs.items():
        mine = [s for s in seqs if s.model == name]
        if not mine:
            continue
        biggest = max(mine, key=lambda s: s.max_tokens)
        need = spec.blocks_for_tokens(biggest.max_tokens)
        have = capacity_blocks if not multi else budget_bytes // spec.bytes_per_block
        if need > have:
            what = f"capacity of {have} blocks" if not multi else \
                f"budget_bytes={budget_bytes} ({have} blocks of {name!r})"
            raise ValueError(
                f"{what} is below one request's need: request_id={biggest.req.request_id} holds "
                f"{biggest.max_tokens} tokens = {need} blocks of {spec.block_size} tokens; raise the "
                f"capacity or cap max_input_tokens / max_output_tokens")

    with torch.cuda.device(device) if device.type == "cuda" else _nullcontext():
        engine = _Engine(seqs, specs, policy_name, capacity_blocks if not multi else None,
                         budget_bytes if multi else None, cfg, device, GPUMemoryAllocator,
                         policy_kwargs=policy_kwargs)
        try:
            return engine.run(progress, on_step)
        finally:
            engine.close()




def _chunk_blocks(capacity: int, block_bytes: int, target_bytes: int) -> int:
    """Blocks per arena chunk: the largest divisor ``k`` of ``capacity`` with ``k * block_bytes`` at most
    ``target_bytes`` (at least one block) and a multiple of 256, so the arena holds exactly ``capacity``
    blocks. 0 when no divisor gives a multiple of 256."""
    limit = max(1, target_bytes // block_bytes)
    best = 0
    i = 1
    while i * i <= capacity:
        if capacity % i == 0:
            for k in (i, capacity // i):
                if k <= limit and (k * block_bytes) % 256 == 0 and k > best:
                    best = k
        i += 1
    return best


def _make_allocator(allocator_cls, specs: dict, capacity_blocks, budget_bytes, cfg, device):
    """The arena: exactly ``capacity_blocks`` blocks of the one model, or ``budget_bytes`` shared."""
    from ..memory import DEFAULT_CHUNK_BYTES
    if capacity_blocks is not None:
        bb = next(iter(specs.values())).bytes_per_block
        if cfg.chunk_bytes is not None:
            chunk = cfg.chunk_bytes
            budget = -(-capacity_blocks * bb // chunk) * chunk
        else:
            k = _chunk_blocks(capacity_blocks, bb, DEFAULT_CHUNK_BYTES)
            if k == 0:  # odd block sizes: round the arena up to whole 256-byte-aligned chunks
                k = max(1, DEFAULT_CHUNK_BYTES // bb)
                while (k * bb) % 256:
                    k += 1
            chunk = k * bb
            budget = -(-capacity_blocks // k) * chunk
    else:
        chunk = cfg.chunk_bytes or DEFAULT_CHUNK_BYTES
        budget = max(chunk, budget_bytes // chunk * chunk)
    return allocator_cls(devices=[str(device)], budget_bytes=budget, chunk_bytes=chunk).start(), chunk


class _PoolHandle:
    """The replay's use of one ``CachePool`` of the allocator."""

    def __init__(self, alloc, name: str, spec: ModelSpec, policy: str, chunk_bytes: int, preallocate: bool,
                 policy_kwargs: dict | None = None):
        self.pool = alloc.create_pool(name, spec, policy=policy, policy_kwargs=policy_kwargs)
        self.chunk_bytes = chunk_bytes
        self.block_size = spec.block_size
        if preallocate:
            # a serving engine sizes its KV memory once; growing chunk by chunk is timed otherwise
            self.pool.grow(num_blocks=self.pool.num_blocks)
        self._kv = [self.pool.kv(layer) for layer in range(spec.num_layers)]

    def request(self, num_tokens: int, keys, req=None):
        """A cache of ``num_tokens`` tokens whose leading full blocks are keyed by ``keys``;
        ``(cache, hit_blocks)``. ``req`` goes to the policy's ``on_request`` hook. PoolExhaustedError
        leaves the pool unchanged."""
        cache = self.pool.request(num_tokens, block_hashes=keys if keys else None, request=req)
        return cache, cache.num_cached_tokens // self.block_size

    @staticmethod
    def block_ids(cache) -> list[int]:
        return cache.block_ids

    @staticmethod
    def append(cache, n: int):
        """Grow by ``n`` tokens; the block ids added (empty when the last block had room)."""
        before = cache.num_blocks
        cache.append(n)
        if cache.num_blocks == before:
            return ()
        return cache.block_ids[before:]

    def release(self, cache) -> None:
        self.pool.release(cache)

    def layer(self, layer: int):
        return self._kv[layer]

    def stats(self) -> dict:
        return self.pool.stats()

    def reclaimable_chunks(self, st: dict | None = None) -> int:
        """Chunks a compaction could give back: held chunks beyond those the live (used and cached)
        blocks need when packed."""
        st = self.pool.stats() if st is None else st
        per_chunk = max(1.0, self.chunk_bytes / st["block_bytes"])
        live = st["used_blocks"] + st["cached_blocks"]
        return st["chunks_held"] - int(math.ceil(live / per_chunk))

    def compact(self, evict: bool = False) -> tuple[int, int]:
        """Compact the pool (``evict``: its cached blocks go first); ``(chunks given back, blocks moved)``."""
        moved0 = self.pool.stats()["blocks_moved"]
        if evict:
            self.pool.evict()
        chunks = self.pool.compact()
        return chunks, self.pool.stats()["blocks_moved"] - moved0

    def validate(self, running) -> None:
        """The pool's own invariants, and each running sequence's table equal to its cache's."""
        self.pool.validate()
        for s in running:
            assert s.blocks == s.cache.block_ids, f"request {s.req.request_id}: stale block table"
            assert s.seq_len == s.cache.seq_len, f"request {s.req.request_id}: seq_len out of step"


class _Model:
    """One model's serving state: its pool, running batch, host block table and synthetic tensors."""

    def __init__(self, name: str, spec: ModelSpec, pool: _PoolHandle, seqs, cfg: DeviceReplayConfig,
                 device: torch.device, gen: torch.Generator):
        self.name, self.spec, self.pool = name, spec, pool
        H, D, Hq, B, dt = spec.num_kv_heads, spec.head_dim, spec.num_q_heads, cfg.max_batch, spec.dtype
        # Synthetic K/V/Q, drawn once: values do not matter, bytes and kernels do.
        self.q = torch.randn(B, Hq, D, generator=gen, device=device).to(dt)
        self.k_new = torch.randn(B, H, D, generator=gen, device=device).to(dt)
        self.v_new = torch.randn(B, H, D, generator=gen, device=device).to(dt)
        max_tokens = max((s.max_tokens for s in seqs), default=1)
        chunk = min(max_tokens, 8192)
        self.k_fill = torch.randn(chunk, H, D, generator=gen, device=device).to(dt)
        self.v_fill = torch.randn(chunk, H, D, generator=gen, device=device).to(dt)
        self.bt = np.zeros((B, spec.blocks_for_tokens(max_tokens)), dtype=np.int32)
        self.lens = np.zeros(B, dtype=np.int32)
        self.running: list[_Seq] = []
        self.num_layers = spec.num_layers
        self.lookups = self.hits = self.saved = self.prefill_tokens = 0
        self.decode_tokens = self.completed = self.preemptions = 0


class _Engine:
    def __init__(self, seqs, specs: dict, policy: str, capacity_blocks, budget_bytes,
                 cfg: DeviceReplayConfig, device: torch.device, allocator_cls, policy_kwargs=None):
        self.seqs, self.specs, self.policy, self.cfg, self.device = seqs, specs, policy, cfg, device
        self.multi = len(specs) > 1
        self.alloc, chunk = _make_allocator(allocator_cls, specs, capacity_blocks, budget_bytes, cfg, device)
        try:
            gen = torch.Generator(device=device).manual_seed(cfg.seed)
            self.models: dict[str, _Model] = {}
            for name, spec in specs.items():
                # one model owns its arena and claims it up front; several grow into the shared arena
                pool = _PoolHandle(self.alloc, name, spec, policy, chunk, cfg.preallocate and not self.multi,
                                   policy_kwargs)
                mine = [s for s in seqs if s.model == name]
                m = self.models[name] = _Model(name, spec, pool, mine, cfg, device, gen)
                for s in mine:
                    s.m = m
        except BaseException:
            self.alloc.close()
            raise
        arena = next(iter(self.alloc.arenas.values()))
        self.arena_bytes = arena.num_bytes
        # several models share the arena's bytes: no block count bounds them, 0 says so
        self.capacity_blocks = next(iter(self.models.values())).pool.pool.num_blocks if not self.multi else 0
        self.timer = _Timer(device)
        self._order = 0

    def close(self):
        self.alloc.close()

    # ------------------------------------------------------------------------------ bookkeeping
    @staticmethod
    def _set_row(s: _Seq):
        m = s.m
        n = len(s.blocks)
        m.bt[s.slot, :n] = s.blocks
        m.lens[s.slot] = s.seq_len

    def _add_running(self, s: _Seq):
        s.slot = len(s.m.running)
        s.m.running.append(s)
        self._set_row(s)

    def _remove_running(self, s: _Seq):
        running = s.m.running
        last = running.pop()
        if last is not s:
            # keep rows [0, batch) dense: the last sequence takes the leaving one's row
            i = s.slot
            running[i] = last
            last.slot = i
            self._set_row(last)
        s.slot = -1

    def _num_running(self) -> int:
        return sum(len(m.running) for m in self.models.values())

    # ------------------------------------------------------------------------------ phases
    def _admit(self, s: _Seq, now: float) -> int | None:
        """Prefix lookup + allocation for ``s``'s context; its hit blocks, or None (pool unchanged) when
        it does not fit."""
        ctx = s.context_len
        try:
            cache, hit_blocks = s.m.pool.request(ctx, s.keys, s.req)
        except PoolExhaustedError:
            return None
        s.cache, s.blocks = cache, s.m.pool.block_ids(cache)
        first = s.admissions == 0
        s.admissions += 1
        self._order += 1
        s.order = self._order
        if first:
            s.admitted_at = now
            s.lookup_blocks, s.hit_blocks = len(s.keys), hit_blocks
            s.m.lookups += len(s.keys)
            s.m.hits += hit_blocks
        s.seq_len = ctx
        return hit_blocks

    def _prefill(self, s: _Seq, hit_blocks: int) -> tuple[int, float]:
        """Write the K/V of ``s``'s missed tokens into every layer; ``(missed tokens, host seconds spent
        on the slot mapping)``."""
        m = s.m
        bs = m.spec.block_size
        start = hit_blocks * bs
        n = s.seq_len - start
        if n <= 0:
            return 0, 0.0
        t0 = time.perf_counter()
        pos = np.arange(start, s.seq_len)
        blocks = np.asarray(s.blocks, dtype=np.int64)
        slots = torch.from_numpy(blocks[pos // bs] * bs + pos % bs).to(self.device)
        mem = time.perf_counter() - t0
        tok = self.timer.start()
        c = m.k_fill.shape[0]
        for off in range(0, n, c):
            k = min(c, n - off)
            sl = slots[off:off + k]
            for layer in range(m.num_layers):
                kc, vc = m.pool.layer(layer)
                self._append_kv(m.k_fill[:k], m.v_fill[:k], kc, vc, sl)
        self.timer.stop(tok)
        return n, mem

    def _grow(self, s: _Seq) -> bool:
        """One more token slot for ``s``; preempt (the latest admitted of its model first) when its pool
        has no block left. Returns False when ``s`` itself was preempted."""
        m = s.m
        while True:
            try:
                new = m.pool.append(s.cache, 1)
            except PoolExhaustedError:
                victim = max(m.running, key=lambda r: r.order)
                self._preempt(victim)
                if victim is s:
                    return False
                continue
            if new:
                s.blocks.extend(new)
                m.bt[s.slot, len(s.blocks) - len(new):len(s.blocks)] = new
            s.seq_len += 1
            m.lens[s.slot] = s.seq_len
            return True

    def _preempt(self, s: _Seq):
        s.m.pool.release(s.cache)
        s.cache, s.blocks = None, []
        s.preemptions += 1
        s.m.preemptions += 1
        self.preemptions += 1
        self._remove_running(s)
        self.waiting.appendleft(s)

    def _finish(self, s: _Seq):
        s.m.pool.release(s.cache)
        s.cache, s.blocks = None, []
        self._remove_running(s)
        self.completed += 1
        s.m.completed += 1

    def _compact(self, m: _Model, evict: bool = False) -> tuple[int, int]:
        """Compact ``m``'s pool; refresh its running block tables (live blocks may have moved)."""
        chunks, n_moved = m.pool.compact(evict)
        for s in m.running:
            s.blocks = m.pool.block_ids(s.cache)
            self._set_row(s)
        return chunks, n_moved

    def _pool_rows(self) -> dict:
        """Memory figures over every pool: blocks summed, fractions of the bytes."""
        sts = {name: m.pool.stats() for name, m in self.models.items()}
        if not self.multi:
            st = next(iter(sts.values()))
            return {"used_blocks": st["used_blocks"], "cached_blocks": st["cached_blocks"],
                    "free_blocks": st["free_blocks"], "utilization": st["utilization"],
                    "external_fragmentation": st["external_fragmentation"],
                    "internal_fragmentation": st["internal_fragmentation"], "evictions": st["evictions"],
                    "held_bytes": st["held_bytes"]}
        used = sum(st["used_bytes"] for st in sts.values())
        held = sum(st["held_bytes"] for st in sts.values())
        slots = sum(st["used_blocks"] for st in sts.values())
        row = {"used_blocks": slots, "cached_blocks": sum(st["cached_blocks"] for st in sts.values()),
               "free_blocks": sum(st["free_blocks"] for st in sts.values()),
               "utilization": used / self.arena_bytes,
               "external_fragmentation": 1.0 - used / held if held else 0.0,
               "internal_fragmentation": (sum(st["internal_fragmentation"] * st["used_blocks"]
                                              for st in sts.values()) / slots) if slots else 0.0,
               "evictions": sum(st["evictions"] for st in sts.values()), "held_bytes": held}
        for name, st in sts.items():
            row[f"{name}.used_blocks"] = st["used_blocks"]
            row[f"{name}.held_bytes"] = st["held_bytes"]
        return row

    # ------------------------------------------------------------------------------ main loop
    def _warm_up(self):
        """Compile the kernels the loop launches (Triton JIT-compiles on first use, seconds that would
        otherwise land in the first steps' timings), on scratch tensors laid out like the pool's views."""
        from ..ops import move_blocks
        dev = self.device
        for m in self.models.values():
            spec = m.pool.pool.spec
            scratch = torch.zeros((4, *spec.block_shape), dtype=spec.dtype, device=dev)
            kc, vc = scratch[:, 0, 0], scratch[:, 0, 1]
            b = min(2, m.q.shape[0])
            bt = torch.tensor([[0, 1], [2, 3]][:b], dtype=torch.int32, device=dev)
            lens = torch.full((b,), 2 * spec.block_size - 1, dtype=torch.int32, device=dev)
            slots = torch.arange(b, dtype=torch.int64, device=dev)
            self._append_kv(m.k_new[:b], m.v_new[:b], kc, vc, slots)
            for splits in (1, 2):  # the loop may take either variant
                self._attn(m.q[:b], kc, vc, bt, lens, num_splits=splits)
            move_blocks(scratch, torch.tensor([0], device=dev), torch.tensor([3], device=dev))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def run(self, progress: bool, on_step):
        from ..ops import append_kv, paged_decode_attention
        self._append_kv, self._attn = append_kv, paged_decode_attention
        cfg, dev = self.cfg, self.device
        if cfg.warmup or (cfg.warmup is None and dev.type == "cuda"):
            self._warm_up()
        pc = time.perf_counter
        models = list(self.models.values())
        self.waiting: deque[_Seq] = deque()
        self.completed = self.preemptions = 0
        pending = deque(self.seqs)
        total = len(self.seqs)
        bar = _progress_bar(total, progress)
        now = 0.0
        step = 0
        ts: list[dict] = []
        k_s = m_s = o_s = 0.0
        decode_tokens = 0
        decode_time = decode_kernel_s = 0.0
        batch_sum = decode_steps = 0
        prefill_kernel_s = prefill_model_s = 0.0
        prefill_tokens = recompute_tokens = computed_tokens = 0
        compactions, compaction_s, moved, chunks_returned = 0, 0.0, 0, 0
        wall0 = pc()
        start_rows = self._pool_rows()
        while self.completed < total:
            while pending and pending[0].arrival <= now:
                self.waiting.append(pending.popleft())
            if not self._num_running() and not self.waiting:
                now = max(now, pending[0].arrival)
                continue
            t0 = pc()
            mem = 0.0
            model_s = 0.0
            comp_t = 0.0
            # --- admission and prefill, first come first served across models
            admitted = []
            reclaimed = False
            while self.waiting:
                s = self.waiting[0]
                if len(s.m.running) >= cfg.max_batch:
                    break
                ta = pc()
                hits = self._admit(s, now)
                if hits is not None:
                    self._add_running(s)
                mem += pc() - ta
                if hits is None:
                    if self.multi and not s.m.running and not reclaimed:
                        # its pool is idle but the shared arena is held by the others: they drop their
                        # cached blocks and give back the chunks that empties (a timed compaction)
                        reclaimed = True
                        tcmp = pc()
                        for m in models:
                            if m is not s.m:
                                chunks, n_moved = self._compact(m, evict=True)
                                chunks_returned += chunks
                                moved += n_moved
                        if dev.type == "cuda":
                            torch.cuda.synchronize(dev)
                        dt = pc() - tcmp
                        comp_t += dt
                        compaction_s += dt
                        compactions += 1
                        continue
                    break
                self.waiting.popleft()
                admitted.append((s, hits))
            if not self._num_running():
                raise RuntimeError(
                    f"request_id={self.waiting[0].req.request_id} cannot be admitted into idle pools "
                    f"(pool figures: {self._pool_rows()})")
            prefill_kernel = 0.0
            for s, hits in admitted:
                missed, slot_s = self._prefill(s, hits)
                mem += slot_s
                prefill_t = self.timer.collect()
                prefill_kernel += prefill_t
                cost = missed * cfg.prefill_s_per_token
                model_s += cost
                prefill_kernel_s += prefill_t
                prefill_model_s += cost
                computed_tokens += missed
                if s.admissions == 1:
                    prefill_tokens += s.prompt_len
                    s.m.prefill_tokens += s.prompt_len
                    s.first_token_at = now + model_s + (prefill_kernel if cfg.step_time_s is None else 0.0)
                    s.generated = 1
                else:
                    recompute_tokens += missed
            # --- decode: one token per running sequence, per model
            tm = pc()
            finished_now = [s for m in models for s in m.running if s.generated >= s.output_len]
            for s in finished_now:  # one-token outputs are done by their prefill
                self._finish(s)
            launches = []
            for m in models:
                for s in list(m.running):
                    if s.slot >= 0:
                        self._grow(s)
            for m in models:
                b = len(m.running)
                if not b:
                    continue
                bs = m.spec.block_size
                bt = torch.from_numpy(m.bt[:b]).to(dev, non_blocking=True)
                lens = torch.from_numpy(m.lens[:b]).to(dev, non_blocking=True)
                pos = m.lens[:b].astype(np.int64) - 1
                slots = torch.from_numpy(m.bt[np.arange(b), pos // bs].astype(np.int64) * bs
                                         + pos % bs).to(dev, non_blocking=True)
                launches.append((m, b, bt, lens, slots))
            mem += pc() - tm
            kernel = 0.0
            batch = sum(b for _, b, *_ in launches)
            if launches:
                tok = self.timer.start()
                for m, b, bt, lens, slots in launches:
                    q, kn, vn = m.q[:b], m.k_new[:b], m.v_new[:b]
                    for layer in range(m.num_layers):
                        kc, vc = m.pool.layer(layer)
                        self._append_kv(kn, vn, kc, vc, slots)
                        self._attn(q, kc, vc, bt, lens)
                self.timer.stop(tok)
                kernel = self.timer.collect()
                decode_kernel_s += kernel
                for m, b, *_ in launches:
                    for s in m.running:
                        s.generated += 1
                    m.decode_tokens += b
                decode_tokens += batch
                batch_sum += batch
            # --- completion
            tc = pc()
            done = [s for m in models for s in m.running if s.generated >= s.output_len]
            for s in done:
                self._finish(s)
            finished_now += done
            mem += pc() - tc
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            wall = pc() - t0 - comp_t
            kernel += prefill_kernel
            other = max(wall - kernel - mem, 0.0)
            k_s += kernel
            m_s += mem
            o_s += other
            if batch:
                decode_time += wall
                decode_steps += 1
            step += 1
            end = now + (wall if cfg.step_time_s is None else cfg.step_time_s) + model_s
            for s in finished_now:
                s.finished_at = end
            # --- compaction (timed apart from the step)
            if cfg.compaction_threshold is not None and step % cfg.compaction_check_every == 0:
                for m in models:
                    st = m.pool.stats()
                    # cached blocks count as fragmentation in the pool's figure but a compaction keeps
                    # them, so it runs only when it can give chunks back
                    if st["external_fragmentation"] > cfg.compaction_threshold and m.pool.reclaimable_chunks(st) > 0:
                        tcmp = pc()
                        chunks, n_moved = self._compact(m)
                        if dev.type == "cuda":
                            torch.cuda.synchronize(dev)
                        dt = pc() - tcmp
                        comp_t += dt
                        compactions += 1
                        compaction_s += dt
                        moved += n_moved
                        chunks_returned += chunks
            now = end + (comp_t if cfg.step_time_s is None else 0.0)
            if cfg.check_invariants:
                for m in models:
                    m.pool.validate(m.running)
                    for s in m.running:
                        n = len(s.blocks)
                        assert list(m.bt[s.slot, :n]) == s.blocks and m.lens[s.slot] == s.seq_len
            if bar is not None:
                bar.update(len(finished_now))
            if step % cfg.record_every == 0:
                pr = self._pool_rows()
                lookups = sum(m.lookups for m in models)
                row = {"step": step, "time_s": now, "batch": batch, "waiting": len(self.waiting),
                       "admitted": len(admitted), "finished": len(finished_now),
                       "kernel_s": kernel, "memory_s": mem, "other_s": other,
                       "prefill_model_s": model_s, "compaction_s": comp_t, **pr,
                       "evictions": pr["evictions"] - start_rows["evictions"],
                       "preemptions": self.preemptions, "completed": self.completed,
                       "hit_rate": sum(m.hits for m in models) / lookups if lookups else 0.0}
                ts.append(row)
                if on_step is not None:
                    on_step(row)
        if bar is not None:
            bar.close()
        wall_total = pc() - wall0
        final = self._pool_rows()
        rows = []
        qd, ttft = [], []
        for s in sorted(self.seqs, key=lambda s: s.idx):
            qd.append(s.admitted_at - s.arrival)
            ttft.append(s.first_token_at - s.arrival)
            rows.append({"request_id": s.req.request_id, "model": s.model, "arrival_s": s.arrival,
                         "prompt_tokens": s.prompt_len, "output_tokens": s.output_len,
                         "lookup_blocks": s.lookup_blocks, "hit_blocks": s.hit_blocks,
                         "queueing_delay_s": s.admitted_at - s.arrival, "ttft_s": s.first_token_at - s.arrival,
                         "finished_s": s.finished_at, "preemptions": s.preemptions})
        lookups = sum(m.lookups for m in models)
        hits = sum(m.hits for m in models)
        saved = sum(m.hits * m.spec.block_size for m in models)
        step_total = k_s + m_s + o_s
        util = [r["utilization"] for r in ts] or [final["utilization"]]
        frag = [r["external_fragmentation"] for r in ts] or [final["external_fragmentation"]]
        first = models[0].spec
        summary = {
            "device": str(dev), "model": ",".join(self.models), "policy": self.policy,
            "capacity_blocks": self.capacity_blocks, "arena_bytes": self.arena_bytes,
            "block_size": first.block_size if len({m.spec.block_size for m in models}) == 1 else 0,
            "num_layers": first.num_layers if len({m.spec.num_layers for m in models}) == 1 else 0,
            "requests": total, "completed": self.completed, "steps": step,
            "sim_time_s": now, "wall_s": wall_total,
            "hit_rate": hits / lookups if lookups else 0.0,
            "token_hit_rate": saved / prefill_tokens if prefill_tokens else 0.0,
            "lookup_blocks": lookups, "hit_blocks": hits,
            "prefill_tokens": prefill_tokens, "prefill_tokens_saved": saved,
            "prefill_tokens_computed": computed_tokens, "recompute_tokens": recompute_tokens,
            "evictions": final["evictions"] - start_rows["evictions"], "preemptions": self.preemptions,
            **_percentiles(qd, "queueing_delay_s"), **_percentiles(ttft, "ttft_s"),
            "decode_tokens": decode_tokens, "decode_time_s": decode_time,
            "decode_tokens_per_s": decode_tokens / decode_time if decode_time else 0.0,
            "decode_kernel_s": decode_kernel_s,
            "mean_batch": batch_sum / decode_steps if decode_steps else 0.0,
            "step_kernel_s": k_s, "step_memory_s": m_s, "step_other_s": o_s, "step_total_s": step_total,
            "step_kernel_frac": k_s / step_total if step_total else 0.0,
            "step_memory_frac": m_s / step_total if step_total else 0.0,
            "step_other_frac": o_s / step_total if step_total else 0.0,
            "prefill_kernel_s": prefill_kernel_s, "prefill_model_s": prefill_model_s,
            "compactions": compactions, "compaction_s": compaction_s, "blocks_moved": moved,
            "chunks_returned": chunks_returned,
            "utilization_mean": float(np.mean(util)), "utilization_max": float(np.max(util)),
            "external_fragmentation_mean": float(np.mean(frag)),
            "external_fragmentation_max": float(np.max(frag)),
        }
        if self.multi:
            for m in models:
                summary[f"{m.name}.requests"] = sum(1 for s in self.seqs if s.m is m)
                summary[f"{m.name}.completed"] = m.completed
                summary[f"{m.name}.hit_rate"] = m.hits / m.lookups if m.lookups else 0.0
                summary[f"{m.name}.prefill_tokens"] = m.prefill_tokens
                summary[f"{m.name}.decode_tokens"] = m.decode_tokens
                summary[f"{m.name}.preemptions"] = m.preemptions
        return DeviceReplayResult(summary=summary, timeseries=ts, requests=rows, config=asdict(self.cfg))


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is a convenience; the replay runs without it
        return None
    return tqdm(total=total, desc="device replay", unit="req")
