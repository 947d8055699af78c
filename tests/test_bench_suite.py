"""The design-document suite's recovery and fragmentation scenarios, as behaviour checks (not timings)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import bench_suite  # noqa: E402

from kvtriton.ops import backend  # noqa: E402

CPU = torch.device("cpu")


def test_error_recovery_evicts_and_stays_consistent():
    res = bench_suite.bench_error_recovery(CPU, threads=4)
    ev, ex = res["evicting"], res["exhausted"]
    assert ev["capacity_caches"] == 100
    assert ev["evictions"] >= 100 * 5  # the second hundred caches must evict the first hundred's blocks
    assert ev["used_blocks_after"] == 0
    assert ex["raised"] and ex["unchanged_by_failed_request"]
    assert ex["held_caches"] == 100 and ex["leaked_blocks_after_release"] == 0
    assert "'vista'" in ex["message"] and "5 blocks requested" in ex["message"]


def test_fragmentation_compaction_returns_chunks():
    with backend("reference"):
        res = bench_suite.bench_fragmentation(CPU, budget=128 << 20, rounds=2)
    for fill, v in res.items():
        churn, released, compacted = v["after_churn"], v["after_release_25pct"], v["after_compaction"]
        assert churn["arena_utilization"] > (0.6 if fill == "fill 80%" else 0.8)
        assert compacted["chunks_held"] <= released["chunks_held"]
        assert compacted["external_fragmentation"] <= released["external_fragmentation"] + 1e-9
        assert v["chunks_returned"] > 0


def test_concurrency_no_leak_and_no_interference():
    res = bench_suite.bench_concurrency(CPU, threads=8, big=(200,))
    assert res["cross_pool_unchanged"] is True
    for name, v in res.items():
        if isinstance(v, dict):
            assert v["leaked_blocks_or_caches"] == 0, name
