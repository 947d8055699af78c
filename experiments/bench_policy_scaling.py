"""Benchmark: how the fast replay's time grows with the trace's length, for every registered policy.

    python experiments/bench_policy_scaling.py [--trace PATH] [--capacity 10000] [--policies a,b]
        [--multiples 1,2,4,8] [--fast-below 5.0] [--repeats 1] [--out DIR]

The Mooncake conversation trace is concatenated 1, 2, 4 and 8 times (each copy's block ids shifted past
the previous copies', so no copy hits another's blocks, and its arrival times shifted past the previous
copy's end) and replayed with ``kvtriton.replay.simulate`` at ``--capacity`` blocks. The largest multiple
is run only for the policies whose 1x replay takes under ``--fast-below`` seconds. For each policy the
table gives the replay time at each multiple (the best of ``--repeats``), the exponent of a log-log
least-squares fit of time against length (1.0: linear), the same fit without the 1x point (the first
copy starts from an empty cache and empty histories, so it is a little cheaper per reference than the
copies after it), and the references per second at 1x and at the longest trace. Writes
``bench_policy_scaling.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import time
from pathlib import Path

from _bench_utils import run_header, write_json
from kvtriton.policies import available_policies
from kvtriton.replay import simulate
from kvtriton.workloads.mooncake import load_mooncake

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = ROOT.parent / "shared" / "traces" / "mooncake" / "conversation_trace.jsonl"


def concat_trace(requests, copies):
    """``requests`` repeated ``copies`` times, block ids and arrival times shifted per copy."""
    span = 1 + max(max(r.hash_ids) for r in requests if r.hash_ids)
    t0 = min(r.arrival_s for r in requests)
    dur = max(r.arrival_s for r in requests) - t0 + 1.0
    out = []
    for c in range(copies):
        shift, dt = c * span, c * dur
        for r in requests:
            out.append(dataclasses.replace(r, request_id=len(out), arrival_s=r.arrival_s + dt,
                                           hash_ids=tuple(k + shift for k in r.hash_ids)))
    return out


def power_law_exponent(sizes, seconds):
    """The least-squares slope of log(seconds) against log(size): 1.0 for a linear cost."""
    if len(sizes) < 2:
        return float("nan")
    xs, ys = [math.log(n) for n in sizes], [math.log(t) for t in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def time_replay(trace, policy, capacity, repeats):
    """The best replay time of ``repeats`` runs (``simulate``'s own clock) and that run's result."""
    best = None
    for _ in range(repeats):
        gc.collect()
        r = simulate(trace, policy, capacity)
        if best is None or r["seconds"] < best["seconds"]:
            best = r
    return best


def bench_policy(name, traces, capacity, multiples, fast_below, repeats):
    """One policy's row: times, references per second and hit rates at each multiple, and the exponents."""
    runs = []
    for m in multiples:
        if m == multiples[-1] and len(multiples) > 3 and runs and runs[0]["seconds"] >= fast_below:
            break
        r = time_replay(traces[m], name, capacity, repeats)
        runs.append({"multiple": m, "seconds": r["seconds"], "references": r["references"],
                     "refs_per_s": r["references"] / r["seconds"], "hits": r["hits"],
                     "evictions": r["evictions"], "hit_rate": r["hit_rate"]})
        print(f"  {name:14s} {m}x {r['seconds']:8.2f} s  {runs[-1]['refs_per_s']:12,.0f} refs/s", flush=True)
    ms, secs = [r["multiple"] for r in runs], [r["seconds"] for r in runs]
    return {"policy": name, "runs": runs, "exponent": power_law_exponent(ms, secs),
            "exponent_after_1x": power_law_exponent(ms[1:], secs[1:]),
            "refs_per_s_1x": runs[0]["refs_per_s"], "refs_per_s_longest": runs[-1]["refs_per_s"]}


def print_table(rows, multiples):
    head = (f"{'policy':14s}" + "".join(f"{str(m) + 'x s':>10s}" for m in multiples)
            + f"{'exp':>7s}{'exp 2x+':>9s}{'refs/s 1x':>13s}{'refs/s max':>13s}")
    print(head)
    print("-" * len(head))
    for row in rows:
        by = {r["multiple"]: r["seconds"] for r in row["runs"]}
        cells = "".join(f"{by[m]:10.2f}" if m in by else f"{'-':>10s}" for m in multiples)
        print(f"{row['policy']:14s}{cells}{row['exponent']:7.3f}{row['exponent_after_1x']:9.3f}"
              f"{row['refs_per_s_1x']:13,.0f}{row['refs_per_s_longest']:13,.0f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=str(DEFAULT_TRACE))
    ap.add_argument("--capacity", type=int, default=10_000, help="cache size in blocks")
    ap.add_argument("--policies", default=",".join(available_policies()))
    ap.add_argument("--multiples", default="1,2,4,8", help="trace lengths, in copies of the trace")
    ap.add_argument("--fast-below", type=float, default=5.0,
                    help="run the largest multiple only when the 1x replay takes under this many seconds")
    ap.add_argument("--repeats", type=int, default=1, help="replays per point (the best is kept)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    args = ap.parse_args(argv)
    multiples = sorted({int(x) for x in args.multiples.split(",")})
    names = [p for p in args.policies.split(",") if p]
    base = load_mooncake(args.trace)
    traces = {m: concat_trace(base, m) for m in multiples}
    header = run_header()
    print(f"{header['cpu']} ({header['cpus']} CPUs), Python {header['python']}; trace {args.trace} "
          f"({len(base)} requests) x {multiples}, {args.capacity} blocks", flush=True)
    rows = []
    t0 = time.perf_counter()
    for name in names:
        rows.append(bench_policy(name, traces, args.capacity, multiples, args.fast_below, args.repeats))
    print()
    print_table(rows, multiples)
    path = write_json(Path(args.out) / "bench_policy_scaling.json",
                      {"machine": header, "trace": args.trace, "requests_1x": len(base),
                       "capacity_blocks": args.capacity, "multiples": multiples, "fast_below_s": args.fast_below,
                       "repeats": args.repeats, "wall_s": time.perf_counter() - t0, "policies": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
