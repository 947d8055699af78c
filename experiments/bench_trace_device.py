"""Serve the head of a Mooncake trace on the device, once per policy: the serving loop's numbers.

Replays the first ``--requests`` requests of a trace through ``kvtriton.replay.replay_device`` (real pool,
policy, ``append_kv`` + ``paged_prefill_attention`` prefill and ``paged_decode_attention`` decode over
every layer) for each policy, at one pool size, and reports per policy: block and token hit rate, prefill
tokens computed, evictions, preemptions, time to first token, the prefill's measured attention time
beside its cost model (projections and MLP), decode tokens/s and the split of step time. Arrivals keep the trace's
times (or are compressed, ``--time-compression``), prompts may be truncated (their hash ids
stay prefix-consistent) and outputs capped, so one policy takes seconds to a minute on a GPU.

    python experiments/bench_trace_device.py --out bench_trace_device.json          # GPU defaults
    python experiments/bench_trace_device.py --device cpu --small                    # CPU smoke run

The trace is read from ``--traces`` (default ``$KVTRITON_TRACES`` or ``../shared/traces/mooncake``).
Results are written after every policy, so a run stopped part-way keeps what it finished.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from _bench_utils import resolve_device, run_header, write_json
from kvtriton.replay import DeviceReplayConfig, replay_device
from kvtriton.spec import get_spec
from kvtriton.memory.hashing import expand_hash_ids
from kvtriton.workloads import load_mooncake

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACES = os.environ.get("KVTRITON_TRACES", str(ROOT.parent / "shared" / "traces" / "mooncake"))
KEYS = ("hit_rate", "token_hit_rate", "prefill_tokens_computed", "evictions", "preemptions",
        "ttft_s_p50", "ttft_s_p99", "queueing_delay_s_p50", "prefill_attention_s", "prefill_model_s",
        "decode_tokens", "decode_tokens_per_s",
        "step_kernel_frac", "step_memory_frac", "step_other_frac", "compactions", "compaction_s",
        "utilization_mean", "external_fragmentation_max", "wall_s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--small", action="store_true",
                    help="CPU-sized: tiny model, 60 requests, 2048-token prompts, 4 output tokens")
    ap.add_argument("--traces", default=DEFAULT_TRACES, help="folder with the Mooncake JSONL traces")
    ap.add_argument("--trace", default="conversation_trace", help="trace file name without .jsonl")
    ap.add_argument("--model", default=None, help="model preset (default llama-3-8b; tiny with --small)")
    ap.add_argument("--layers", type=int, default=None, help="override the model's layer count (default 8)")
    ap.add_argument("--requests", type=int, default=None, help="first N requests (default 1000)")
    ap.add_argument("--max-input", type=int, default=None, help="truncate prompts to this many tokens")
    ap.add_argument("--max-output", type=int, default=None, help="cap output tokens per request")
    ap.add_argument("--batch", type=int, default=None, help="running sequences at most (default 64; 8 with --small)")
    ap.add_argument("--capacity-frac", type=float, default=0.25,
                    help="pool size as a fraction of the blocks the replayed prompts touch (distinct)")
    ap.add_argument("--time-compression", type=float, default=1.0, help="arrivals at arrival_s / this")
    ap.add_argument("--prefill-s-per-token", type=float, default=1e-4,
                    help="prefill cost model: seconds of projections and MLP per missed prompt token "
                         "(TTFT only; the prefill attention is measured)")
    ap.add_argument("--policies", nargs="+", default=["lru", "arc", "s3fifo", "prefix_aware"])
    ap.add_argument("--out", default=None, help="write the results as JSON here (after every policy)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                    help="a progress bar per policy (default: when stderr is a terminal)")
    a = ap.parse_args(argv)

    small = a.small
    model = a.model or ("tiny" if small else "llama-3-8b")
    n = a.requests or (60 if small else 1000)
    max_input = a.max_input or (2048 if small else 8192)
    max_output = a.max_output or (4 if small else 32)
    a.batch = a.batch or (8 if small else 64)
    path = Path(a.traces) / f"{a.trace}.jsonl"
    if not path.exists():
        print(f"trace not found: {path} (set --traces or KVTRITON_TRACES)", file=sys.stderr)
        return 2
    reqs = load_mooncake(path)[:n]
    spec = get_spec(model)
    layers = a.layers or (None if small else 8)
    if layers:
        spec = spec.with_(num_layers=layers)
    dev = resolve_device(a.device)
    # distinct pool blocks the (truncated) prompts touch, keyed as the replay keys them
    bs = spec.block_size
    seen = set()
    for r in reqs:
        if r.hash_ids:
            seen.update(expand_hash_ids(r.hash_ids, r.block_tokens, bs, min(r.input_length, max_input)))
    capacity = max(int(len(seen) * a.capacity_frac), 4 * spec.blocks_for_tokens(max_input + max_output))
    cfg = DeviceReplayConfig(device=str(dev), max_requests=n, time_compression=a.time_compression,
                             max_input_tokens=max_input, max_output_tokens=max_output, max_batch=a.batch,
                             prefill_s_per_token=a.prefill_s_per_token, record_every=16, seed=0,
                             # one model owns the arena: no other pool could take chunks a compaction frees
                             compaction_threshold=None)
    head = {**run_header(dev), "trace": a.trace, "requests": n, "model": model,
            "num_layers": spec.num_layers, "block_size": bs, "max_input_tokens": max_input,
            "max_output_tokens": max_output, "max_batch": a.batch, "time_compression": a.time_compression,
            "distinct_prompt_blocks": len(seen), "capacity_blocks": capacity,
            "pool_gib": capacity * spec.bytes_per_block / 2**30, "results": {}}
    print(f"device: {head['device_name']}; {a.trace} first {n} requests (prompts <= {max_input} tokens, outputs <= "
          f"{max_output}); model {model} with {spec.num_layers} layers, block {bs}; pool {capacity} blocks "
          f"({head['pool_gib']:.2f} GiB) = {a.capacity_frac:.0%} of {len(seen)} distinct prompt blocks",
          flush=True)
    for pol in a.policies:
        t0 = time.perf_counter()
        res = replay_device(reqs, spec, pol, capacity_blocks=capacity, config=cfg, progress=a.progress)
        s = res.summary
        row = {k: s.get(k) for k in KEYS}
        row["elapsed_s"] = time.perf_counter() - t0
        head["results"][pol] = row
        print(f"{pol:>14}: hit {s['hit_rate']:.4f}, token hit {s['token_hit_rate']:.4f}, evictions "
              f"{s['evictions']}, preemptions {s['preemptions']}, TTFT p50 {s['ttft_s_p50'] * 1e3:.1f} ms "
              f"p99 {s['ttft_s_p99'] * 1e3:.1f} ms, prefill attention {s['prefill_attention_s']:.3f} s (cost model "
              f"{s['prefill_model_s']:.3f} s), decode {s['decode_tokens_per_s']:.0f} tok/s, step split "
              f"kernels {s['step_kernel_frac']:.1%} / memory {s['step_memory_frac']:.1%} / other "
              f"{s['step_other_frac']:.1%}; {row['elapsed_s']:.1f} s", flush=True)
        if a.out:
            write_json(a.out, head)
    if a.out:
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
