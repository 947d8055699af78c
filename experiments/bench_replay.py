"""Benchmark: the full miss-ratio curve of every policy on a Mooncake trace, against a plain-Python LRU.

    python experiments/bench_replay.py [--trace PATH] [--workers N] [--out DIR]
        [--copies 50] [--python-copies 2] [--no-throughput] [--no-curve] [--agentic [PATH]]

Prints the machine, the hit-rate table (capacities x policies), the wall time of the whole curve, the
throughput in block references per second, and the same for a straightforward LRU simulator (one
``OrderedDict`` loop) measured in the same process; writes ``bench_replay.json`` and ``bench_replay.csv``.

The throughput section (``--no-throughput`` skips it) measures references per second of every policy
with a compiled kernel, on the trace concatenated ``--copies`` times (block ids shifted per copy, so no
copy hits another's blocks): the compiled engine on the whole of it, the Python engine and the plain
``OrderedDict`` loop on ``--python-copies`` copies, all in one run; and the compiled engine's time at a
quarter, half and all of the copies, with the exponent of a power-law fit (1.0: linear). It writes
``bench_replay_throughput.json``.

``--agentic [PATH]`` adds the agentic coding traces (``kvtriton.workloads.load_agentic``, 64-token
blocks, about 94 million references): the miss-ratio curve of every classic policy at
``--agentic-capacities`` with ``miss_ratio_curve(workers=--workers)``, timed with the loading, written to
``bench_replay_agentic.json`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import resource
import statistics
import time
from collections import OrderedDict
from pathlib import Path

from _bench_utils import percentiles, run_header, write_json
from kvtriton.policies import available_policies
from kvtriton.replay import miss_ratio_curve, prepare_trace, simulate
from kvtriton.replay.compiled import KERNEL_POLICIES
from kvtriton.workloads.mooncake import load_mooncake

ROOT = Path(__file__).resolve().parents[1]

CAPACITIES = [1000, 3000, 10000, 20000, 30000, 50000]
AGENTIC_CAPACITIES = [16000, 32000, 80000, 160000, 240000, 400000]  # >= the largest request (13,974 blocks)


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


def repeat_trace(requests, copies):
    """``requests`` concatenated ``copies`` times, each copy's block ids shifted past the previous ones."""
    span = 1 + max(max(r.hash_ids) for r in requests if r.hash_ids)
    out = []
    for c in range(copies):
        shift = c * span
        for r in requests:
            out.append(dataclasses.replace(r, request_id=len(out), hash_ids=tuple(k + shift for k in r.hash_ids)))
    return out


def power_law_exponent(sizes, seconds):
    """The least-squares slope of log(seconds) against log(size): 1.0 for a linear cost."""
    xs, ys = [math.log(n) for n in sizes], [math.log(t) for t in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _best(fn, repeats):
    return min(fn() for _ in range(repeats))


def throughput_section(requests, args, capacity=10_000):
    """References per second per policy: compiled (long trace), Python and the plain loop (short trace)."""
    t0 = time.perf_counter()
    long_reqs = repeat_trace(requests, args.copies)
    short_reqs = long_reqs[:len(requests) * args.python_copies]
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    long_tr = prepare_trace(long_reqs)
    long_tr.dense_keys()
    t_prep = time.perf_counter() - t0
    short_tr = prepare_trace(short_reqs)
    n_long, n_short = long_tr.num_references, short_tr.num_references
    print(f"\nthroughput at {capacity} blocks: compiled on {args.copies} copies ({n_long / 1e6:.2f} M refs; "
          f"records built in {t_build:.1f} s, flat arrays in {t_prep:.1f} s), Python engine and plain loop on "
          f"{args.python_copies} copies ({n_short / 1e6:.2f} M refs); best of {args.repeats}")

    def plain():
        t = time.perf_counter()
        plain_lru(short_reqs, capacity)
        return time.perf_counter() - t

    plain_rate = n_short / _best(plain, args.repeats)
    rows = []
    for name in KERNEL_POLICIES:
        simulate(short_tr, name, capacity, engine="compiled")  # compile or load the kernel first
        c_s = _best(lambda: simulate(long_tr, name, capacity, engine="compiled")["seconds"], args.repeats)
        p_s = _best(lambda: simulate(short_tr, name, capacity, engine="python")["seconds"], 1)
        rows.append({"policy": name, "compiled_refs_per_s": n_long / c_s, "python_refs_per_s": n_short / p_s,
                     "plain_lru_refs_per_s": plain_rate, "speedup_vs_python": (n_long / c_s) / (n_short / p_s),
                     "speedup_vs_plain_lru": (n_long / c_s) / plain_rate})
        r = rows[-1]
        print(f"  {name:7s} compiled {r['compiled_refs_per_s'] / 1e6:6.2f} M/s   python {r['python_refs_per_s'] / 1e6:5.2f}"
              f" M/s   plain OrderedDict LRU {plain_rate / 1e6:5.2f} M/s   x{r['speedup_vs_python']:.1f} vs python, "
              f"x{r['speedup_vs_plain_lru']:.1f} vs plain")
    return rows, _linearity(long_reqs, len(requests), args, capacity), {"references_long": n_long,
                                                                       "references_short": n_short,
                                                                       "flat_arrays_seconds": t_prep}


def _linearity(long_reqs, per_copy, args, capacity):
    """The compiled engine's time at 1/4, 1/2 and all of the copies, and the fitted exponent, per policy."""
    quarter = max(1, args.copies // 4)
    traces = [prepare_trace(long_reqs[:per_copy * quarter * m]) for m in (1, 2, 4)]
    sizes = [t.num_references for t in traces]
    out = {}
    print(f"linearity (compiled, {', '.join(f'{n / 1e6:.2f}' for n in sizes)} M refs):")
    for name in KERNEL_POLICIES:
        secs = [_best(lambda: simulate(t, name, capacity, engine="compiled")["seconds"], args.repeats)
                for t in traces]
        out[name] = {"references": sizes, "seconds": secs, "exponent": power_law_exponent(sizes, secs)}
        print(f"  {name:7s} " + ", ".join(f"{s:.3f} s" for s in secs) + f"   exponent {out[name]['exponent']:.3f}")
    return out


def agentic_section(args):
    """The agentic traces' miss-ratio curve for every classic policy, timed with the loading."""
    try:
        from kvtriton.workloads import load_agentic
    except ImportError:
        print("\nagentic: kvtriton.workloads.load_agentic is not available; section skipped")
        return None
    caps = [int(c) for c in args.agentic_capacities.split(",") if c]
    t0 = time.perf_counter()
    reqs = load_agentic(None if args.agentic == "default" else args.agentic, block_tokens=64)
    t_load = time.perf_counter() - t0
    refs = sum(len(r.hash_ids) for r in reqs)
    print(f"\nagentic: {len(reqs)} requests, {refs / 1e6:.1f} M references, loaded in {t_load:.1f} s")
    t1 = time.perf_counter()
    df = miss_ratio_curve(reqs, policies=list(KERNEL_POLICIES), capacities=caps, workers=args.workers,
                          progress=not args.no_progress)
    t_curve = time.perf_counter() - t1
    wall = time.perf_counter() - t0
    print(df.pivot(index="capacity_blocks", columns="policy", values="hit_rate").round(4).to_string())
    print(f"agentic curve: {len(df)} runs, {refs * len(df) / 1e9:.2f} G references in {t_curve:.1f} s "
          f"(engines: {', '.join(sorted(set(df['engine'])))}); with loading {wall:.1f} s wall")
    return {"requests": len(reqs), "references": refs, "load_seconds": t_load, "curve_seconds": t_curve,
            "wall_seconds": wall, "capacities": caps, "rows": df.to_dict(orient="records")}, df


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
    ap.add_argument("--copies", type=int, default=50, help="trace copies for the compiled throughput")
    ap.add_argument("--python-copies", type=int, default=2, help="trace copies for the Python throughput")
    ap.add_argument("--no-throughput", action="store_true", help="skip the throughput section")
    ap.add_argument("--no-curve", action="store_true", help="skip the miss-ratio curve of every policy")
    ap.add_argument("--agentic", nargs="?", const="default", default=None,
                    help="add the agentic traces' curve (optional PATH; default: the configured location)")
    ap.add_argument("--agentic-capacities", default=",".join(map(str, AGENTIC_CAPACITIES)))
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
          f"hit rate {hits / refs:.4f}); kvtriton LRU replay (pins, {ours['engine']} engine), same run: "
          f"{refs / ours_s / 1e6:.2f} M refs/s ({ours_spread['min_s']:.3f}-{ours_spread['max_s']:.3f} s per run; "
          f"ratio of medians {base_s / ours_s:.2f})")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_throughput:
        rows, linear, sizes = throughput_section(requests, args)
        write_json(out / "bench_replay_throughput.json",
                   {"machine": machine, "trace": str(args.trace), "copies": args.copies,
                    "python_copies": args.python_copies, "capacity_blocks": 10_000, **sizes,
                    "policies": rows, "linearity": linear}, indent=1)
        print(f"wrote {out / 'bench_replay_throughput.json'}")
    if not args.no_curve:
        curve_section(args, requests, machine, policies, capacities, refs / base_s, base_spread, ours_t, out)
    if args.agentic is not None:
        res = agentic_section(args)
        if res is not None:
            summary, df = res
            df.to_csv(out / "bench_replay_agentic.csv", index=False)
            write_json(out / "bench_replay_agentic.json", {"machine": machine, "workers": args.workers, **summary},
                       indent=1)
            print(f"wrote {out / 'bench_replay_agentic.json'}")


def curve_section(args, requests, machine, policies, capacities, base_rate, base_spread, ours_t, out):
    """The miss-ratio curve of every policy on the trace, timed, with the results written to ``out``."""
    refs_per_run = sum(len(r.hash_ids) for r in requests)
    refs = refs_per_run
    ours_spread = percentiles(ours_t, unit="s")

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
          f"plain-Python LRU baseline {base_rate / 1e6:.2f} M refs/s per process")
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    print(f"CPU time of the curve (all processes): {cpu_s:.2f} s, i.e. about {cpu_s / ncpu:.1f} s of wall "
          f"time on {ncpu} otherwise idle cores; load average after: {load_after}")

    df.to_csv(out / "bench_replay.csv", index=False)
    summary = {"machine": machine, "trace": str(args.trace), "requests": len(requests),
               "references_per_run": refs_per_run, "runs": len(df), "wall_seconds": wall,
               "run_seconds": cpu, "cpu_seconds": cpu_s, "loadavg_after": load_after,
               "refs_per_second_overall": total_refs / wall,
               "baseline_plain_lru_refs_per_second": base_rate,
               "replay_lru_refs_per_second": refs / statistics.median(ours_t),
               "baseline_plain_lru_seconds": base_spread, "replay_lru_seconds": ours_spread,
               "workers": args.workers, "date": machine["date"],
               "rows": df.to_dict(orient="records")}
    write_json(out / "bench_replay.json", summary, indent=1)
    print(f"wrote {out / 'bench_replay.json'} and {out / 'bench_replay.csv'}")


if __name__ == "__main__":
    main()
