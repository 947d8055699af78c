"""Seeded synthetic workloads, in the same record type as the Mooncake traces.

Every generator returns ``list[Request]`` sorted by arrival time with ``request_id`` equal to the position
in that order, and is deterministic for a given ``seed``. Prompts are given as prefix-chained block hash
ids of ``block_tokens`` tokens each, like the Mooncake traces: the id of block ``k`` names the whole
prefix up to the end of that block (tokens ``[0, min((k+1)*block_tokens, input_length))``), so two
requests share an id exactly when they share that prefix. A request has
``ceil(input_length / block_tokens)`` ids; the last one covers a partial block when ``input_length`` is
not a multiple of ``block_tokens``, and a partial block's id is never reused by a longer prompt (its
content differs once the block fills up). Ids are small integers handed out in order of first use, as in
the traces.

Generators:

- ``zipf_prefix_workload``: a few system prompts of whole blocks, picked with Zipf popularity, each
  followed by a unique user suffix.
- ``multiturn_workload``: conversations whose every turn's prompt is the previous prompt plus the
  previous answer plus a new user message (``session_id`` and ``turn`` set; think-time gaps).
- ``design_mix_workload``: the original design's mix of VISTA caches of 10 MB and DeepSeek-OCR caches
  of 5 MB arriving together (``model`` set to ``"vista"`` or ``"deepseek-ocr"``).
"""

from __future__ import annotations

import math
from typing import Hashable

import numpy as np

from ..checks import check_int, is_int
from ..spec import DESIGN_CACHE_BYTES, PRESETS
from .request import Request

__all__ = ["zipf_prefix_workload", "multiturn_workload", "design_mix_workload", "design_cache_tokens"]


class _ChainIds:
    """Hands out prefix-chained block ids: one id per distinct (parent id, block content) pair."""

    def __init__(self):
        self._ids: dict[tuple, int] = {}

    def get(self, parent: int | None, content: Hashable) -> int:
        key = (parent, content)
        bid = self._ids.get(key)
        if bid is None:
            bid = self._ids[key] = len(self._ids)
        return bid

    def chain(self, contents) -> list[int]:
        out, parent = [], None
        for c in contents:
            parent = self.get(parent, c)
            out.append(parent)
        return out


# ----------------------------------------------------------------------------------------- validation

def _check_int(name: str, v, lo: int = 1) -> int:
    return check_int(name, v, lo)


def _check_range(name: str, v, lo: int = 1) -> tuple[int, int]:
    """An int or an inclusive ``(low, high)`` pair of ints, each >= ``lo``."""
    if is_int(v):
        v = (v, v)
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(is_int(x) for x in v)
            or v[0] < lo or v[1] < v[0]):
        raise ValueError(f"{name} must be an int >= {lo} or a (low, high) pair with {lo} <= low <= high, "
                         f"got {v!r}")
    return int(v[0]), int(v[1])


def _check_pos_float(name: str, v, allow_inf: bool = False) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {v!r}") from None
    if isinstance(v, bool) or not f > 0 or math.isnan(f) or (math.isinf(f) and not allow_inf):
        raise ValueError(f"{name} must be a positive{'' if not allow_inf else ' (or inf)'} number, got {v!r}")
    return f


def _draw(rng: np.random.Generator, r: tuple[int, int]) -> int:
    return int(rng.integers(r[0], r[1] + 1))


def _gaps(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    """Poisson-process inter-arrival gaps (seconds); all zero for an infinite rate."""
    if math.isinf(rate):
        return np.zeros(n)
    return rng.exponential(1.0 / rate, size=n)


def _finish(reqs: list[Request]) -> list[Request]:
    reqs.sort(key=lambda r: (r.arrival_s, r.request_id))
    for i, r in enumerate(reqs):
        r.request_id = i
    return reqs


def _num_blocks(tokens: int, block_tokens: int) -> int:
    return -(-tokens // block_tokens)


# ----------------------------------------------------------------------------------------- generators

def zipf_prefix_workload(num_requests: int, *, num_prefixes: int = 8, zipf_alpha: float = 1.1,
                         prefix_blocks=(2, 6), suffix_tokens=(64, 2048), output_tokens=(16, 256),
                         arrival_rate: float = 4.0, block_tokens: int = 512, seed: int = 0) -> list[Request]:
    """Requests that share system prompts with Zipf popularity, each followed by a unique user suffix.

    System prompt ``i`` (``0 <= i < num_prefixes``) has a fixed length drawn from ``prefix_blocks``
    (whole blocks) and is picked with probability proportional to ``1 / (i + 1) ** zipf_alpha``. The
    suffix length (tokens) is drawn from ``suffix_tokens`` and its blocks are never shared. Arrivals are
    a Poisson process of ``arrival_rate`` requests a second (``inf``: all at time 0). Ranges are ints or
    inclusive ``(low, high)`` pairs drawn uniformly. ``meta["prefix"]`` is the system prompt's index and
    ``meta["prefix_blocks"]`` its length in blocks.
    """
    num_requests = _check_int("num_requests", num_requests)
    num_prefixes = _check_int("num_prefixes", num_prefixes)
    zipf_alpha = float(zipf_alpha)
    if not zipf_alpha >= 0 or math.isinf(zipf_alpha):
        raise ValueError(f"zipf_alpha must be a finite number >= 0, got {zipf_alpha!r}")
    prefix_blocks = _check_range("prefix_blocks", prefix_blocks)
    suffix_tokens = _check_range("suffix_tokens", suffix_tokens)
    output_tokens = _check_range("output_tokens", output_tokens)
    arrival_rate = _check_pos_float("arrival_rate", arrival_rate, allow_inf=True)
    block_tokens = _check_int("block_tokens", block_tokens)

    rng = np.random.default_rng(seed)
    ids = _ChainIds()
    lens = [_draw(rng, prefix_blocks) for _ in range(num_prefixes)]
    weights = 1.0 / np.arange(1, num_prefixes + 1, dtype=np.float64) ** zipf_alpha
    weights /= weights.sum()
    picks = rng.choice(num_prefixes, size=num_requests, p=weights)
    arrivals = np.cumsum(_gaps(rng, num_requests, arrival_rate))
    reqs = []
    for i in range(num_requests):
        p = int(picks[i])
        suffix = _draw(rng, suffix_tokens)
        input_length = lens[p] * block_tokens + suffix
        contents = [("sys", p, k) for k in range(lens[p])]
        contents += [("req", i, k) for k in range(_num_blocks(suffix, block_tokens))]
        reqs.append(Request(request_id=i, arrival_s=float(arrivals[i]), input_length=input_length,
                            output_length=_draw(rng, output_tokens), hash_ids=tuple(ids.chain(contents)),
                            block_tokens=block_tokens, meta={"prefix": p, "prefix_blocks": lens[p]}))
    return _finish(reqs)


def multiturn_workload(num_sessions: int, *, turns=(2, 6), system_prompt_tokens: int = 0,
                       first_user_tokens=(256, 2048), user_tokens=(32, 512), output_tokens=(32, 512),
                       session_rate: float = 1.0, turn_gap_s: float = 20.0, block_tokens: int = 512,
                       seed: int = 0) -> list[Request]:
    """Multi-turn conversations: each turn's prompt extends the previous one.

    Sessions start as a Poisson process of ``session_rate`` a second; a session has a number of turns
    drawn from ``turns``. Turn 0's prompt is an optional system prompt shared by all sessions
    (``system_prompt_tokens``, 0 for none) plus a first user message (``first_user_tokens``); turn
    ``t > 0``'s prompt is turn ``t-1``'s prompt, its answer (``output_length`` tokens) and a new user
    message (``user_tokens``). Turn ``t`` arrives an exponential think time of mean ``turn_gap_s``
    seconds after turn ``t-1`` arrived. Every whole block of the previous context keeps its id, so a
    turn's prompt hits the previous turn's blocks in a prefix cache; the system prompt's whole blocks are
    shared across sessions.
    """
    num_sessions = _check_int("num_sessions", num_sessions)
    turns = _check_range("turns", turns)
    system_prompt_tokens = _check_int("system_prompt_tokens", system_prompt_tokens, lo=0)
    first_user_tokens = _check_range("first_user_tokens", first_user_tokens)
    user_tokens = _check_range("user_tokens", user_tokens)
    output_tokens = _check_range("output_tokens", output_tokens)
    session_rate = _check_pos_float("session_rate", session_rate, allow_inf=True)
    turn_gap_s = _check_pos_float("turn_gap_s", turn_gap_s)
    block_tokens = _check_int("block_tokens", block_tokens)

    rng = np.random.default_rng(seed)
    ids = _ChainIds()
    starts = np.cumsum(_gaps(rng, num_sessions, session_rate))
    reqs: list[Request] = []
    for s in range(num_sessions):
        t_arr = float(starts[s])
        context = system_prompt_tokens + _draw(rng, first_user_tokens)
        for t in range(_draw(rng, turns)):
            if t > 0:
                t_arr += float(rng.exponential(turn_gap_s))
                context += reqs[-1].output_length + _draw(rng, user_tokens)
            full = context // block_tokens
            # Whole blocks inside the system prompt are shared by every session; a block that holds any
            # session token belongs to this session (the chain makes later blocks distinct anyway).
            contents = [("sys", k) if (k + 1) * block_tokens <= system_prompt_tokens else ("s", s, k)
                        for k in range(full)]
            if context % block_tokens:
                contents.append(("s", s, full, "partial", t))
            reqs.append(Request(request_id=len(reqs), arrival_s=t_arr, input_length=context,
                                output_length=_draw(rng, output_tokens), hash_ids=tuple(ids.chain(contents)),
                                block_tokens=block_tokens, session_id=s, turn=t))
    return _finish(reqs)


def design_cache_tokens(model: str) -> int:
    """Tokens in one of the original design's caches of ``model`` ("vista": 10 MB, "deepseek-ocr": 5 MB).

    The design's bytes over the preset's ``bytes_per_token``, rounded down so the K/V fit in the size:
    80 tokens for VISTA (128 KiB a token), 85 for DeepSeek-OCR (60 KiB a token).
    """
    if model not in DESIGN_CACHE_BYTES:
        raise ValueError(f"model must be one of {sorted(DESIGN_CACHE_BYTES)}, got {model!r}")
    return max(1, DESIGN_CACHE_BYTES[model] // PRESETS[model].bytes_per_token)


def design_mix_workload(num_requests: int, *, vista_fraction: float = 0.5, output_tokens=16,
                        arrival_rate: float = 50.0, block_tokens: int = 512,
                        seed: int = 0) -> list[Request]:
    """The original design's mix: VISTA caches of 10 MB and DeepSeek-OCR caches of 5 MB arriving together.

    One Poisson stream of ``arrival_rate`` requests a second; each request is a VISTA request with
    probability ``vista_fraction``, else a DeepSeek-OCR one (``model`` is the preset name). A request's
    whole context (prompt + ``output_tokens`` generated tokens, an int or a range) is the design's cache
    size in that model's K/V (``design_cache_tokens``), so its cache reaches 10 MB / 5 MB when it
    completes. Prompts are unique (no shared prefixes). ``meta["cache_bytes"]`` is the design's size.
    """
    num_requests = _check_int("num_requests", num_requests)
    vf = float(vista_fraction)
    if not 0.0 <= vf <= 1.0:
        raise ValueError(f"vista_fraction must be in [0, 1], got {vista_fraction!r}")
    output_tokens = _check_range("output_tokens", output_tokens)
    arrival_rate = _check_pos_float("arrival_rate", arrival_rate, allow_inf=True)
    block_tokens = _check_int("block_tokens", block_tokens)
    sizes = {m: design_cache_tokens(m) for m in ("vista", "deepseek-ocr")}
    if output_tokens[1] >= min(sizes.values()):
        raise ValueError(f"output_tokens must stay below the smallest cache ({min(sizes.values())} tokens) "
                         f"so the prompt is not empty, got {output_tokens!r}")

    rng = np.random.default_rng(seed)
    ids = _ChainIds()
    arrivals = np.cumsum(_gaps(rng, num_requests, arrival_rate))
    is_vista = rng.random(num_requests) < vf
    reqs = []
    for i in range(num_requests):
        model = "vista" if is_vista[i] else "deepseek-ocr"
        out = _draw(rng, output_tokens)
        inp = sizes[model] - out
        contents = [("req", i, k) for k in range(_num_blocks(inp, block_tokens))]
        reqs.append(Request(request_id=i, arrival_s=float(arrivals[i]), input_length=inp, output_length=out,
                            hash_ids=tuple(ids.chain(contents)), block_tokens=block_tokens, model=model,
                            meta={"cache_bytes": DESIGN_CACHE_BYTES[model]}))
    return _finish(reqs)
