"""Host-side cost of the memory manager, beside PyTorch's own allocator in the same process.

    python experiments/bench_memory.py --out bench_memory.json                 # the CPU
    python experiments/bench_memory.py --device cuda --out bench_memory.json   # a GPU

1. ``alloc_10mb``: ``pool.request`` of a 10 MiB VISTA cache (80 tokens = 5 blocks of 2 MiB) from a
   warmed pool, and ``pool.release``, against ``torch.empty`` of the same 10 MiB on the same device
   (PyTorch's caching allocator on CUDA; the C library's allocator on the CPU). The two are timed in
   alternating rounds, one call per timestamp pair (``time.perf_counter_ns``). Goals: request p50
   <= 5 us, p99 <= 50 us, and >= 2x faster than ``torch.empty`` at the median.
2. ``threads``: 1,000 caches requested from 16 threads and held at once (wall time from a barrier to
   the last request), then released; goal <= 100 ms, and nothing leaked (``pool.validate()``, no used
   block or live cache left).
3. ``batch_blocks``: ``allocate_blocks(n)`` + ``free_blocks(ids)`` of single blocks in batches of
   ``n``; goal <= 1 us per block, amortized.

``--stats`` runs instead the statistics and compaction section (issue 11, section 5)::

    python experiments/bench_memory.py --stats --baseline-src /tmp/kvbase --out bench_stats.json

4. ``stats``: ``pool.stats()`` with 100, 10,000 and 100,000 live caches (512-byte blocks, 1 to 32
   tokens each, a tenth of them forks), median over repeats; between two timed calls one cache is
   requested, appended to and released, so every call sees new counts and a new latency sample (a
   replay's pattern). Goal: < 1 ms at 100,000 caches.
5. ``compaction``: ``pool.compact()`` of a ~33,000-block pool (1 KiB blocks, 64 per 64 KiB chunk) whose
   first half is full and whose second half keeps one 4-block cache in 17, so ~1,000 blocks move; the
   host time is the wall time of ``compact()`` less the time spent inside ``ops.move_blocks``.

``--baseline-src DIR`` runs the same section in a subprocess on the ``kvtriton`` package under ``DIR``
(e.g. a copy of an earlier commit), so the baseline and the candidate are measured in one run, and
prints their ratios. Only the public API is used, so any version of the pool can be the baseline.

Prints medians and ratios and names the machine; ``--out`` writes the JSON (after the run header of
``_bench_utils.run_header``: date, device, device_name, cpu, cpus, platform, python, torch, triton)::

    {..., "machine", "results": {"alloc_10mb": {...}, "threads": {...}, "batch_blocks": {...}},
     "goals": {name: bool}}

and with ``--stats`` ``{..., "machine", "baseline", "candidate", "ratios", "goals"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

# KVTRITON_SRC: the tree whose ``kvtriton`` is measured (the baseline's subprocess sets it).
sys.path.insert(0, os.environ.get("KVTRITON_SRC") or str(Path(__file__).resolve().parents[1]))

import kvtriton  # noqa: E402
from kvtriton import GPUMemoryAllocator, ModelSpec, get_spec  # noqa: E402
from kvtriton import ops as _ops  # noqa: E402

# The shared helpers import kvtriton when called, and only the candidate calls them: the baseline's child
# (``--stats-child``, under KVTRITON_SRC) measures and prints raw samples, which the parent summarises.
from _bench_utils import cpu_name, device_name, percentiles, resolve_device, run_header, write_json  # noqa: E402

MiB = 1 << 20


def _machine(device: torch.device) -> str:
    """``CPU <model>``, after the GPU's name on CUDA."""
    cpu = f"CPU {cpu_name()}"
    return f"{device_name(device)} / {cpu}" if device.type == "cuda" else cpu


def bench_alloc_10mb(device: torch.device, rounds: int, per_round: int) -> dict:
    spec = get_spec("vista")
    tokens = (10 * MiB) // spec.bytes_per_token            # 80 tokens, 5 blocks
    nbytes = spec.blocks_for_tokens(tokens) * spec.bytes_per_block
    hold = 8
    with GPUMemoryAllocator(devices=[device], budget_bytes=(hold + 2) * nbytes) as alloc:
        pool = alloc.create_pool("vista", spec, policy="lru", initial_bytes=(hold + 2) * nbytes)
        req, rel, emp = [], [], []
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        # Warm-up: both paths, so the caching allocator holds a 10 MiB segment too.
        for _ in range(200):
            pool.release(pool.request(num_tokens=tokens))
            x = torch.empty(nbytes, dtype=torch.uint8, device=device)
            del x
        sync()
        pool.reset_latency()
        pc = time.perf_counter_ns
        for _ in range(rounds):
            for _ in range(per_round):
                t0 = pc()
                c = pool.request(num_tokens=tokens)
                t1 = pc()
                pool.release(c)
                t2 = pc()
                req.append(t1 - t0)
                rel.append(t2 - t1)
            for _ in range(per_round):
                t0 = pc()
                x = torch.empty(nbytes, dtype=torch.uint8, device=device)
                t1 = pc()
                del x
                emp.append(t1 - t0)
            sync()
        # n, mean_us, std_us, min_us, p50_us, p95_us, p99_us, max_us of the ns samples
        r, e = percentiles(req, unit="us", scale=1e-3), percentiles(emp, unit="us", scale=1e-3)
        s = pool.stats()
        return {"bytes": nbytes, "tokens": tokens, "blocks": spec.blocks_for_tokens(tokens),
                "request": r, "release": percentiles(rel, unit="us", scale=1e-3), "torch_empty": e,
                "speedup_p50": e["p50_us"] / r["p50_us"], "speedup_p99": e["p99_us"] / r["p99_us"],
                "pool_stats_latency": {k: s[k] for k in s if k.startswith("alloc_latency")},
                "leaked_blocks": s["used_blocks"]}


def bench_threads(device: torch.device, n_caches: int, n_threads: int, model: str, repeats: int) -> dict:
    spec = get_spec(model)
    per = -(-n_caches // n_threads)
    walls = []
    leaks = []
    with GPUMemoryAllocator(devices=[device], budget_bytes=(n_caches + 64) * spec.bytes_per_block + 4 * MiB) as alloc:
        pool = alloc.create_pool("threads", spec)
        pool.grow(num_blocks=n_caches)
        for _ in range(repeats + 1):  # the first run warms up
            held: list[list] = [[] for _ in range(n_threads)]
            barrier = threading.Barrier(n_threads + 1)
            done = [0] * n_threads

            def work(i):
                barrier.wait()
                mine = held[i]
                for _ in range(min(per, n_caches - i * per)):
                    mine.append(pool.request(num_tokens=spec.block_size))
                done[i] = time.perf_counter_ns()

            ts = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
            for t in ts:
                t.start()
            barrier.wait()
            t0 = time.perf_counter_ns()
            for t in ts:
                t.join()
            wall = max(done) - t0
            s = pool.stats()
            assert s["live_caches"] == sum(len(h) for h in held) == n_caches
            for h in held:
                for c in h:
                    pool.release(c)
            pool.validate()
            s = pool.stats()
            leaks.append(s["used_blocks"] + s["live_caches"])
            walls.append(wall)
    walls = walls[1:]
    return {"caches": n_caches, "threads": n_threads, "model": model, "wall_ms_median": float(np.median(walls)) / 1e6,
            "wall_ms_max": float(max(walls)) / 1e6, "repeats": repeats, "leaked": int(sum(leaks))}


def bench_batch_blocks(device: torch.device, batch: int, repeats: int) -> dict:
    spec = get_spec("tiny")
    with GPUMemoryAllocator(devices=[device], budget_bytes=max(8 * MiB, 2 * batch * spec.bytes_per_block)) as alloc:
        pool = alloc.create_pool("blocks", spec)
        pool.grow(num_blocks=batch)
        for _ in range(20):
            pool.free_blocks(pool.allocate_blocks(batch))
        per_block = []
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            ids = pool.allocate_blocks(batch)
            pool.free_blocks(ids)
            per_block.append((time.perf_counter_ns() - t0) / batch)
        pool.validate()
        leaked = pool.stats()["used_blocks"]
    p = percentiles(per_block, qs=(50, 95))
    return {"batch": batch, "ns_per_block_median": p["p50"], "ns_per_block_p95": p["p95"],
            "repeats": repeats, "leaked": int(leaked)}


# ---------------------------------------------------------------------------------------- --stats
STATS_SPEC = ModelSpec(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float16, block_size=16,
                       name="bench-512b")            # 512-byte blocks
COMPACT_SPEC = ModelSpec(num_layers=1, num_kv_heads=2, head_dim=8, dtype=torch.float16, block_size=16,
                         name="bench-1k")           # 1 KiB blocks


def bench_stats(n_caches: int, repeats: int, seed: int = 0) -> dict:
    """``pool.stats()`` latencies (``ns``, raw: :func:`stats_figures` turns them into the median and p90)
    with ``n_caches`` live caches; one request/append/release between two timed calls."""
    spec = STATS_SPEC
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 2 * spec.block_size + 1, n_caches)
    budget = (int(sum(-(-int(n) // spec.block_size) for n in lens)) + 1024) * spec.bytes_per_block + 8 * MiB
    with GPUMemoryAllocator(devices=["cpu"], budget_bytes=budget) as alloc:
        pool = alloc.create_pool("stats", spec)
        caches = []
        for i, n in enumerate(lens.tolist()):
            if i % 10 == 9:
                caches.append(caches[int(rng.integers(0, len(caches)))].fork())
            else:
                caches.append(pool.request(int(n)))
        pool.stats()
        ns = []
        for _ in range(repeats):
            c = pool.request(int(rng.integers(1, 33)))
            c.append(1)
            c.release()
            t0 = time.perf_counter_ns()
            s = pool.stats()
            ns.append(time.perf_counter_ns() - t0)
        assert s["live_caches"] == n_caches
        out = {"caches": n_caches, "repeats": repeats, "ns": ns, "used_blocks": s["used_blocks"],
               "internal_fragmentation": s["internal_fragmentation"]}
        for c in caches:
            c.release()
    return out


def _compaction_setup(alloc):
    spec = COMPACT_SPEC
    pool = alloc.create_pool("compact", spec)
    bs = spec.block_size
    caches = []
    while True:
        try:
            caches.append(pool.request(4 * bs))
        except kvtriton.PoolExhaustedError:
            break
    per_chunk = alloc.chunk_bytes // spec.bytes_per_block
    half = pool.stats()["chunks_held"] // 2 * per_chunk
    kept = 0
    for c in caches:
        if min(c.block_ids) >= half:
            if kept % 17:
                c.release()
            kept += 1
    return pool


def bench_compaction(repeats: int) -> dict:
    """Host time of ``compact()`` moving ~1,000 blocks in a ~33,000-block pool."""
    chunk = 64 << 10
    budget = 516 * chunk
    real_move = _ops.move_blocks
    walls, hosts, moved = [], [], []
    inside = [0]

    def timed_move(*args, **kw):
        t0 = time.perf_counter_ns()
        try:
            return real_move(*args, **kw)
        finally:
            inside[0] += time.perf_counter_ns() - t0

    for rep in range(repeats + 1):  # the first warms up (the move kernel's first call compiles)
        with GPUMemoryAllocator(devices=["cpu"], budget_bytes=budget, chunk_bytes=chunk) as alloc:
            pool = _compaction_setup(alloc)
            before = pool.stats()
            inside[0] = 0
            _ops.move_blocks = timed_move
            try:
                t0 = time.perf_counter_ns()
                returned = pool.compact()
                wall = time.perf_counter_ns() - t0
            finally:
                _ops.move_blocks = real_move
            after = pool.stats()
            pool.validate()
            if rep:
                walls.append(wall)
                hosts.append(wall - inside[0])
                moved.append(after["blocks_moved"] - before["blocks_moved"])
    return {"capacity_blocks": before["capacity_blocks"], "live_blocks": before["used_blocks"],
            "chunks_returned": returned, "blocks_moved": moved[-1], "repeats": repeats,
            "wall_ms_median": float(np.median(walls)) / 1e6, "host_ms_median": float(np.median(hosts)) / 1e6}


def run_stats_section(repeats: int, sizes=(100, 10_000, 100_000)) -> dict:
    """The section's measurements, ``stats()`` latencies raw (what the baseline's child prints)."""
    out = {"kvtriton": str(Path(kvtriton.__file__).resolve().parent), "stats": {}}
    for n in sizes:
        out["stats"][str(n)] = bench_stats(n, repeats)
    out["compaction"] = bench_compaction(max(3, repeats // 10))
    return out


def stats_figures(section: dict) -> dict:
    """``section`` with each ``stats()`` sample (``ns``) replaced by its ``median_ms`` and ``p90_ms``."""
    for n, s in section["stats"].items():
        row = {}
        for k, v in s.items():
            if k == "ns":
                p = percentiles(v, unit="ms", scale=1e-6, qs=(50, 90))
                row.update(median_ms=p["p50_ms"], p90_ms=p["p90_ms"])
            else:
                row[k] = v
        section["stats"][n] = row
    return section


def print_stats_section(label: str, r: dict) -> None:
    print(f"{label} ({r['kvtriton']}):")
    for n, s in r["stats"].items():
        print(f"  stats() with {int(n):>7,} live caches: median {s['median_ms']:.4f} ms (p90 {s['p90_ms']:.4f})")
    c = r["compaction"]
    print(f"  compact(): {c['blocks_moved']} blocks moved, {c['chunks_returned']} chunks returned in a "
          f"{c['capacity_blocks']}-block pool: wall {c['wall_ms_median']:.2f} ms, host {c['host_ms_median']:.2f} ms")


def stats_main(args) -> int:
    if args.stats_child:
        print(json.dumps(run_stats_section(args.stats_repeats)))
        return 0
    machine = _machine(torch.device("cpu"))
    base = None
    if args.baseline_src:
        env = dict(os.environ, KVTRITON_SRC=str(Path(args.baseline_src).resolve()))
        proc = subprocess.run([sys.executable, __file__, "--stats", "--stats-child",
                               "--stats-repeats", str(args.stats_repeats)],
                              env=env, capture_output=True, text=True, check=True)
        base = stats_figures(json.loads(proc.stdout.strip().splitlines()[-1]))
        print_stats_section("baseline", base)
    cand = stats_figures(run_stats_section(args.stats_repeats))
    print_stats_section("candidate", cand)
    ratios = {}
    if base is not None:
        for n in cand["stats"]:
            ratios[f"stats_{n}"] = base["stats"][n]["median_ms"] / cand["stats"][n]["median_ms"]
        ratios["compaction_host"] = base["compaction"]["host_ms_median"] / cand["compaction"]["host_ms_median"]
        print("speed-ups (baseline / candidate): " + ", ".join(f"{k} {v:.1f}x" for k, v in ratios.items()))
    goals = {"stats_100k_lt_1ms": cand["stats"]["100000"]["median_ms"] < 1.0}
    for k, v in goals.items():
        print(f"  goal {k}: {'met' if v else 'NOT met'}")
    if args.out:
        write_json(args.out, {**run_header(), "machine": machine, "baseline": base, "candidate": cand,
                              "ratios": ratios, "goals": goals})
        print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    ap.add_argument("--out", default=None, help="JSON file to write")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=2000)
    ap.add_argument("--threads-model", default="deepseek-ocr")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--stats", action="store_true", help="the stats() and compaction section instead (CPU)")
    ap.add_argument("--stats-repeats", type=int, default=50)
    ap.add_argument("--baseline-src", default=None, help="with --stats: also measure the kvtriton under this dir")
    ap.add_argument("--stats-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stats:
        return stats_main(args)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        ap.error(str(e))
    machine = _machine(device)
    print(f"machine: {machine}; torch {torch.__version__}; device {device}")

    a = bench_alloc_10mb(device, args.rounds, args.per_round)
    r, e = a["request"], a["torch_empty"]
    print(f"alloc 10 MiB ({a['blocks']} blocks): request p50 {r['p50_us']:.2f} us, p95 {r['p95_us']:.2f}, "
          f"p99 {r['p99_us']:.2f}; release p50 {a['release']['p50_us']:.2f} us")
    print(f"  torch.empty({a['bytes']} B) p50 {e['p50_us']:.2f} us, p99 {e['p99_us']:.2f} us; "
          f"ratio torch.empty/request: p50 {a['speedup_p50']:.2f}x, p99 {a['speedup_p99']:.2f}x")
    t = bench_threads(device, 1000, 16, args.threads_model, repeats=5)
    print(f"threads: {t['caches']} caches ({t['model']}, 1 block each) from {t['threads']} threads: "
          f"median {t['wall_ms_median']:.2f} ms, max {t['wall_ms_max']:.2f} ms; leaked {t['leaked']}")
    b = bench_batch_blocks(device, args.batch, repeats=200)
    print(f"batch blocks: allocate+free in batches of {b['batch']}: {b['ns_per_block_median']:.0f} ns/block "
          f"median (p95 {b['ns_per_block_p95']:.0f}); leaked {b['leaked']}")

    goals = {
        "alloc_p50_le_5us": r["p50_us"] <= 5.0,
        "alloc_p99_le_50us": r["p99_us"] <= 50.0,
        "alloc_2x_faster_than_torch_empty": a["speedup_p50"] >= 2.0,
        "threads_1000_le_100ms": t["wall_ms_median"] <= 100.0,
        "threads_no_leak": t["leaked"] == 0 and a["leaked_blocks"] == 0,
        "batch_block_le_1us": b["ns_per_block_median"] <= 1000.0 and b["leaked"] == 0,
    }
    for k, v in goals.items():
        print(f"  goal {k}: {'met' if v else 'NOT met'}")
    out = {**run_header(device), "machine": machine,
           "results": {"alloc_10mb": a, "threads": t, "batch_blocks": b}, "goals": goals}
    if args.out:
        write_json(args.out, out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
