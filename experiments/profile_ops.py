"""Where the time of a small kernel call goes, and how decode attention's split-KV factor plays out.

On a CUDA device, for ``append_kv`` and ``paged_decode_attention`` at the benchmark's shapes (32 query
heads, 8 KV heads, head_dim 128, block 16, bf16), prints and writes as JSON:

* host microseconds per call (wall clock over back-to-back calls, then one sync), for: the public op,
  the registered op through ``torch.ops.kvtriton`` (the dispatcher), and argument validation alone;
* for attention, ``PagedAttentionPlan``: host microseconds of ``plan()`` (once per step) and of ``run()``
  (once per layer; target <= 15 us), and run's device time from a CUDA graph;
* a mixed batch (decoding sequences plus prefill chunks) through the plan: run's host time against
  the two functional ops it replaces;
* device time from a CUDA graph of the public op (no launch cost);
* for attention, the graph time at each forced ``num_splits`` next to the heuristic's choice.

``--device cpu`` runs the CPU twin instead (``profile_ops_cpu.py``: every op against direct PyTorch).

    python experiments/profile_ops.py --out profile_ops.json
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from _bench_utils import resolve_device, run_header, write_json
from bench_kernels import Timer, append_case, attention_case, mixed_case, mixed_split
from kvtriton import ops
from kvtriton.ops import attention as attn_mod
from kvtriton.ops.attention import _device_sms, decode_launch_config

HQ, HKV, D, BS = 32, 8, 128, 16
DTYPE = torch.bfloat16
PLAN_RUN_TARGET_US = 15.0


def host_us(fn, dev, n=2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize(dev)
    return host


def _variants(timer, q, kc, vc, tables, lens, cfg, nbytes, splits_options):
    """Graph time of other tile sizes, warps and pipeline stages (the heuristic's choice first)."""
    import dataclasses
    orig = attn_mod.decode_launch_config
    rows = []
    try:
        for sp in splits_options:
            for block_n in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (2, 3):
                        v = dataclasses.replace(cfg, num_splits=sp, block_n=block_n, num_warps=warps,
                                                num_stages=stages)
                        attn_mod.decode_launch_config = lambda *args, _v=v, **kw: _v
                        ms = timer.graph(lambda: ops.paged_decode_attention(q, kc, vc, tables, lens))
                        if ms is not None:
                            rows.append({"num_splits": sp, "block_n": block_n, "num_warps": warps,
                                         "num_stages": stages, "graph_us": ms * 1e3,
                                         "gbps": nbytes / (ms * 1e-3) / 1e9})
    finally:
        attn_mod.decode_launch_config = orig
    rows.sort(key=lambda r: r["graph_us"])
    print(f"    heuristic {cfg}; fastest variants: " + "; ".join(
        f"splits {r['num_splits']} block_n {r['block_n']} warps {r['num_warps']} stages {r['num_stages']}: "
        f"{r['graph_us']:.1f} us" for r in rows[:4]), flush=True)
    return rows


def _cprofile(label, fn, dev, n=300):
    import cProfile
    import io
    import pstats
    for _ in range(20):
        fn()
    torch.cuda.synchronize(dev)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    torch.cuda.synchronize(dev)
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(18)
    print(f"--- cProfile of {n} eager calls of {label}, by own time:")
    print("\n".join(line for line in buf.getvalue().splitlines() if line.strip())[:6000], flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--wide", action="store_true", help="sweep split-KV over more (batch, context) shapes")
    ap.add_argument("--cprofile", action="store_true", help="also print a cProfile of eager calls")
    ap.add_argument("--device", default="cuda",
                    help="cuda, cuda:N, or cpu for the CPU twin (profile_ops_cpu.py); auto: the GPU if any, else cpu")
    a, rest = ap.parse_known_args(argv)
    try:
        dev = resolve_device(a.device)
    except ValueError as e:
        print(f"profile_ops needs a CUDA device: {e}", file=sys.stderr)
        return 2
    if dev.type == "cpu":
        import profile_ops_cpu
        return profile_ops_cpu.main((["--out", a.out] if a.out else []) + rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    torch.cuda.set_device(dev)   # Triton launches on the current device
    timer = Timer(dev, smoke=False)
    head = run_header(dev)
    out = {**head, "device": head["device_name"],   # the GPU's name, as before the shared header
           "append": [], "attention": [], "mixed": [], "plan_run_target_us": PLAN_RUN_TARGET_US}
    print(f"profile_ops on {out['device']}", flush=True)
    for n in (256, 4096):
        arena, kc, vc, slots, k, v = append_case(dev, n)
        row = {"tokens": n,
               "public_host_us": host_us(lambda: ops.append_kv(k, v, kc, vc, slots), dev),
               "dispatcher_host_us": host_us(lambda: torch.ops.kvtriton.append_kv(k, v, kc, vc, slots), dev),
               "graph_us": timer.graph(lambda: ops.append_kv(k, v, kc, vc, slots)) * 1e3}
        out["append"].append(row)
        if a.cprofile and n == 256:
            _cprofile("append_kv (256 tokens)", lambda: ops.append_kv(k, v, kc, vc, slots), dev)
        print(f"append_kv {n:>6} tokens: host per call public {row['public_host_us']:.1f} us, via dispatcher "
              f"{row['dispatcher_host_us']:.1f} us; device (graph) {row['graph_us']:.1f} us", flush=True)
    cases = [(32, 1024), (32, 4096), (128, 4096), (8, 32768)]
    if a.wide:
        cases += [(64, 4096), (96, 4096), (192, 4096), (256, 2048), (16, 16384), (64, 1024), (128, 1024),
                  (4, 32768)]
    for batch, ctx in cases:
        mb = -(-ctx // BS)
        arena, kc, vc, tables, lens, q = attention_case(dev, batch, ctx)
        esz = 2
        nbytes = 2 * batch * ctx * HKV * D * esz
        cfg = decode_launch_config(batch, HKV, HQ // HKV, D, BS, mb * BS, esz, _device_sms(dev))
        row = {"batch": batch, "ctx": ctx, "heuristic_splits": cfg.num_splits,
               "public_host_us": host_us(lambda: ops.paged_decode_attention(q, kc, vc, tables, lens), dev, 500),
               "validate_host_us": host_us(lambda: attn_mod._validate(q, kc, vc, tables, lens, None, None, None),
                                           dev, 2000),
               "dispatcher_host_us": host_us(lambda: torch.ops.kvtriton.paged_decode_attention(
                   q, kc, vc, tables, lens, D ** -0.5, 0, False, 0), dev, 500),
               "splits": {}}
        tables_h, lens_h = tables.cpu(), lens.cpu()

        def make_plan():
            return ops.PagedAttentionPlan().plan(tables_h, lens_h, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                                                 block_size=BS, num_blocks=kc.shape[0], dtype=DTYPE, device=dev)

        plan = make_plan()
        row["plan_host_us"] = host_us(lambda: plan.plan(tables_h, lens_h, num_q_heads=HQ, num_kv_heads=HKV,
                                                        head_dim=D, block_size=BS, num_blocks=kc.shape[0],
                                                        dtype=DTYPE, device=dev), dev, 200)
        row["plan_run_host_us"] = host_us(lambda: plan.run(q, kc, vc), dev, 2000)
        g = timer.graph(lambda: plan.run(q, kc, vc))
        row["plan_run_graph_us"] = g * 1e3 if g is not None else None
        row["plan_run_meets_target"] = row["plan_run_host_us"] <= PLAN_RUN_TARGET_US
        if a.cprofile and (batch, ctx) == (32, 1024):
            _cprofile("PagedAttentionPlan.run (32, 1024)", lambda: plan.run(q, kc, vc), dev)
        for sp in sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, 32, cfg.num_splits}):
            if sp > mb // 2 and sp != 1:
                continue
            ms = timer.graph(lambda: ops.paged_decode_attention(q, kc, vc, tables, lens, num_splits=sp))
            if ms is not None:
                row["splits"][sp] = {"graph_us": ms * 1e3, "frac_copy_gbps": nbytes / (ms * 1e-3) / 1e9}
        if a.wide and (batch, ctx) in ((32, 1024), (128, 4096), (32, 4096)):
            row["variants"] = _variants(timer, q, kc, vc, tables, lens, cfg, nbytes, splits_options=sorted(
                {cfg.num_splits, int(max(row["splits"], key=lambda k: -row["splits"][k]["graph_us"]))}))
        if a.cprofile and (batch, ctx) == (32, 1024):
            _cprofile("paged_decode_attention (32, 1024)",
                      lambda: ops.paged_decode_attention(q, kc, vc, tables, lens), dev)
        best = min(row["splits"].items(), key=lambda kv: kv[1]["graph_us"])
        row["best_splits"] = best[0]
        out["attention"].append(row)
        print(f"attention batch={batch} ctx={ctx}: host per call public {row['public_host_us']:.1f} us (validation "
              f"{row['validate_host_us']:.1f}, via dispatcher {row['dispatcher_host_us']:.1f}); planned: plan() "
              f"{row['plan_host_us']:.1f} us per step, run() {row['plan_run_host_us']:.1f} us per layer (target <= "
              f"{PLAN_RUN_TARGET_US:.0f}: {'met' if row['plan_run_meets_target'] else 'MISSED'}), run from a graph "
              f"{row['plan_run_graph_us'] or float('nan'):.1f} us; heuristic splits "
              f"{cfg.num_splits}; graph us by splits: "
              + ", ".join(f"{sp}: {r['graph_us']:.1f} ({r['frac_copy_gbps']:.0f} GB/s)" for sp, r in row["splits"].items()),
              flush=True)
        del arena, kc, vc, tables, lens, q, plan
        torch.cuda.empty_cache()
    for n_decode, ctx, n_prefill, chunk, prefix in ((32, 1024, 2, 256, 768), (128, 2048, 4, 512, 1536)):
        arena, kc, vc, tables, lens, cu, q, lens_l, chunks = mixed_case(dev, n_decode, ctx, n_prefill, chunk, prefix)
        tables_h, lens_h = tables.cpu(), lens.cpu()
        plan = ops.PagedAttentionPlan().plan(tables_h, lens_h, cu, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                                             block_size=BS, num_blocks=kc.shape[0], dtype=DTYPE, device=dev)
        d_rows, p_rows, (t1, l1), (t2, l2, p_cu) = mixed_split(tables, lens, cu, chunks, dev)
        q1, q2 = q[d_rows], q[p_rows]

        def functional():
            ops.paged_decode_attention(q1, kc, vc, t1, l1)
            ops.paged_prefill_attention(q2, kc, vc, t2, l2, p_cu)

        row = {"decode": [n_decode, ctx], "prefill": [n_prefill, chunk, prefix], "launches": plan.describe().__repr__(),
               "plan_host_us": host_us(lambda: plan.plan(tables_h, lens_h, cu, num_q_heads=HQ, num_kv_heads=HKV,
                                                         head_dim=D, block_size=BS, num_blocks=kc.shape[0],
                                                         dtype=DTYPE, device=dev), dev, 200),
               "plan_run_host_us": host_us(lambda: plan.run(q, kc, vc), dev, 2000),
               "functional_host_us": host_us(functional, dev, 500)}
        g = timer.graph(lambda: plan.run(q, kc, vc))
        row["plan_run_graph_us"] = g * 1e3 if g is not None else None
        row["plan_run_meets_target"] = row["plan_run_host_us"] <= PLAN_RUN_TARGET_US
        out["mixed"].append(row)
        print(f"mixed {n_decode}x{ctx} decode + {n_prefill}x{chunk} prefill (prefix {prefix}): plan() "
              f"{row['plan_host_us']:.1f} us, run() {row['plan_run_host_us']:.1f} us per layer (target <= "
              f"{PLAN_RUN_TARGET_US:.0f}: {'met' if row['plan_run_meets_target'] else 'MISSED'}) vs the two "
              f"functional ops {row['functional_host_us']:.1f} us; run from a graph "
              f"{row['plan_run_graph_us'] or float('nan'):.1f} us", flush=True)
        del arena, kc, vc, q, plan
        torch.cuda.empty_cache()
    if a.out:
        print(f"wrote {write_json(a.out, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
