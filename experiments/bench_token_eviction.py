"""What token eviction buys: KV bytes held, decode step time and the strategy's own time, against the full cache.

For each context length and each strategy (the full cache first, in the same run, on the same prompt),
``PagedEngine(token_eviction=strategy, token_budget=budget)`` prefills one prompt and generates
``--new-tokens`` tokens greedily (end tokens ignored). Reported per strategy: KV tokens held per layer and
KV bytes held (over layers) at the request's peak, the fraction of the full cache's bytes, the KV bytes
attention read (quest reads fewer pages and evicts nothing), the mean decode step (ms) and its speedup
over the full cache, the attention time, and the strategy's own time: scoring (``score_s``) and selection
plus compaction (``compact_s``).

  python experiments/bench_token_eviction.py                               # SmolLM2 on the CPU, 1,500 tokens
  python experiments/bench_token_eviction.py --contexts 512 --new-tokens 16  # a shorter CPU run
  python experiments/bench_token_eviction.py --model random:llama-3-8b --device cuda \\
      --contexts 8192,16384,32768 --num-layers 8                           # decode attention on a GPU

``--model random:<preset>`` builds a random-weight Llama of a ``kvtriton.spec`` preset's shape
(``kvtriton.replay.model_replay.load_model``; nothing is downloaded; bfloat16 on CUDA) and feeds it seeded
random token ids; ``smollm2`` (or a local model path) gets a pass-key prompt of natural text
(``kvtriton.quality.tasks``). Writes a JSON (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys

import torch

from _bench_utils import resolve_device, run_header, write_json
from kvtriton import ops
from kvtriton.hf import PagedEngine

STRATEGIES = ("full", "streaming_llm", "h2o", "snapkv", "tova", "key_norm", "snapkv_page", "quest")


def load(name: str, device, dtype, num_layers):
    """(model, tokenizer or None): SmolLM2 / a local model, or a random-weight model of a preset's shape."""
    from kvtriton.replay.model_replay import load_model

    model = load_model(name, device, dtype=dtype, num_layers=num_layers)
    tok = None
    if not name.startswith("random:"):
        from kvtriton.quality.evaluate import load_model as load_with_tokenizer

        tok = load_with_tokenizer(name, device=str(device), dtype=str(dtype or "float32").replace("torch.", ""))[1]
    return model, tok


def make_prompt(model, tok, context: int, seed: int = 0) -> list[int]:
    if tok is not None:
        from kvtriton.quality.tasks import make_sample

        return make_sample("passkey", tok, context_tokens=context, depth=0.5, seed=seed).prompt_ids
    rng = random.Random(seed)
    vocab = model.config.vocab_size
    return [rng.randrange(100, vocab) for _ in range(context)]


def run_one(model, prompt, strategy, budget, new_tokens, block_size, profile) -> dict:
    kw = {} if strategy == "full" else dict(token_eviction=strategy, token_budget=budget)
    num_blocks = (len(prompt) + new_tokens) // block_size + 16
    with PagedEngine(model, num_blocks=num_blocks, block_size=block_size, profile=profile, **kw) as eng:
        eng.generate([prompt], max_new_tokens=new_tokens, ignore_eos=True)
        st = eng.stats()
        log = eng.step_log()
    dec = [s["ms"] for s in log if s["prefill_tokens"] == 0]
    pre = [s["ms"] for s in log if s["prefill_tokens"] > 0]
    return {"strategy": strategy, "budget": 1.0 if strategy == "full" else budget, "context": len(prompt),
            "new_tokens": new_tokens, "kv_tokens_per_layer": st.get("kv_tokens_per_layer_peak"),
            "kv_bytes_held": st.get("kv_bytes_held_peak"), "kv_read_fraction": st.get("kv_read_fraction", 1.0),
            "prefill_ms": sum(pre), "decode_step_ms": statistics.fmean(dec) if dec else float("nan"),
            "decode_step_ms_p50": statistics.median(dec) if dec else float("nan"),
            "attention_s": st.get("attention_s"), "score_s": st.get("score_s", 0.0),
            "compact_s": st.get("compact_s", 0.0), "tokens_evicted": st.get("tokens_evicted", 0)}


def add_ratios(rows: list[dict]) -> None:
    """KV bytes as a fraction of the full cache's, decode and attention speedups over it (same context)."""
    full = {r["context"]: r for r in rows if r["strategy"] == "full"}
    for r in rows:
        f = full.get(r["context"])
        if f is None:
            continue
        r["kv_bytes_fraction"] = r["kv_bytes_held"] / f["kv_bytes_held"] if f["kv_bytes_held"] else None
        r["decode_speedup"] = f["decode_step_ms"] / r["decode_step_ms"] if r["decode_step_ms"] else None
        r["attention_speedup"] = f["attention_s"] / r["attention_s"] if r.get("attention_s") else None


def print_table(rows: list[dict]) -> None:
    head = (f"{'context':>7} {'strategy':<14} {'KV MiB':>8} {'KV frac':>7} {'read frac':>9} {'decode ms':>9} "
            f"{'speedup':>7} {'attn s':>7} {'score s':>8} {'compact s':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['context']:>7} {r['strategy']:<14} {r['kv_bytes_held'] / 2**20:>8.2f} "
              f"{r.get('kv_bytes_fraction') or 0:>7.3f} {r['kv_read_fraction']:>9.3f} {r['decode_step_ms']:>9.1f} "
              f"{r.get('decode_speedup') or 0:>7.2f} {r['attention_s'] or 0:>7.3f} {r['score_s']:>8.3f} "
              f"{r['compact_s']:>9.3f}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2, random:<preset> or a local model path")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 for random models on CUDA, else float32")
    ap.add_argument("--contexts", default="1500", help="prompt lengths in tokens, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--budget", type=float, default=0.25, help="fraction of the prompt each layer keeps")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated; full always runs")
    ap.add_argument("--num-layers", type=int, default=None, help="layers of the model (random models: fewer)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--smoke", action="store_true", help="a quick check: 256 tokens, 4 new tokens, 2 strategies")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.contexts, args.new_tokens, args.strategies = "256", 4, "full,streaming_llm,quest"
    device = resolve_device(args.device)
    strategies = ["full"] + [s for s in args.strategies.split(",") if s and s != "full"]
    model, tok = load(args.model, device, args.dtype, args.num_layers)
    rows = []
    with ops.backend("auto" if device.type == "cuda" else "reference"):
        for ctx in (int(c) for c in args.contexts.split(",")):
            prompt = make_prompt(model, tok, ctx)
            for s in strategies:
                rows.append(run_one(model, prompt, s, args.budget, args.new_tokens, args.block_size,
                                    device.type == "cuda"))
                print(f"  {ctx} {s}: decode {rows[-1]['decode_step_ms']:.1f} ms", file=sys.stderr, flush=True)
    add_ratios(rows)
    print_table(rows)
    result = dict(run_header(device), model=args.model, budget=args.budget, new_tokens=args.new_tokens,
                  num_layers=model.config.num_hidden_layers, dtype=str(next(model.parameters()).dtype),
                  results=rows)
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
