"""The device replay's metrics: events in, the summary and time-series rows out (hand-computed), and a
replay's summary agreeing with its own time series and request rows."""

import math

import numpy as np
import pytest

from kvtriton import ops
from kvtriton.replay.device import DeviceReplayConfig, replay_device
from kvtriton.replay.metrics import (MODEL_KEYS, POOL_KEYS, REQUEST_KEYS, SUMMARY_KEYS, TIMESERIES_KEYS,
                                     ModelCounters, ReplayMetrics, StepRecord, percentiles, pool_figures)
from kvtriton.spec import get_spec
from kvtriton.workloads import Request, make_workload

TINY1 = get_spec("tiny").with_(num_layers=1)


@pytest.fixture(autouse=True)
def _reference_ops():
    with ops.backend("reference"):
        yield


def pool_row(evictions=0, **kw):
    row = dict(used_blocks=3, cached_blocks=2, free_blocks=5, utilization=0.3, external_fragmentation=0.25,
               internal_fragmentation=0.1, evictions=evictions, held_bytes=4096)
    row.update(kw)
    return row


def test_columns_are_the_ones_readers_use():
    """Notebooks, the harness and the benchmarks read these by name: dropping one is a breaking change."""
    assert TIMESERIES_KEYS == (
        "step", "time_s", "batch", "waiting", "admitted", "finished", "kernel_s", "memory_s", "other_s",
        "prefill_model_s", "prefill_attention_s", "compaction_s", "used_blocks", "cached_blocks", "free_blocks",
        "utilization", "external_fragmentation", "internal_fragmentation", "evictions", "held_bytes", "preemptions",
        "completed", "hit_rate")
    assert REQUEST_KEYS == ("request_id", "model", "arrival_s", "prompt_tokens", "output_tokens", "lookup_blocks",
                            "hit_blocks", "queueing_delay_s", "ttft_s", "prefill_attention_s", "finished_s",
                            "preemptions")
    assert MODEL_KEYS == ("requests", "completed", "hit_rate", "prefill_tokens", "decode_tokens", "preemptions")
    assert len(SUMMARY_KEYS) == len(set(SUMMARY_KEYS)) == 58
    assert SUMMARY_KEYS[-1] == "compute"
    assert {"hit_rate", "token_hit_rate", "ttft_s_p99", "decode_tokens_per_s", "step_memory_frac",
            "external_fragmentation_max", "chunks_returned", "prefill_kernel_s", "prefill_model_s",
            "prefill_attention_s", "prefill_attention_s_mean", "prefill_attention_s_p99"} <= set(SUMMARY_KEYS)


def test_percentiles_and_empty():
    assert percentiles([], "x") == {"x_mean": 0.0, "x_p50": 0.0, "x_p95": 0.0, "x_p99": 0.0}
    vals = list(range(101))
    out = percentiles(vals, "ttft_s")
    assert out == {"ttft_s_mean": 50.0, "ttft_s_p50": 50.0, "ttft_s_p95": 95.0, "ttft_s_p99": 99.0}
    assert all(type(v) is float for v in out.values())


def test_events_make_the_hand_computed_row_and_summary():
    a, b = ModelCounters("a", 16, requests=2), ModelCounters("b", 8, requests=1)
    met = ReplayMetrics([a, b], record_every=2)
    met.start(pool_row(evictions=5))
    met.on_lookup(a, 4, 3)
    met.on_lookup(b, 2, 0)
    met.on_prefill(a, 64, 16, 0.5, 0.0016, first=True, attention_s=0.25)
    met.on_prefill(b, 20, 20, 0.25, 0.002, first=True, attention_s=0.125)
    met.on_prefill(a, 64, 40, 0.125, 0.004, first=False)   # a recomputation after preemption
    met.on_preempt(a)
    met.on_compaction(0.5, chunks_returned=2, blocks_moved=7)
    st = StepRecord()
    st.admitted, st.batch = [object(), object()], 3
    st.memory_s, st.prefill_kernel_s, st.decode_kernel_s, st.wall_s = 1.0, 0.75, 2.0, 5.0
    st.prefill_model_s, st.prefill_attention_s, st.compaction_s = 0.0076, 0.375, 0.5
    met.close_step(st)
    assert (st.kernel_s, st.other_s) == (2.75, 1.25)
    assert not met.due()  # record_every=2
    st2 = StepRecord()
    st2.wall_s, st2.memory_s = 0.5, 1.0  # host time past the wall clock: other is clamped at 0
    met.on_finish(b)
    st2.finished = [object()]
    met.close_step(st2)
    assert st2.other_s == 0.0 and met.due()
    row = met.record(st2, 9.0, pool_row(evictions=8), waiting=4)
    assert tuple(row) == TIMESERIES_KEYS
    assert row["step"] == 2 and row["time_s"] == 9.0 and row["waiting"] == 4 and row["finished"] == 1
    assert row["evictions"] == 3 and row["preemptions"] == 1 and row["completed"] == 1
    assert row["hit_rate"] == pytest.approx(3 / 6) and met.timeseries == [row]
    assert row["prefill_attention_s"] == 0.0  # st2 prefilled nothing

    reqs = [{"queueing_delay_s": q, "ttft_s": t, "prefill_attention_s": a}
            for q, t, a in ((0.0, 1.0, 0.25), (1.0, 2.0, 0.125), (2.0, 6.0, 0.0))]
    header = {k: i for i, k in enumerate(SUMMARY_KEYS[:7])}
    s = met.summary(header, reqs, pool_row(evictions=9, utilization=0.9), sim_time_s=9.5, wall_s=7.0)
    assert tuple(s)[:len(SUMMARY_KEYS)] == SUMMARY_KEYS
    assert [k for k in s if k not in SUMMARY_KEYS] == [f"{m}.{k}" for m in "ab" for k in MODEL_KEYS]
    want = {"requests": 3, "completed": 1, "steps": 2, "sim_time_s": 9.5, "wall_s": 7.0,
            "lookup_blocks": 6, "hit_blocks": 3, "hit_rate": 0.5,
            "prefill_tokens": 84, "prefill_tokens_saved": 3 * 16, "token_hit_rate": 48 / 84,
            "prefill_tokens_computed": 76, "recompute_tokens": 40, "evictions": 4, "preemptions": 1,
            "queueing_delay_s_mean": 1.0, "ttft_s_p50": 2.0, "ttft_s_mean": 3.0,
            "decode_tokens": 3, "decode_time_s": 5.0, "decode_tokens_per_s": 0.6, "decode_kernel_s": 2.0,
            "mean_batch": 3.0, "step_kernel_s": 2.75, "step_memory_s": 2.0, "step_other_s": 1.25,
            "step_total_s": 6.0, "step_kernel_frac": 2.75 / 6, "step_memory_frac": 2 / 6,
            "step_other_frac": 1.25 / 6, "prefill_kernel_s": 0.875, "prefill_model_s": 0.0076,
            "prefill_attention_s": 0.375, "prefill_attention_s_mean": 0.125, "prefill_attention_s_p50": 0.125,
            "compactions": 1, "compaction_s": 0.5, "blocks_moved": 7, "chunks_returned": 2,
            "utilization_mean": 0.3, "utilization_max": 0.3,  # over the recorded rows, not the final figures
            "external_fragmentation_mean": 0.25, "external_fragmentation_max": 0.25,
            "a.requests": 2, "a.completed": 0, "a.hit_rate": 0.75, "a.prefill_tokens": 64, "a.preemptions": 1,
            "b.requests": 1, "b.completed": 1, "b.hit_rate": 0.0, "b.prefill_tokens": 20, "b.decode_tokens": 0}
    assert {k: s[k] for k in want} == pytest.approx(want)


def test_summary_without_rows_uses_the_final_pool_figures():
    c = ModelCounters("m", 16, requests=0)
    met = ReplayMetrics([c])
    met.start(pool_row())
    s = met.summary({}, [], pool_row(utilization=0.4, external_fragmentation=0.6), 0.0, 0.0)
    assert s["utilization_mean"] == s["utilization_max"] == 0.4 and s["external_fragmentation_max"] == 0.6
    assert s["hit_rate"] == s["token_hit_rate"] == s["decode_tokens_per_s"] == s["mean_batch"] == 0.0
    assert s["step_kernel_frac"] == 0.0 and s["ttft_s_p99"] == 0.0
    assert not any(k.startswith("m.") for k in s)  # per-model keys only with several models


def test_pool_figures_one_and_several_pools():
    st = dict(pool_row(), used_bytes=300, block_bytes=100, chunks_held=1)
    assert pool_figures({"m": st}, 4096) == {k: st[k] for k in POOL_KEYS}
    a = dict(used_blocks=2, cached_blocks=1, free_blocks=3, used_bytes=200, held_bytes=1000,
             internal_fragmentation=0.5, evictions=1)
    b = dict(used_blocks=6, cached_blocks=0, free_blocks=1, used_bytes=600, held_bytes=1000,
             internal_fragmentation=0.0, evictions=4)
    row = pool_figures({"a": a, "b": b}, 4000)
    assert tuple(row) == POOL_KEYS + ("a.used_blocks", "a.held_bytes", "b.used_blocks", "b.held_bytes")
    assert row["used_blocks"] == 8 and row["cached_blocks"] == 1 and row["free_blocks"] == 4
    assert row["utilization"] == 800 / 4000 and row["external_fragmentation"] == pytest.approx(1 - 800 / 2000)
    assert row["internal_fragmentation"] == pytest.approx((0.5 * 2) / 8)
    assert row["evictions"] == 5 and row["held_bytes"] == 2000 and row["b.used_blocks"] == 6
    empty = dict(a, used_blocks=0, used_bytes=0, held_bytes=0)
    both_empty = pool_figures({"a": empty, "b": empty}, 4000)
    assert both_empty["external_fragmentation"] == 0.0 and both_empty["internal_fragmentation"] == 0.0


def test_replay_summary_agrees_with_its_series_and_request_rows():
    """Every step recorded: the summary's totals are the sums, last values and percentiles of the rows."""
    reqs = make_workload("zipf", num_requests=10, block_tokens=32, suffix_tokens=(16, 80), output_tokens=(8, 40),
                         seed=5)
    cfg = DeviceReplayConfig(device="cpu", step_time_s=0.01, max_batch=3, compaction_threshold=0.05,
                             compaction_check_every=2, chunk_bytes=2 * TINY1.bytes_per_block)
    res = replay_device(reqs, TINY1, "lru", capacity_blocks=20, config=cfg)
    s, ts, rows = res.summary, res.timeseries, res.requests
    assert all(tuple(r) == TIMESERIES_KEYS for r in ts) and all(tuple(r) == REQUEST_KEYS for r in rows)
    assert s["steps"] == len(ts) == ts[-1]["step"] and s["sim_time_s"] == ts[-1]["time_s"]
    for key, col in (("step_kernel_s", "kernel_s"), ("step_memory_s", "memory_s"), ("step_other_s", "other_s"),
                     ("prefill_model_s", "prefill_model_s"), ("prefill_attention_s", "prefill_attention_s"),
                     ("compaction_s", "compaction_s"),
                     ("decode_tokens", "batch")):
        assert s[key] == pytest.approx(sum(r[col] for r in ts)), key
    for key in ("evictions", "preemptions", "completed", "hit_rate"):
        assert s[key] == ts[-1][key], key
    assert s["mean_batch"] == pytest.approx(np.mean([r["batch"] for r in ts if r["batch"]]))
    assert s["utilization_max"] == max(r["utilization"] for r in ts)
    assert s["external_fragmentation_mean"] == pytest.approx(np.mean([r["external_fragmentation"] for r in ts]))
    assert {k: s[k] for k in s if k.startswith(("ttft", "queueing", "prefill_attention_s_"))} == {
        **percentiles([r["ttft_s"] for r in rows], "ttft_s"),
        **percentiles([r["queueing_delay_s"] for r in rows], "queueing_delay_s"),
        **percentiles([r["prefill_attention_s"] for r in rows], "prefill_attention_s")}
    # the prefill attention is part of the prefill kernels, which are part of the step's kernels; first
    # admissions' shares are part of the total (recomputations add to it)
    assert 0 < s["prefill_attention_s"] < s["prefill_kernel_s"] <= s["step_kernel_s"]
    assert sum(r["prefill_attention_s"] for r in rows) <= s["prefill_attention_s"] * (1 + 1e-9)
    assert s["hit_blocks"] == sum(r["hit_blocks"] for r in rows) and s["preemptions"] == sum(
        r["preemptions"] for r in rows)
    assert s["compactions"] >= 1 and s["preemptions"] >= 1  # the case exercises both
    assert math.isclose(s["step_total_s"], s["step_kernel_s"] + s["step_memory_s"] + s["step_other_s"])
    assert [r["request_id"] for r in rows] == [r.request_id for r in reqs]


def test_several_models_add_per_model_keys_and_columns():
    specs = {"vista": get_spec("vista").with_(num_layers=1),
             "deepseek-ocr": get_spec("deepseek-ocr").with_(num_layers=1)}
    reqs = [Request(request_id=i, arrival_s=0.0, input_length=40, output_length=3, hash_ids=(i, 100 + i),
                    block_tokens=16, model=("vista", "deepseek-ocr")[i % 2]) for i in range(4)]
    res = replay_device(reqs, specs, "lru", budget_bytes=8 << 20,
                        config=DeviceReplayConfig(device="cpu", step_time_s=0.01))
    s = res.summary
    assert tuple(s)[:len(SUMMARY_KEYS)] == SUMMARY_KEYS
    extra = [f"{m}.{k}" for m in specs for k in MODEL_KEYS]
    assert list(s)[len(SUMMARY_KEYS):] == extra
    cols = list(TIMESERIES_KEYS)
    i = cols.index("held_bytes") + 1
    cols[i:i] = [f"{m}.{k}" for m in specs for k in ("used_blocks", "held_bytes")]
    assert all(list(r) == cols for r in res.timeseries)
    assert sum(s[f"{m}.decode_tokens"] for m in specs) == s["decode_tokens"] == 4 * 2
