"""Step-time split of the device replay at the performance goal's shape.

Goal (on an H100/H200): memory management (allocator, policy, bookkeeping) at most 5% of the decode
step time at batch 64, 4096-token contexts, a 32-layer model shape (Llama-3-8B's KV shape: 8 KV heads of
128, bf16, blocks of 16 tokens).

The benchmark replays ``batch`` requests that all arrive at time 0 with ``context`` prompt tokens and
``steps + 1`` output tokens through ``kvtriton.replay.replay_device`` (so the numbers are the replay's own
accounting: the real pool, policy and kernels), then reports the split over the pure decode steps (no
admission, no prefill in them) after ``warmup`` of them: kernels (``append_kv`` + ``paged_decode_attention``
over every layer, CUDA events), memory management (host time in the pool and the block-table
bookkeeping), other (the rest of the step's wall time).

    python experiments/bench_replay_device.py --out bench_replay_device.json          # GPU, goal shape
    python experiments/bench_replay_device.py --device cpu --small                    # CPU smoke run
    python experiments/bench_replay_device.py --device cpu --host-only                # host side at the goal shape

``--host-only`` measures the memory-management side alone at the goal's batch, context and layer count:
the kernels are replaced by no-ops and the KV heads shrunk to one of 8 floats (the pool's bookkeeping
does not depend on the head shape), so it runs on any CPU; its memory-management time per step, over
the kernel time of a GPU run, is the fraction the goal bounds.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from _bench_utils import device_name, percentiles, resolve_device, run_header, write_json
from kvtriton.ops import _backend
from kvtriton.replay import DeviceReplayConfig, replay_device
from kvtriton.spec import get_spec
from kvtriton.workloads import Request


def make_requests(batch: int, context: int, output: int, shared_prefix: int, block_tokens: int) -> list[Request]:
    """``batch`` requests at time 0: ``shared_prefix`` tokens common to all (a system prompt), the rest
    unique."""
    reqs = []
    n_blocks = -(-context // block_tokens)
    shared = shared_prefix // block_tokens
    for i in range(batch):
        # ids chain: shared blocks 0..shared-1, then ids unique to this request
        ids = tuple(range(shared)) + tuple(shared + i * n_blocks + k for k in range(n_blocks - shared))
        reqs.append(Request(request_id=i, arrival_s=0.0, input_length=context, output_length=output,
                            hash_ids=ids, block_tokens=block_tokens))
    return reqs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--small", action="store_true", help="a CPU-sized shape (tiny model, batch 8, 256 tokens)")
    ap.add_argument("--model", default=None, help="model preset (default llama-3-8b; tiny with --small)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--context", type=int, default=None, help="prompt tokens per sequence")
    ap.add_argument("--layers", type=int, default=None, help="override the model's layer count")
    ap.add_argument("--steps", type=int, default=None, help="decode steps measured")
    ap.add_argument("--warmup", type=int, default=None, help="decode steps dropped before measuring")
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--shared-prefix", type=int, default=512, help="tokens shared by every prompt")
    ap.add_argument("--host-only", action="store_true",
                    help="no-op kernels, one 8-float KV head: the host-side cost alone at the goal shape")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)

    small = a.small
    model = a.model or ("tiny" if small else "llama-3-8b")
    batch = a.batch or (8 if small else 64)
    context = a.context or (256 if small else 4096)
    steps = a.steps or (16 if small else 64)
    warmup = a.warmup if a.warmup is not None else (2 if small else 8)
    spec = get_spec(model)
    if a.layers:
        spec = spec.with_(num_layers=a.layers)
    elif not small and a.model is None:
        spec = spec.with_(num_layers=32)
    dev = resolve_device(a.device)
    if a.host_only:
        spec = spec.with_(num_kv_heads=1, num_q_heads=1, head_dim=8, dtype="float32")
        import kvtriton.ops as kops
        # the replay looks the ops up when it starts, so no-ops here leave only the host side
        kops.append_kv = lambda *args, **kw: None
        kops.paged_decode_attention = lambda *args, **kw: None
        kops.paged_prefill_attention = lambda *args, **kw: None

    # the prefill makes the first token and the step that admits a sequence decodes one more
    output = warmup + steps + 2
    reqs = make_requests(batch, context, output, min(a.shared_prefix, context // 2), spec.block_size)
    per_seq = spec.blocks_for_tokens(context + output)
    capacity = batch * per_seq + 16
    cfg = DeviceReplayConfig(device=str(dev), max_batch=batch, num_layers=spec.num_layers,
                             compaction_threshold=None, record_every=1, prefill_s_per_token=0.0, seed=0)
    print(f"device: {device_name(dev)}; model {model} ({spec.num_layers} layers, {spec.num_kv_heads} KV heads "
          f"x {spec.head_dim}, {str(spec.dtype).replace('torch.', '')}, block {spec.block_size}); batch {batch}, "
          f"context {context}, {steps} decode steps after {warmup} warm-up; pool {capacity} blocks = "
          f"{capacity * spec.bytes_per_block / 2**30:.2f} GiB; ops backend: "
          f"{'none (host only)' if a.host_only else 'triton' if _backend.use_triton(torch.empty(0, device=dev)) else 'reference'}",
          flush=True)
    res = replay_device(reqs, spec, a.policy, capacity_blocks=capacity, config=cfg)
    decode_rows = [r for r in res.timeseries if r["admitted"] == 0 and r["batch"] == batch]
    rows = decode_rows[warmup:warmup + steps]
    if not rows:
        print("no steady decode steps were recorded", file=sys.stderr)
        return 1
    k = np.array([r["kernel_s"] for r in rows])
    m = np.array([r["memory_s"] for r in rows])
    o = np.array([r["other_s"] for r in rows])
    tot = k + m + o
    split = {
        "steps_measured": len(rows),
        "step_ms_median": float(np.median(tot) * 1e3),
        "kernel_ms_median": float(np.median(k) * 1e3),
        "memory_ms_median": float(np.median(m) * 1e3),
        "other_ms_median": float(np.median(o) * 1e3),
        "kernel_frac": float(k.sum() / tot.sum()),
        "memory_frac": float(m.sum() / tot.sum()),
        "other_frac": float(o.sum() / tot.sum()),
        "memory_frac_median_step": float(np.median(m / tot)),
        "decode_tokens_per_s": float(batch * len(rows) / tot.sum()),
        # the spread over the measured steps, beside the medians
        "step_ms": percentiles(tot, unit="ms", scale=1e3),
        "kernel_ms": percentiles(k, unit="ms", scale=1e3),
        "memory_ms": percentiles(m, unit="ms", scale=1e3),
        "other_ms": percentiles(o, unit="ms", scale=1e3),
    }
    goal = 0.05
    goal_shape = (batch == 64 and context == 4096 and spec.num_layers == 32 and dev.type == "cuda"
                  and not a.host_only)
    print(f"decode step, median over {len(rows)} steps: {split['step_ms_median']:.3f} ms (p95 "
          f"{split['step_ms']['p95_ms']:.3f}) = kernels {split['kernel_ms_median']:.3f} ms + memory management "
          f"{split['memory_ms_median']:.3f} ms (p95 {split['memory_ms']['p95_ms']:.3f}) + other "
          f"{split['other_ms_median']:.3f} ms")
    verdict = ("met" if split["memory_frac"] <= goal else "NOT met") if goal_shape else "not this shape/device"
    print(f"split of step time: kernels {split['kernel_frac']:.2%}, memory management {split['memory_frac']:.2%}"
          f", other {split['other_frac']:.2%}  (goal: memory management <= {goal:.0%} at batch 64, 4096 "
          f"tokens, 32 layers on an H100/H200: {verdict})")
    print(f"decode throughput: {split['decode_tokens_per_s']:.1f} tokens/s; whole replay: "
          f"hit rate {res.summary['hit_rate']:.3f}, preemptions {res.summary['preemptions']}, "
          f"wall {res.summary['wall_s']:.2f} s")
    out = {**run_header(dev), "model": model, "num_layers": spec.num_layers, "batch": batch,
           "context": context, "block_size": spec.block_size, "policy": a.policy, "goal_memory_frac": goal,
           "goal_shape": goal_shape, "goal_met": bool(goal_shape and split["memory_frac"] <= goal),
           "host_only": a.host_only,
           "split": split, "summary": res.summary}
    if a.out:
        write_json(a.out, out)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
