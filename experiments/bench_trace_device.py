"""Serve the head of a trace on the device, once per policy: the serving loop's numbers.

Replays the first ``--requests`` requests of a trace through ``kvtriton.replay.replay_device`` (real pool,
policy, ``append_kv`` + ``paged_prefill_attention`` prefill and ``paged_decode_attention`` decode over
every layer) for each policy, at one pool size, and reports per policy: block and token hit rate, prefill
tokens computed and saved, evictions, preemptions, time to first token (p50/p90/p99), queueing delay, the
prefill's measured attention time beside its cost model (projections and MLP), throughput, decode
tokens/s and the split of step time. Arrivals keep the trace's times (or are compressed,
``--time-compression``: request i arrives at ``arrival_s / c`` on the serving clock, while the policies
keep seeing the trace's own ``arrival_s``), prompts may be truncated (their hash ids stay
prefix-consistent) and outputs capped, so one policy takes seconds to a minute on a GPU.

Workloads (``--workload``):

- ``mooncake`` (default): a Mooncake trace file (``--traces``, ``--trace``).
- ``agentic``: the agentic coding traces (``kvtriton.workloads.load_agentic``: 512-token blocks, main
  conversations only, conversations starting as a Poisson process at ``--arrival-rate`` per second, seed
  ``--seed``), head = the first N requests in arrival order. Requests carry their session id and stop
  reason, which ``session_aware`` uses (its mode is checked: a short direct replay on the same engine).
  ``--conversations K`` reads only the first K conversations (the head is exact when the N-th request
  arrives before conversation K starts; the output says whether it does).

``--pick-capacity`` chooses the pool size from a fast replay (``kvtriton.replay.simulate``) of the same
head, keyed as the device replay keys it (capped prompts, pool blocks): the fraction of
``--capacity-fracs`` where the policies' hit rates differ most.

    python experiments/bench_trace_device.py --out bench_trace_device.json          # GPU defaults
    python experiments/bench_trace_device.py --device cpu --small                    # CPU smoke run
    python experiments/bench_trace_device.py --workload agentic --device cpu --small --requests 400 \\
        --policies lru arc s3fifo session_aware --pick-capacity --time-compression 4

The Mooncake trace is read from ``--traces`` (default ``$KVTRITON_TRACES`` or ``../shared/traces/mooncake``),
the agentic one from ``--agentic-path`` (default ``$KVTRITON_AGENTIC_TRACES`` or
``../shared/traces/weka-agentic``). Results are written after every policy, so a run stopped part-way keeps
what it finished.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from _bench_utils import resolve_device, run_header, write_json
from kvtriton.memory.hashing import expand_hash_ids
from kvtriton.replay import DeviceReplayConfig, replay_device
from kvtriton.spec import get_spec
from kvtriton.workloads import load_mooncake

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACES = os.environ.get("KVTRITON_TRACES", str(ROOT.parent / "shared" / "traces" / "mooncake"))
KEYS = ("hit_rate", "token_hit_rate", "prefill_tokens", "prefill_tokens_saved", "prefill_tokens_computed",
        "evictions", "preemptions", "ttft_s_mean", "ttft_s_p50", "ttft_s_p90", "ttft_s_p99",
        "queueing_delay_s_mean", "queueing_delay_s_p50", "queueing_delay_s_p90", "queueing_delay_s_p99",
        "prefill_attention_s", "prefill_model_s", "completed", "sim_time_s", "throughput_req_per_s",
        "throughput_tok_per_s", "decode_tokens", "decode_tokens_per_s",
        "step_kernel_frac", "step_memory_frac", "step_other_frac", "compactions", "compaction_s",
        "utilization_mean", "external_fragmentation_max", "wall_s")
CAPACITY_FRACS = (0.05, 0.1, 0.15, 0.25, 0.4)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--small", action="store_true",
                    help="CPU-sized: tiny model, 60 requests, 2048-token prompts, 4 output tokens")
    ap.add_argument("--workload", choices=("mooncake", "agentic"), default="mooncake")
    ap.add_argument("--traces", default=DEFAULT_TRACES, help="folder with the Mooncake JSONL traces")
    ap.add_argument("--trace", default="conversation_trace", help="Mooncake trace file name without .jsonl")
    ap.add_argument("--agentic-path", default=None,
                    help="agentic traces: the archive or its folder (default: kvtriton.workloads.paths)")
    ap.add_argument("--arrival-rate", type=float, default=0.1,
                    help="agentic: conversations start as a Poisson process at this rate per second")
    ap.add_argument("--seed", type=int, default=0, help="agentic: seed of the conversation starts")
    ap.add_argument("--conversations", type=int, default=None,
                    help="agentic: read only the first K conversations (default: all; the head is exact)")
    ap.add_argument("--model", default=None, help="model preset (default llama-3-8b; tiny with --small)")
    ap.add_argument("--layers", type=int, default=None, help="override the model's layer count (default 8)")
    ap.add_argument("--requests", type=int, default=None, help="first N requests (default 1000)")
    ap.add_argument("--max-input", type=int, default=None, help="truncate prompts to this many tokens")
    ap.add_argument("--max-output", type=int, default=None, help="cap output tokens per request")
    ap.add_argument("--batch", type=int, default=None, help="running sequences at most (default 64; 8 with --small)")
    ap.add_argument("--capacity-frac", type=float, default=0.25,
                    help="pool size as a fraction of the blocks the replayed prompts touch (distinct)")
    ap.add_argument("--pick-capacity", action="store_true",
                    help="choose --capacity-frac among --capacity-fracs by a fast replay of the same head")
    ap.add_argument("--capacity-fracs", type=float, nargs="+", default=list(CAPACITY_FRACS))
    ap.add_argument("--time-compression", type=float, default=1.0, help="arrivals at arrival_s / this")
    ap.add_argument("--step-time-s", type=float, default=None,
                    help="every step lasts this long on the serving clock (default: its measured wall time)")
    ap.add_argument("--prefill-s-per-token", type=float, default=1e-4,
                    help="prefill cost model: seconds of projections and MLP per missed prompt token "
                         "(TTFT only; the prefill attention is measured)")
    ap.add_argument("--policies", nargs="+", default=["lru", "arc", "s3fifo", "prefix_aware"])
    ap.add_argument("--out", default=None, help="write the results as JSON here (after every policy)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                    help="a progress bar per policy (default: when stderr is a terminal)")
    return ap


# ------------------------------------------------------------------------------------------ workloads

def _load_mooncake(a, n):
    path = Path(a.traces) / f"{a.trace}.jsonl"
    if not path.exists():
        print(f"trace not found: {path} (set --traces or KVTRITON_TRACES)", file=sys.stderr)
        return None, None
    return load_mooncake(path)[:n], {"trace": a.trace, "arrivals": "the trace's timestamps"}


def _load_agentic(a, n):
    from kvtriton.workloads.agentic import conversation_starts, load_agentic
    from kvtriton.workloads.paths import agentic_trace_path

    path = Path(a.agentic_path) if a.agentic_path else agentic_trace_path()
    if not path.exists():
        print(f"agentic traces not found: {path} (set --agentic-path or KVTRITON_AGENTIC_TRACES)", file=sys.stderr)
        return None, None
    reqs = load_agentic(path, arrival_rate=a.arrival_rate, seed=a.seed, limit=a.conversations)[:n]
    k = a.conversations
    exact = k is None or reqs[-1].arrival_s < conversation_starts(k + 1, a.arrival_rate, a.seed)[k]
    sessions = len({r.session_id for r in reqs})
    info = {"trace": "agentic (claude_code_traces)", "conversations_read": k, "head_exact": bool(exact),
            "sessions": sessions, "trace_span_s": reqs[-1].arrival_s,
            "arrivals": (f"conversations start as a Poisson process at {a.arrival_rate:g}/s (mean gap "
                         f"{1 / a.arrival_rate:g} s, seed {a.seed}); each request at its conversation's start "
                         f"+ its own offset; 512-token blocks; main conversations only (no sub-agents)")}
    return reqs, info


# ------------------------------------------------------------------------------------------ pool size

def _pool_keyed(reqs, bs, max_input):
    """The head as the device replay keys it: capped prompts, one hash per full pool block."""
    from dataclasses import replace

    out = []
    for r in reqs:
        prompt = min(r.input_length, max_input)
        keys = expand_hash_ids(r.hash_ids, r.block_tokens, bs, prompt) if r.hash_ids else []
        out.append(replace(r, input_length=prompt, hash_ids=tuple(keys), block_tokens=bs))
    return out


def _pick_capacity(a, reqs, bs, max_input, distinct, floor):
    """Fast-replay hit rate of every policy at every fraction of ``--capacity-fracs``; the fraction whose
    hit rates spread most (max - min)."""
    from kvtriton.replay import prepare_trace, simulate

    trace = prepare_trace(_pool_keyed(reqs, bs, max_input))
    table, best = {}, None
    for frac in a.capacity_fracs:
        cap = max(int(distinct * frac), floor)
        rates = {p: simulate(trace, p, cap)["hit_rate"] for p in a.policies}
        spread = max(rates.values()) - min(rates.values())
        table[f"{frac:g}"] = {"capacity_blocks": cap, "hit_rate": rates, "spread": spread}
        print(f"  fast replay, pool {frac:>5.0%} = {cap} blocks: " +
              ", ".join(f"{p} {h:.4f}" for p, h in rates.items()) + f" (spread {spread:.4f})", flush=True)
        if best is None or spread > best[1] + 1e-12:
            best = (frac, spread)
    return best[0], table


# ------------------------------------------------------------------------------------------ checks

def _session_mode(reqs, spec, capacity, cfg, k=12):
    """``session_aware``'s mode in the device replay: a direct replay of the head's first ``k`` requests
    on the replay engine itself, its pool's policy read before the engine closes."""
    from dataclasses import replace

    from kvtriton.memory import GPUMemoryAllocator
    from kvtriton.replay.engine import ReplayEngine
    from kvtriton.replay.sequences import prepare_sequences, resolve_models

    small = replace(cfg, max_requests=k, record_every=1)
    specs, by_request = resolve_models(spec, small)
    seqs = prepare_sequences(reqs, small, specs, by_request)
    device = resolve_device(cfg.device)
    engine = ReplayEngine(seqs, specs, "session_aware", capacity, None, small, device, GPUMemoryAllocator)
    try:
        engine.run(False, None)
        return next(iter(engine.models.values())).pool.policy.mode
    finally:
        engine.close()


# ------------------------------------------------------------------------------------------ replay

def _summarise(res) -> dict:
    """The summary's KEYS, with p90s and throughput from the per-request rows."""
    s = dict(res.summary)
    rows = [r for r in res.requests if r.get("ttft_s") is not None]
    for key in ("ttft_s", "queueing_delay_s"):
        vals = np.array([r[key] for r in rows if r.get(key) is not None], dtype=float)
        s[f"{key}_p90"] = float(np.percentile(vals, 90)) if len(vals) else 0.0
    sim = s.get("sim_time_s") or 0.0
    out_tokens = sum(r.get("output_tokens") or 0 for r in res.requests)
    s["throughput_req_per_s"] = s["completed"] / sim if sim > 0 else 0.0
    s["throughput_tok_per_s"] = (s["prefill_tokens"] + out_tokens) / sim if sim > 0 else 0.0
    return {k: s.get(k) for k in KEYS}


def _print_row(pol, row) -> None:
    print(f"{pol:>14}: hit {row['hit_rate']:.4f}, token hit {row['token_hit_rate']:.4f}, saved "
          f"{row['prefill_tokens_saved']} of {row['prefill_tokens']} prefill tokens, evictions {row['evictions']}, "
          f"preemptions {row['preemptions']}, TTFT p50/p90/p99 {row['ttft_s_p50'] * 1e3:.1f}/"
          f"{row['ttft_s_p90'] * 1e3:.1f}/{row['ttft_s_p99'] * 1e3:.1f} ms, queueing p50/p99 "
          f"{row['queueing_delay_s_p50'] * 1e3:.1f}/{row['queueing_delay_s_p99'] * 1e3:.1f} ms, throughput "
          f"{row['throughput_req_per_s']:.2f} req/s, prefill attention {row['prefill_attention_s']:.3f} s (cost "
          f"model {row['prefill_model_s']:.3f} s), decode {row['decode_tokens_per_s']:.0f} tok/s, step split "
          f"kernels {row['step_kernel_frac']:.1%} / memory {row['step_memory_frac']:.1%} / other "
          f"{row['step_other_frac']:.1%}; {row['elapsed_s']:.1f} s", flush=True)


def _print_table(results: dict) -> None:
    cols = (("hit", "hit_rate", 1, "{:.4f}"), ("saved_tok", "prefill_tokens_saved", 1, "{:d}"),
            ("ttft_p50_ms", "ttft_s_p50", 1e3, "{:.1f}"), ("ttft_p90_ms", "ttft_s_p90", 1e3, "{:.1f}"),
            ("ttft_p99_ms", "ttft_s_p99", 1e3, "{:.1f}"), ("queue_p50_ms", "queueing_delay_s_p50", 1e3, "{:.1f}"),
            ("queue_p99_ms", "queueing_delay_s_p99", 1e3, "{:.1f}"), ("req/s", "throughput_req_per_s", 1, "{:.2f}"),
            ("tok/s", "throughput_tok_per_s", 1, "{:.0f}"))
    print(f"{'policy':>14} " + " ".join(f"{c[0]:>12}" for c in cols))
    for pol, row in results.items():
        cells = [c[3].format(row[c[1]] * c[2] if c[2] != 1 else row[c[1]]) for c in cols]
        print(f"{pol:>14} " + " ".join(f"{v:>12}" for v in cells))


def _setup(a):
    """``(requests, spec, config, header)``, or None when the trace is missing (the reason on stderr)."""
    small = a.small
    model = a.model or ("tiny" if small else "llama-3-8b")
    n = a.requests or (60 if small else 1000)
    max_input = a.max_input or (2048 if small else 8192)
    max_output = a.max_output or (4 if small else 32)
    a.batch = a.batch or (8 if small else 64)
    reqs, info = (_load_agentic if a.workload == "agentic" else _load_mooncake)(a, n)
    if reqs is None:
        return None
    n = len(reqs)
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
    floor = 4 * spec.blocks_for_tokens(max_input + max_output)
    picked = None
    if a.pick_capacity:
        a.capacity_frac, picked = _pick_capacity(a, reqs, bs, max_input, len(seen), floor)
    capacity = max(int(len(seen) * a.capacity_frac), floor)
    cfg = DeviceReplayConfig(device=str(dev), max_requests=n, time_compression=a.time_compression,
                             max_input_tokens=max_input, max_output_tokens=max_output, max_batch=a.batch,
                             prefill_s_per_token=a.prefill_s_per_token, step_time_s=a.step_time_s,
                             record_every=16, seed=0,
                             # one model owns the arena: no other pool could take chunks a compaction frees
                             compaction_threshold=None)
    span = reqs[-1].arrival_s - reqs[0].arrival_s
    head = {**run_header(dev), "workload": a.workload, **info, "requests": n, "model": model,
            "num_layers": spec.num_layers, "block_size": bs, "max_input_tokens": max_input,
            "max_output_tokens": max_output, "max_batch": a.batch, "time_compression": a.time_compression,
            "step_time_s": a.step_time_s, "prefill_s_per_token": a.prefill_s_per_token,
            "head_span_s": span, "arrival_rate_req_per_s": (n - 1) / span * a.time_compression if span > 0 else None,
            "distinct_prompt_blocks": len(seen), "capacity_frac": a.capacity_frac, "capacity_blocks": capacity,
            "capacity_pick": picked, "pool_gib": capacity * spec.bytes_per_block / 2**30, "results": {}}
    return reqs, spec, cfg, head


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    setup = _setup(a)
    if setup is None:
        return 2
    reqs, spec, cfg, head = setup
    n, cap = head["requests"], head["capacity_blocks"]
    rate = head["arrival_rate_req_per_s"]
    print(f"device: {head['device_name']}; {head['trace']} first {n} requests (prompts <= {head['max_input_tokens']} "
          f"tokens, outputs <= {head['max_output_tokens']}); model {head['model']} with {spec.num_layers} layers, "
          f"block {spec.block_size}; pool {cap} blocks ({head['pool_gib']:.2f} GiB) = {a.capacity_frac:.0%} of "
          f"{head['distinct_prompt_blocks']} distinct prompt blocks", flush=True)
    print(f"arrivals: {head['arrivals']}; the head spans {head['head_span_s']:.1f} s of trace time, replayed "
          f"compressed {a.time_compression:g}x: {rate or 0:.3f} requests/s on the serving clock", flush=True)
    if "session_aware" in a.policies:
        head["session_aware_mode"] = mode = _session_mode(reqs, spec, cap, cfg)
        print(f"session_aware runs in {mode!r} mode in the device replay", flush=True)
    for pol in a.policies:
        t0 = time.perf_counter()
        res = replay_device(reqs, spec, pol, capacity_blocks=cap, config=cfg, progress=a.progress)
        row = _summarise(res)
        row["elapsed_s"] = time.perf_counter() - t0
        head["results"][pol] = row
        _print_row(pol, row)
        if a.out:
            write_json(a.out, head)
    _print_table(head["results"])
    if a.out:
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
