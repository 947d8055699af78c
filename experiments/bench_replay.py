"""Benchmark: the full miss-ratio curve of every policy on a Mooncake trace, against a plain-Python LRU.

    python experiments/bench_replay.py [--trace PATH] [--workers N] [--out DIR]

Prints the machine, the hit-rate table (capacities x policies), the wall time of the whole curve, the
throughput in block references per second, and the same for a straightforward LRU simulator (one
``OrderedDict`` loop) measured in the same process; writes ``bench_replay.json`` and ``bench_replay.csv``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from collections import OrderedDict
from pathlib import Path

from _bench_utils import percentiles, run_header, write_json
from kvtriton.policies import available_policies
from kvtriton.replay import miss_ratio_curve, simulate
from kvtriton.workloads.mooncake import load_mooncake

ROOT = Path(__file__).resolve().parents[1]

CAPACITIES = [1000, 3000, 10000, 20000, 30000, 50000]


def plain_lru(requests, capacity):
    """The baseline: prefix hits, then every block touched in order in one OrderedDict."""
    cache = OrderedDict()
    hits = refs = 0
    for r in requests:
        ids = r.hash_ids
        for k in ids:
            if k in cache:
                hits += 1
            else:
                break
        refs += len(ids)
        for k in ids:
            if k in cache:
                cache.move_to_end(k)
            else:
                cache[k] = None
                if len(cache) > capacity:
                    cache.popitem(last=False)
    return hits, refs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=str(ROOT.parent / "shared" / "traces" / "mooncake" /
                                           "conversation_trace.jsonl"))
    ap.add_argument("--policies", default=",".join(available_policies()))
    ap.add_argument("--capacities", default=",".join(map(str, CAPACITIES)))
    ap.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU)")
    ap.add_argument("--repeats", type=int, default=3, help="baseline repeats (median reported)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    requests = load_mooncake(args.trace)
    policies = [p for p in args.policies.split(",") if p]
    capacities = [int(c) for c in args.capacities.split(",") if c]
    refs_per_run = sum(len(r.hash_ids) for r in requests)
    machine = {**run_header(),
               "sched_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
               "loadavg_before": os.getloadavg() if hasattr(os, "getloadavg") else None}
    print(f"machine: {machine['platform']}, {machine['cpu']}, python {machine['python']}, "
          f"{machine['cpus']} CPUs, load average {machine['loadavg_before']}")
    print(f"trace: {args.trace}: {len(requests)} requests, {refs_per_run} block references")

    # Baseline, in this process: the plain OrderedDict LRU at 10,000 blocks, median of repeats.
    base_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        hits, refs = plain_lru(requests, 10_000)
        base_times.append(time.perf_counter() - t0)
    base_s = statistics.median(base_times)
    ours = simulate(requests, "lru", 10_000, order="forward")
    assert ours["hits"] == hits, "the replay and the plain LRU disagree"
    ours_t = []
    for _ in range(args.repeats):
        ours_t.append(simulate(requests, "lru", 10_000, order="forward")["seconds"])
    ours_s = statistics.median(ours_t)
    base_spread, ours_spread = percentiles(base_times, unit="s"), percentiles(ours_t, unit="s")
    print(f"baseline plain-Python LRU: {refs / base_s / 1e6:.2f} M refs/s (median of {args.repeats}, "
          f"{base_spread['min_s']:.3f}-{base_spread['max_s']:.3f} s per run; "
          f"hit rate {hits / refs:.4f}); kvtriton LRU replay (pins, policy interface), same run: "
          f"{refs / ours_s / 1e6:.2f} M refs/s ({ours_spread['min_s']:.3f}-{ours_spread['max_s']:.3f} s per run; "
          f"ratio of medians {base_s / ours_s:.2f})")

    def cpu():
        a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

    c0 = cpu()
    t0 = time.perf_counter()
    df = miss_ratio_curve(requests, policies=policies, capacities=capacities, workers=args.workers,
                          progress=not args.no_progress)
    wall = time.perf_counter() - t0
    cpu_s = cpu() - c0
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    total_refs = refs_per_run * len(df)
    cpu = float(df["seconds"].sum())
    print()
    print(df.pivot(index="capacity_blocks", columns="policy", values="hit_rate").round(4).to_string())
    print()
    per = df.groupby("policy")["seconds"].sum().sort_values(ascending=False)
    print("seconds per policy (all capacities, summed over runs): "
          + ", ".join(f"{p} {s:.2f}" for p, s in per.items()))
    print(f"miss-ratio curve: {len(df)} runs ({len(set(df['policy']))} policies x {len(capacities)} capacities), "
          f"{total_refs / 1e6:.2f} M block references in {wall:.2f} s wall ({cpu:.2f} s in the runs), "
          f"{total_refs / wall / 1e6:.2f} M refs/s overall, {total_refs / cpu / 1e6:.2f} M refs/s per process; "
          f"plain-Python LRU baseline {refs / base_s / 1e6:.2f} M refs/s per process")
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    print(f"CPU time of the curve (all processes): {cpu_s:.2f} s, i.e. about {cpu_s / ncpu:.1f} s of wall "
          f"time on {ncpu} otherwise idle cores; load average after: {load_after}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "bench_replay.csv", index=False)
    summary = {"machine": machine, "trace": str(args.trace), "requests": len(requests),
               "references_per_run": refs_per_run, "runs": len(df), "wall_seconds": wall,
               "run_seconds": cpu, "cpu_seconds": cpu_s, "loadavg_after": load_after,
               "refs_per_second_overall": total_refs / wall,
               "baseline_plain_lru_refs_per_second": refs / base_s,
               "replay_lru_refs_per_second": refs / statistics.median(ours_t),
               "baseline_plain_lru_seconds": base_spread, "replay_lru_seconds": ours_spread,
               "workers": args.workers, "date": machine["date"],
               "rows": df.to_dict(orient="records")}
    write_json(out / "bench_replay.json", summary, indent=1)
    print(f"wrote {out / 'bench_replay.json'} and {out / 'bench_replay.csv'}")


if __name__ == "__main__":
    main()
