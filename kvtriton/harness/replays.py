"""Running a replay: the fast (tensor-free) simulation or the serving-loop replay on a device, their results
as flat metric dicts and time-series rows, and one result from several repeats."""

from __future__ import annotations

import dataclasses
import inspect
import re

from omegaconf import DictConfig

from .config import device_knobs, plain
from kvtriton.checks import is_number


_SERIES_KEYS = ("series", "time_series", "timeseries", "steps")


def _split(out) -> tuple[dict, list[dict]]:
    """A replay's result as (scalar metrics, time-series rows)."""
    series: list[dict] = []
    if isinstance(out, tuple) and len(out) == 2:
        out, series = out
    if hasattr(out, "to_dict") and not isinstance(out, dict):  # a result dataclass with to_dict()
        out = out.to_dict()
    elif hasattr(out, "__dataclass_fields__"):
        out = dataclasses.asdict(out)
    metrics = {}
    for k, v in dict(out).items():
        if k in _SERIES_KEYS and v is not None:
            series = v
        elif isinstance(v, dict):
            for k2, v2 in v.items():
                if is_scalar(v2):
                    metrics[f"{k}.{k2}"] = _scalar(v2)
        elif is_scalar(v):
            metrics[k] = _scalar(v)
    return metrics, _rows(series)


def is_scalar(v) -> bool:
    """Whether ``v`` goes into a metric dict as it is: a Python scalar, None, or a 0-d array/tensor."""
    return isinstance(v, (int, float, str, bool)) or v is None or (hasattr(v, "item") and getattr(v, "ndim", 1) == 0)


def _scalar(v):
    return v.item() if hasattr(v, "item") else v


def _rows(series) -> list[dict]:
    if series is None:
        return []
    if hasattr(series, "to_dict") and hasattr(series, "columns"):  # a DataFrame
        return [{k: _scalar(v) for k, v in r.items()} for r in series.to_dict("records")]
    if isinstance(series, dict):  # columns -> lists
        keys = list(series)
        n = len(series[keys[0]]) if keys else 0
        return [{k: _scalar(series[k][i]) for k in keys} for i in range(n)]
    return [{k: _scalar(v) for k, v in dict(r).items()} for r in series]


def block_unit(requests) -> int | None:
    """Tokens per block of a workload (its requests' ``block_tokens``; None where they differ)."""
    units = {getattr(r, "block_tokens", None) for r in requests}
    return units.pop() if len(units) == 1 and None not in units else None


def _capacity_unit(metrics: dict, block_tokens) -> None:
    """``block_tokens`` and ``capacity_tokens`` beside ``capacity_blocks``, so that a fast and a device
    result (512-token workload blocks, ``block_size``-token pool blocks) compare."""
    cap = metrics.get("capacity_blocks")
    metrics["block_tokens"] = int(block_tokens) if block_tokens else None
    metrics["capacity_tokens"] = (int(cap) * int(block_tokens) if isinstance(cap, int) and cap > 0 and block_tokens
                                  else None)


def run_fast(cfg: DictConfig, requests: list, progress: bool) -> tuple[dict, list[dict]]:
    """The fast (tensor-free) prefix-cache simulation of ``cfg.policy`` at ``cfg.pool.capacity_blocks``.

    ``replay.params`` go to ``simulate`` (``order``; ``sample_every``: a series point every N requests,
    by default about 200 points)."""
    from kvtriton.replay import fast

    params = dict(plain(cfg.replay.params) or {})
    every = params.pop("sample_every", None) or max(1, len(requests) // 200)
    kwargs = dict(sample_every=int(every), policy_kwargs=plain(cfg.policy.params) or None, **params)
    if "progress" in inspect.signature(fast.simulate).parameters:
        kwargs["progress"] = progress
    out = fast.simulate(requests, str(cfg.policy.name), int(cfg.pool.capacity_blocks), **kwargs)
    metrics, series = _split(out)
    if metrics.get("seconds"):
        metrics["sim_block_refs_per_s"] = metrics.get("references", 0) / metrics["seconds"]
    _capacity_unit(metrics, block_unit(requests))
    for i, row in enumerate(series):
        row.setdefault("step", i)
    return metrics, series


def replay_knobs(cfg: DictConfig) -> dict:
    """``replay.<field>`` for every field of ``DeviceReplayConfig``, as plain values."""
    return {f.name: plain(cfg.replay[f.name]) for f in device_knobs()}


def device_replay_config(cfg: DictConfig, device: str):
    """The ``DeviceReplayConfig`` of ``cfg`` on ``device``: its fields are ``replay.<field>`` as they are."""
    from kvtriton.replay import DeviceReplayConfig

    return DeviceReplayConfig(**dict(replay_knobs(cfg), device=device))


def run_device(cfg: DictConfig, requests: list, device: str, progress: bool) -> tuple[dict, list[dict]]:
    """The serving-loop replay on ``device`` with the real kernels and the memory manager."""
    from kvtriton.replay import replay_device

    dcfg = device_replay_config(cfg, device)
    cap, budget = cfg.pool.capacity_blocks, cfg.pool.budget_mb
    size = {"budget_bytes": int(float(budget) * 2**20)} if budget is not None else {"capacity_blocks": int(cap)}
    model = None if cfg.model.preset == "per_request" else str(cfg.model.preset)
    out = replay_device(requests, model, str(cfg.policy.name), config=dcfg,
                        progress=progress, policy_kwargs=plain(cfg.policy.params) or None, **size)
    metrics = {k: _scalar(v) for k, v in out.summary.items() if is_scalar(v)}
    _capacity_unit(metrics, metrics.get("block_size") or None)
    return metrics, _rows(out.timeseries)


# Timings: what a repeat measures anew (seconds, rates, shares of step time). ``combine_repeats`` gives each
# its spread over the repeats.
_TIMING = re.compile(r"(^seconds$|_s$|_s_(mean|p\d+)$|_per_s$|_frac$)")


def is_timing(key: str) -> bool:
    """Whether metric ``key`` is a measured time, rate or share of time (it varies between repeats)."""
    return bool(_TIMING.search(key))


def combine_repeats(runs: list[tuple[dict, list[dict]]]) -> tuple[dict, list[dict]]:
    """One result from ``repeats`` runs of one config: each number is the median over the runs, and every
    timing (``is_timing``), and any other number that differed between runs, gets ``<key>_min``,
    ``<key>_max`` and ``<key>_std`` (sample standard deviation) beside it; ``repeats`` says how many. The
    time series is the first run's."""
    import statistics

    first, series = runs[0]
    out = dict(first)
    out["repeats"] = len(runs)
    if len(runs) == 1:
        return out, series
    for key, v in first.items():
        values = [m.get(key) for m, _ in runs]
        if not all(is_number(x) for x in values):
            continue
        same = len(set(values)) == 1
        out[key] = values[0] if same else statistics.median(values)
        if is_timing(key) or not same:
            out[f"{key}_min"], out[f"{key}_max"] = min(values), max(values)
            out[f"{key}_std"] = statistics.stdev(values)
    return out, series
