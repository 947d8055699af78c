"""What the device replay measures: counters, per-step records, the summary and the time series.

The engine's phases fill a :class:`StepRecord` per step and report events (a prefix lookup, a prefill,
a preemption, a completion, a compaction) to one :class:`ReplayMetrics`, which keeps every counter and
produces the time-series rows (``record``), the summary (``summary``) and the per-request rows
(``request_rows``). A new metric is a counter here, the event that moves it, and its key below.

Summary keys (``SUMMARY_KEYS``, plain numbers): ``hit_rate`` (prefix-cache block hits over full prompt
blocks looked up, first admissions only), ``token_hit_rate`` (``prefill_tokens_saved`` over
``prefill_tokens``), ``prefill_tokens_computed`` (missed tokens written, recomputation included;
``recompute_tokens`` is the part due to preemption), ``evictions``, ``preemptions``,
``queueing_delay_s_*`` (arrival to first admission) and ``ttft_s_*`` (arrival to first token: queueing,
then the prefill of the prompts admitted before it in its step and its own: the cost model's projections
and MLP, and on the measured clock their ``append_kv`` time and their shares of the step's
``paged_prefill_attention`` time) as mean/p50/p95/p99, ``prefill_attention_s_*`` (a request's share of the
measured prefill attention of its first admission, the part of its TTFT that attention takes on the
measured clock) as mean/p50/p95/p99, ``decode_tokens`` and ``decode_tokens_per_s`` (over the wall
time of the steps that decoded), ``step_{kernel,memory,other}_s`` and their ``_frac``,
``prefill_kernel_s`` (measured prefill kernels: ``append_kv`` and ``paged_prefill_attention``, recomputation
included), ``prefill_attention_s`` (its ``paged_prefill_attention`` part), ``prefill_model_s`` (the cost
model's projections and MLP), ``compactions``/``compaction_s``/``blocks_moved``/``chunks_returned``, and
``utilization_*``/``external_fragmentation_*`` (mean and max over the time series), and ``compute``
(``"cost_model"`` here; the model replay, :mod:`kvtriton.replay.model_replay`, says ``"model"``). ``timeseries`` has a
row every ``record_every`` steps (``TIMESERIES_KEYS``, counts cumulative); ``requests`` a row per request
(``REQUEST_KEYS``). With several models the summary adds ``<model>.<key>`` for ``MODEL_KEYS`` and each
time-series row ``<model>.used_blocks`` and ``<model>.held_bytes`` after ``held_bytes``.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from ..percentiles import percentile_summary

__all__ = ["SUMMARY_KEYS", "TIMESERIES_KEYS", "POOL_KEYS", "REQUEST_KEYS", "MODEL_KEYS", "percentiles",
           "pool_figures", "KernelTimer", "ModelCounters", "StepRecord", "ReplayMetrics"]

SUMMARY_KEYS = (
    "device", "model", "policy", "capacity_blocks", "arena_bytes", "block_size", "num_layers", "requests", "completed",
    "steps", "sim_time_s", "wall_s",
    "hit_rate", "token_hit_rate", "lookup_blocks", "hit_blocks", "prefill_tokens", "prefill_tokens_saved",
    "prefill_tokens_computed", "recompute_tokens", "evictions", "preemptions",
    "queueing_delay_s_mean", "queueing_delay_s_p50", "queueing_delay_s_p95", "queueing_delay_s_p99",
    "ttft_s_mean", "ttft_s_p50", "ttft_s_p95", "ttft_s_p99",
    "prefill_attention_s_mean", "prefill_attention_s_p50", "prefill_attention_s_p95", "prefill_attention_s_p99",
    "decode_tokens", "decode_time_s", "decode_tokens_per_s", "decode_kernel_s", "mean_batch",
    "step_kernel_s", "step_memory_s", "step_other_s", "step_total_s",
    "step_kernel_frac", "step_memory_frac", "step_other_frac",
    "prefill_kernel_s", "prefill_attention_s", "prefill_model_s",
    "compactions", "compaction_s", "blocks_moved", "chunks_returned",
    "utilization_mean", "utilization_max", "external_fragmentation_mean", "external_fragmentation_max",
    "compute",
)
# Memory figures over every pool (``pool_figures``): blocks summed, fractions of the bytes.
POOL_KEYS = ("used_blocks", "cached_blocks", "free_blocks", "utilization", "external_fragmentation",
             "internal_fragmentation", "evictions", "held_bytes")
# Every time-series row, in this order (counts cumulative: evictions, preemptions, completed;
# prefill_attention_s is the paged_prefill_attention part of kernel_s).
TIMESERIES_KEYS = ("step", "time_s", "batch", "waiting", "admitted", "finished", "kernel_s", "memory_s",
                   "other_s", "prefill_model_s", "prefill_attention_s", "compaction_s", *POOL_KEYS, "preemptions",
                   "completed", "hit_rate")
REQUEST_KEYS = ("request_id", "model", "arrival_s", "prompt_tokens", "output_tokens", "lookup_blocks",
                "hit_blocks", "queueing_delay_s", "ttft_s", "prefill_attention_s", "finished_s", "preemptions")
MODEL_KEYS = ("requests", "completed", "hit_rate", "prefill_tokens", "decode_tokens", "preemptions")


def percentiles(values: Sequence[float], prefix: str) -> dict:
    """``{prefix}_mean``, ``_p50``, ``_p95``, ``_p99`` of ``values`` (all 0.0 when empty; linear
    interpolation, :func:`kvtriton.percentiles.percentile_summary`)."""
    return percentile_summary(values, (50, 95, 99), prefix=prefix)


def _frac(a: float, b: float) -> float:
    return a / b if b else 0.0


def pool_figures(stats: dict[str, dict], arena_bytes: int) -> dict:
    """``POOL_KEYS`` over the pools' ``CachePool.stats()`` (``{name: stats}``); with several pools also
    ``<name>.used_blocks`` and ``<name>.held_bytes``, fractions taken of the shared arena's bytes."""
    if len(stats) == 1:
        st = next(iter(stats.values()))
        return {k: st[k] for k in POOL_KEYS}
    sts = stats.values()
    used = sum(st["used_bytes"] for st in sts)
    held = sum(st["held_bytes"] for st in sts)
    slots = sum(st["used_blocks"] for st in sts)
    row = {"used_blocks": slots, "cached_blocks": sum(st["cached_blocks"] for st in sts),
           "free_blocks": sum(st["free_blocks"] for st in sts),
           "utilization": used / arena_bytes,
           "external_fragmentation": 1.0 - used / held if held else 0.0,
           "internal_fragmentation": (sum(st["internal_fragmentation"] * st["used_blocks"]
                                          for st in sts) / slots) if slots else 0.0,
           "evictions": sum(st["evictions"] for st in sts), "held_bytes": held}
    for name, st in stats.items():
        row[f"{name}.used_blocks"] = st["used_blocks"]
        row[f"{name}.held_bytes"] = st["held_bytes"]
    return row


class KernelTimer:
    """Kernel time: CUDA events around launches on a GPU, ``perf_counter`` on the CPU."""

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


class ModelCounters:
    """One model's counts (summed over models for the totals; reported per model with several)."""

    __slots__ = ("name", "block_size", "requests", "lookups", "hits", "prefill_tokens", "decode_tokens",
                 "completed", "preemptions")

    def __init__(self, name: str, block_size: int, requests: int):
        self.name, self.block_size, self.requests = name, block_size, requests
        self.lookups = self.hits = self.prefill_tokens = 0
        self.decode_tokens = self.completed = self.preemptions = 0


class StepRecord:
    """What one step did and how long its parts took; the engine's phases fill it in turn.

    Times in seconds: ``memory_s`` host time in the memory manager and the block-table bookkeeping,
    ``prefill_kernel_s``/``decode_kernel_s`` measured kernels (``prefill_attention_s`` the
    ``paged_prefill_attention`` part of the prefill's), ``prefill_model_s`` the prefill cost model
    (projections and MLP), ``compaction_s`` compactions (timed apart from the step), ``wall_s`` the
    step's wall time without compactions; ``kernel_s`` and ``other_s`` (the rest of the wall time) are
    set when it closes.
    """

    __slots__ = ("admitted", "finished", "batch", "memory_s", "prefill_kernel_s", "prefill_attention_s",
                 "prefill_model_s", "decode_kernel_s", "compaction_s", "wall_s", "kernel_s", "other_s")

    def __init__(self):
        self.admitted: list = []   # (sequence, hit blocks), in admission order
        self.finished: list = []   # sequences completed by this step
        self.batch = 0             # sequences decoded, over every model
        self.memory_s = self.prefill_kernel_s = self.prefill_attention_s = self.prefill_model_s = 0.0
        self.decode_kernel_s = self.compaction_s = self.wall_s = self.kernel_s = self.other_s = 0.0


class ReplayMetrics:
    """Every counter of one replay; produces the time-series rows, the summary and the request rows."""

    def __init__(self, models: Sequence[ModelCounters], record_every: int = 1):
        self.models = list(models)
        self.record_every = record_every
        self.timeseries: list[dict] = []
        self.steps = self.completed = self.preemptions = 0
        self.kernel_s = self.memory_s = self.other_s = 0.0
        self.decode_tokens = self.decode_steps = 0
        self.decode_time_s = self.decode_kernel_s = 0.0
        self.prefill_tokens = self.prefill_tokens_computed = self.recompute_tokens = 0
        self.prefill_kernel_s = self.prefill_attention_s = self.prefill_model_s = 0.0
        self.compactions = self.blocks_moved = self.chunks_returned = 0
        self.compaction_s = 0.0
        self.start_evictions = 0

    # ------------------------------------------------------------------------------ events
    def start(self, pool_row: dict) -> None:
        """The pools' figures before the first step (evictions count from here)."""
        self.start_evictions = pool_row["evictions"]

    @staticmethod
    def on_lookup(counts: ModelCounters, lookup_blocks: int, hit_blocks: int) -> None:
        """A first admission's prefix lookup."""
        counts.lookups += lookup_blocks
        counts.hits += hit_blocks

    def on_prefill(self, counts: ModelCounters, prompt_tokens: int, missed: int, kernel_s: float,
                   model_s: float, first: bool, attention_s: float = 0.0) -> None:
        """A prefill of ``missed`` tokens: a first admission's prompt, or a recomputation after preemption.
        ``kernel_s``: its measured kernels, ``attention_s`` of them its prefill attention; ``model_s``: the
        cost model's projections and MLP."""
        self.prefill_kernel_s += kernel_s
        self.prefill_attention_s += attention_s
        self.prefill_model_s += model_s
        self.prefill_tokens_computed += missed
        if first:
            self.prefill_tokens += prompt_tokens
            counts.prefill_tokens += prompt_tokens
        else:
            self.recompute_tokens += missed

    def on_preempt(self, counts: ModelCounters) -> None:
        self.preemptions += 1
        counts.preemptions += 1

    def on_finish(self, counts: ModelCounters) -> None:
        self.completed += 1
        counts.completed += 1

    def on_compaction(self, seconds: float, chunks_returned: int, blocks_moved: int) -> None:
        self.compactions += 1
        self.compaction_s += seconds
        self.blocks_moved += blocks_moved
        self.chunks_returned += chunks_returned

    def close_step(self, st: StepRecord) -> None:
        """Add a finished step (``st.wall_s`` set) to the totals; sets ``st.kernel_s`` and ``st.other_s``."""
        st.kernel_s = kernel = st.decode_kernel_s + st.prefill_kernel_s
        st.other_s = other = max(st.wall_s - kernel - st.memory_s, 0.0)
        self.kernel_s += kernel
        self.memory_s += st.memory_s
        self.other_s += other
        if st.batch:
            self.decode_kernel_s += st.decode_kernel_s
            self.decode_tokens += st.batch
            self.decode_time_s += st.wall_s
            self.decode_steps += 1
        self.steps += 1

    def due(self) -> bool:
        """Whether the step just closed gets a time-series row (every ``record_every`` steps)."""
        return self.steps % self.record_every == 0

    def record(self, st: StepRecord, time_s: float, pool_row: dict, waiting: int) -> dict:
        """The time-series row of the step just closed (``TIMESERIES_KEYS``), appended and returned."""
        lookups = sum(c.lookups for c in self.models)
        row = {"step": self.steps, "time_s": time_s, "batch": st.batch, "waiting": waiting,
               "admitted": len(st.admitted), "finished": len(st.finished),
               "kernel_s": st.kernel_s, "memory_s": st.memory_s, "other_s": st.other_s,
               "prefill_model_s": st.prefill_model_s, "prefill_attention_s": st.prefill_attention_s,
               "compaction_s": st.compaction_s, **pool_row,
               "evictions": pool_row["evictions"] - self.start_evictions,
               "preemptions": self.preemptions, "completed": self.completed,
               "hit_rate": sum(c.hits for c in self.models) / lookups if lookups else 0.0}
        self.timeseries.append(row)
        return row

    # ------------------------------------------------------------------------------ reports
    @staticmethod
    def request_rows(seqs) -> list[dict]:
        """A row per request (``REQUEST_KEYS``), in trace order."""
        return [{"request_id": s.req.request_id, "model": s.model, "arrival_s": s.arrival,
                 "prompt_tokens": s.prompt_len, "output_tokens": s.output_len,
                 "lookup_blocks": s.lookup_blocks, "hit_blocks": s.hit_blocks,
                 "queueing_delay_s": s.admitted_at - s.arrival, "ttft_s": s.first_token_at - s.arrival,
                 "prefill_attention_s": s.prefill_attention_s, "finished_s": s.finished_at,
                 "preemptions": s.preemptions}
                for s in sorted(seqs, key=lambda s: s.idx)]

    def summary(self, header: dict, requests: list[dict], final_pool_row: dict, sim_time_s: float,
                wall_s: float) -> dict:
        """``SUMMARY_KEYS`` (``header`` gives ``device`` .. ``num_layers``), then ``<model>.<key>`` per
        model when there are several."""
        lookups = sum(c.lookups for c in self.models)
        hits = sum(c.hits for c in self.models)
        saved = sum(c.hits * c.block_size for c in self.models)
        total = self.kernel_s + self.memory_s + self.other_s
        ts, final = self.timeseries, final_pool_row
        util = [r["utilization"] for r in ts] or [final["utilization"]]
        frag = [r["external_fragmentation"] for r in ts] or [final["external_fragmentation"]]
        summary = {
            **header, "requests": len(requests), "completed": self.completed, "steps": self.steps,
            "sim_time_s": sim_time_s, "wall_s": wall_s,
            "hit_rate": _frac(hits, lookups), "token_hit_rate": _frac(saved, self.prefill_tokens),
            "lookup_blocks": lookups, "hit_blocks": hits,
            "prefill_tokens": self.prefill_tokens, "prefill_tokens_saved": saved,
            "prefill_tokens_computed": self.prefill_tokens_computed, "recompute_tokens": self.recompute_tokens,
            "evictions": final["evictions"] - self.start_evictions, "preemptions": self.preemptions,
            **percentiles([r["queueing_delay_s"] for r in requests], "queueing_delay_s"),
            **percentiles([r["ttft_s"] for r in requests], "ttft_s"),
            **percentiles([r["prefill_attention_s"] for r in requests], "prefill_attention_s"),
            "decode_tokens": self.decode_tokens, "decode_time_s": self.decode_time_s,
            "decode_tokens_per_s": _frac(self.decode_tokens, self.decode_time_s),
            "decode_kernel_s": self.decode_kernel_s, "mean_batch": _frac(self.decode_tokens, self.decode_steps),
            "step_kernel_s": self.kernel_s, "step_memory_s": self.memory_s, "step_other_s": self.other_s,
            "step_total_s": total, "step_kernel_frac": _frac(self.kernel_s, total),
            "step_memory_frac": _frac(self.memory_s, total), "step_other_frac": _frac(self.other_s, total),
            "prefill_kernel_s": self.prefill_kernel_s, "prefill_attention_s": self.prefill_attention_s,
            "prefill_model_s": self.prefill_model_s,
            "compactions": self.compactions, "compaction_s": self.compaction_s,
            "blocks_moved": self.blocks_moved, "chunks_returned": self.chunks_returned,
            "utilization_mean": float(np.mean(util)), "utilization_max": float(np.max(util)),
            "external_fragmentation_mean": float(np.mean(frag)),
            "external_fragmentation_max": float(np.max(frag)),
            "compute": "cost_model",  # prefill projections and MLP modelled (compute=model runs the model)
        }
        if len(self.models) > 1:
            for c in self.models:
                summary.update({f"{c.name}.requests": c.requests, f"{c.name}.completed": c.completed,
                                f"{c.name}.hit_rate": _frac(c.hits, c.lookups),
                                f"{c.name}.prefill_tokens": c.prefill_tokens,
                                f"{c.name}.decode_tokens": c.decode_tokens, f"{c.name}.preemptions": c.preemptions})
        return summary
