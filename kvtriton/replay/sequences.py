"""Requests as the device replay serves them: the model shapes, the scaled-down sequences and their
pool-block keys, checked before any device memory is touched."""

from __future__ import annotations

import math

from ..memory.hashing import expand_hash_ids
from ..spec import ModelSpec, get_spec
from ..workloads.request import Request
from .device_config import DeviceReplayConfig

__all__ = ["SequenceState", "prepare_sequences", "resolve_models", "largest_needs"]


class SequenceState:
    """Serving state of one request."""

    __slots__ = ("req", "idx", "arrival", "prompt_len", "output_len", "keys", "cache", "blocks",
                 "seq_len", "generated", "slot", "admitted_at", "first_token_at", "finished_at",
                 "preemptions", "hit_blocks", "lookup_blocks", "admissions", "order", "model", "m",
                 "prefill_attention_s")

    def __init__(self, req: Request, idx: int, arrival: float, prompt_len: int, output_len: int, keys,
                 model: str):
        self.req, self.idx, self.arrival, self.model = req, idx, arrival, model
        self.m = None             # the model's serving state (the engine's ModelBatch)
        self.prompt_len, self.output_len, self.keys = prompt_len, output_len, keys
        self.cache = None         # its VirtualKVCache while admitted
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
        self.prefill_attention_s = 0.0  # its share of the measured prefill attention of its first admission

    @property
    def context_len(self) -> int:
        """Tokens whose K/V must be in the cache before the next decode step's new token."""
        return self.prompt_len + max(self.generated - 1, 0)

    @property
    def max_tokens(self) -> int:
        return self.prompt_len + self.output_len - 1


def prepare_sequences(requests, cfg: DeviceReplayConfig, specs: dict, by_request: bool) -> list[SequenceState]:
    """Scale-down, the model of each request and its pool-block keys, in arrival order; ValueError on a
    bad request."""
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
        _check_request(i, r)
        name = only if only is not None else r.model
        if name not in specs:
            raise ValueError(f"requests[{i}] (request_id={r.request_id}) has model={r.model!r}; with several "
                             f"models every request's model must be one of {sorted(specs)}")
        spec = specs[name]
        prompt = r.input_length if cfg.max_input_tokens is None else min(r.input_length, cfg.max_input_tokens)
        out = r.output_length if cfg.max_output_tokens is None else min(r.output_length, cfg.max_output_tokens)
        keys = expand_hash_ids(r.hash_ids, r.block_tokens, spec.block_size, prompt) if r.hash_ids else []
        arrival = 0.0 if cfg.ignore_arrivals else r.arrival_s / cfg.time_compression
        seqs.append(SequenceState(r, i, arrival, prompt, out, keys, name))
    # the replay serves in arrival order; a stable sort keeps the trace's order among equal times
    seqs.sort(key=lambda s: (s.arrival, s.idx))
    return seqs


def _check_request(i: int, r) -> None:
    if not isinstance(r, Request):
        raise ValueError(f"requests[{i}] must be a Request, got {type(r).__name__}")
    if r.input_length < 1 or r.output_length < 1:
        raise ValueError(f"requests[{i}] (request_id={r.request_id}) needs input_length >= 1 and "
                         f"output_length >= 1, got {r.input_length} and {r.output_length}")
    if r.arrival_s < 0 or not math.isfinite(r.arrival_s):
        raise ValueError(f"requests[{i}] (request_id={r.request_id}) has arrival_s={r.arrival_s}; "
                         f"it must be finite and >= 0")


def resolve_models(model, cfg: DeviceReplayConfig) -> tuple[dict[str, ModelSpec] | None, bool]:
    """``({pool name: spec}, whether requests pick their model)`` with the config's overrides; ``(None,
    True)`` for ``model=None`` (the presets the requests name)."""
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


def largest_needs(seqs, specs: dict) -> list[tuple[str, ModelSpec, SequenceState, int]]:
    """Per pool with requests: ``(pool, spec, its largest sequence, the blocks that one needs)``. A pool
    smaller than that could never finish the request; the replay and the harness both refuse it."""
    out = []
    for name, spec in specs.items():
        mine = [s for s in seqs if s.model == name]
        if mine:
            biggest = max(mine, key=lambda s: s.max_tokens)
            out.append((name, spec, biggest, spec.blocks_for_tokens(biggest.max_tokens)))
    return out
