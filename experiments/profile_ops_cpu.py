"""Host cost of the ops on the CPU path, against direct PyTorch doing the same work (the CPU twin of
``profile_ops.py``).

On CPU tensors with Triton's interpreter off, the ops run their vectorised PyTorch path, so every
microsecond is host time: Python, validation, dispatch and the tensor ops themselves. Each row times a
candidate and its baseline in the same process, interleaved call by call (so load on the machine hits
both alike), and reports the medians and their ratio against the target:

* ``paged_decode_attention`` (functional, validated every call) vs gather + SDPA, the gather's indices
  built from the block table in the call: target <= 3x;
* ``PagedAttentionPlan.run`` (decode) vs the same gather + SDPA with the indices and mask precomputed
  (what a hand-written decode step does with planned metadata): target <= 2x;
* ``append_kv`` vs two ``index_copy_`` into the same (contiguous) caches: target <= 3x;
* ``paged_prefill_attention`` vs gather + SDPA with a causal offset mask built in the call: target <= 3x;
  ``PagedAttentionPlan.run`` (prefill, and a mixed batch) vs the precomputed gather + SDPA: <= 2x.

The SDPA baselines compute ``out`` only; the candidates also compute the log-sum-exp and the NaN rule
for non-finite scores. Every baseline is checked to agree with its candidate.

    python experiments/profile_ops_cpu.py --out profile_ops_cpu.json            # ~1 minute
    python experiments/profile_ops_cpu.py --repeats 50                          # quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"      # the PyTorch path: the interpreter would time numpy, not the ops

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _bench_utils import cpu_name, run_header, write_json  # noqa: E402
from kvtriton import ops  # noqa: E402

TARGETS = {"functional": 3.0, "plan": 2.0}


def interleaved_us(candidate, baseline, repeats: int, warmup: int = 30) -> tuple[float, float]:
    """Median microseconds of ``candidate()`` and ``baseline()``, called alternately ``repeats`` times."""
    for _ in range(warmup):
        candidate()
        baseline()
    tc, tb = [], []
    clock = time.perf_counter
    for _ in range(repeats):
        t0 = clock()
        candidate()
        t1 = clock()
        baseline()
        t2 = clock()
        tc.append(t1 - t0)
        tb.append(t2 - t1)
    return statistics.median(tc) * 1e6, statistics.median(tb) * 1e6


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _problem(batch, ctx, chunks, hq, hkv, d, bs, dtype, seed=0):
    """Caches as views of a block-interleaved arena, a random permutation block table, sequences of
    ``ctx`` tokens minus a little (ragged), chunks of ``chunks[b]`` new tokens packed by ``cu_seqlens_q``."""
    gen = torch.Generator().manual_seed(seed)
    mb = -(-ctx // bs)
    nb = batch * mb + 2
    arena = torch.randn(nb, 1, 2, bs, hkv, d, generator=gen).to(dtype)
    kc, vc = arena[:, 0, 0], arena[:, 0, 1]
    tables = torch.randperm(nb, generator=gen)[: batch * mb].view(batch, mb).int()
    lens = torch.tensor([max(c, ctx - (3 * b) % bs) for b, c in enumerate(chunks)], dtype=torch.int32)
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(chunks).cumsum(0)
    q = torch.randn(int(cu[-1]), hq, d, generator=gen).to(dtype)
    return kc, vc, tables, lens, cu, q


def _sdpa_padded(q_pad, k, v, mask, hkv, g):
    """SDPA of padded queries ``[B, Qm, hq, d]`` over ``[B, T, hkv, d]`` K/V: the GQA group's heads and the
    chunk's tokens become SDPA's query rows (no K/V copies per head); ``mask [B, 1, Qm * g, T]``."""
    B, Qm, hq, d = q_pad.shape
    qs = q_pad.view(B, Qm, hkv, g, d).transpose(1, 2).reshape(B, hkv, Qm * g, d)
    out = F.scaled_dot_product_attention(qs, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.view(B, hkv, Qm, g, d).transpose(1, 2).reshape(B * Qm, hq, d)


def _gather(cache, tables, B, T):
    return cache.index_select(0, tables.reshape(-1)).view(B, T, *cache.shape[2:])


def _masks(lens, cu, T, g):
    """Bool ``[B, 1, Qm * g, T]``: query ``i`` of chunk ``b`` sees keys ``t <= L_b - n_b + i``."""
    qlen = (cu[1:] - cu[:-1]).long()
    Qm = int(qlen.max())
    i = torch.arange(Qm)
    pos = (lens.long() - qlen)[:, None] + i[None, :]
    m = torch.arange(T)[None, None, :] <= pos[:, :, None]
    m &= (i[None, :] < qlen[:, None])[:, :, None] | (torch.arange(T) == 0)   # padded rows: one key (no NaN)
    return m[:, :, None, :].expand(-1, -1, g, -1).reshape(len(lens), 1, Qm * g, T), qlen, Qm


def case_decode(args, batch, ctx, hq, hkv, d, bs, dtype):
    kc, vc, tables, lens, _, q = _problem(batch, ctx, [1] * batch, hq, hkv, d, bs, dtype)
    g, mb = hq // hkv, tables.shape[1]
    T = mb * bs

    def gather_sdpa():                          # indices and mask from the table and lengths, every call
        k, v = _gather(kc, tables, batch, T), _gather(vc, tables, batch, T)
        mask = (torch.arange(T)[None, :] < lens[:, None]).view(batch, 1, 1, T)
        return _sdpa_padded(q.view(batch, 1, hq, d), k, v, mask, hkv, g)

    ids = tables.reshape(-1).long()
    mask = (torch.arange(T)[None, :] < lens[:, None]).view(batch, 1, 1, T)

    def planned_sdpa():                         # the same with the planned indices and mask
        k = kc.index_select(0, ids).view(batch, T, hkv, d)
        v = vc.index_select(0, ids).view(batch, T, hkv, d)
        return _sdpa_padded(q.view(batch, 1, hq, d), k, v, mask, hkv, g)

    plan = ops.PagedAttentionPlan().plan(tables, lens, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                                         block_size=bs, num_blocks=kc.shape[0], dtype=dtype, return_lse=True)
    func = lambda: ops.paged_decode_attention(q, kc, vc, tables, lens)  # noqa: E731
    run = lambda: plan.run(q, kc, vc)  # noqa: E731
    agree = max(_rel(func(), gather_sdpa()), _rel(run()[0], planned_sdpa()))
    shape = f"batch={batch} ctx={ctx} heads={hq}/{hkv} d={d} {str(dtype)[6:]}"
    rows = []
    for name, cand, base, base_name, kind in (
            ("paged_decode_attention", func, gather_sdpa, "gather+SDPA (indices from the table)", "functional"),
            ("PagedAttentionPlan.run (decode)", run, planned_sdpa, "gather+SDPA (planned indices)", "plan")):
        rows.append(_row(name, shape, cand, base, base_name, kind, args.repeats, agree))
    return rows


def case_prefill(args, chunks, ctx, hq, hkv, d, bs, dtype, label):
    batch = len(chunks)
    kc, vc, tables, lens, cu, q = _problem(batch, ctx, chunks, hq, hkv, d, bs, dtype, seed=1)
    g, mb = hq // hkv, tables.shape[1]
    T = mb * bs

    def gather_sdpa():
        k, v = _gather(kc, tables, batch, T), _gather(vc, tables, batch, T)
        mask, qlen, Qm = _masks(lens, cu, T, g)
        rows = (cu[:-1].long()[:, None] + torch.arange(Qm)[None, :]).clamp(max=q.shape[0] - 1)
        out = _sdpa_padded(q[rows.reshape(-1)].view(batch, Qm, hq, d), k, v, mask, hkv, g)
        keep = (torch.arange(Qm)[None, :] < qlen[:, None]).reshape(-1)
        return out[keep]

    ids = tables.reshape(-1).long()
    mask, qlen, Qm = _masks(lens, cu, T, g)
    q_rows = (cu[:-1].long()[:, None] + torch.arange(Qm)[None, :]).clamp(max=q.shape[0] - 1).reshape(-1)
    keep = torch.nonzero((torch.arange(Qm)[None, :] < qlen[:, None]).reshape(-1)).view(-1)

    def planned_sdpa():
        k = kc.index_select(0, ids).view(batch, T, hkv, d)
        v = vc.index_select(0, ids).view(batch, T, hkv, d)
        out = _sdpa_padded(q.index_select(0, q_rows).view(batch, Qm, hq, d), k, v, mask, hkv, g)
        return out.index_select(0, keep)

    plan = ops.PagedAttentionPlan().plan(tables, lens, cu, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                                         block_size=bs, num_blocks=kc.shape[0], dtype=dtype, return_lse=True)
    func = lambda: ops.paged_prefill_attention(q, kc, vc, tables, lens, cu)  # noqa: E731
    run = lambda: plan.run(q, kc, vc)  # noqa: E731
    agree = max(_rel(func(), gather_sdpa()), _rel(run()[0], planned_sdpa()))
    shape = f"{label}: chunks={chunks} ctx<={ctx} heads={hq}/{hkv} d={d} {str(dtype)[6:]} ({plan.mode})"
    rows = []
    if plan.mode == "prefill":
        rows.append(_row("paged_prefill_attention", shape, func, gather_sdpa,
                         "gather+SDPA, causal offset mask from the metadata", "functional", args.repeats, agree))
    rows.append(_row(f"PagedAttentionPlan.run ({plan.mode})", shape, run, planned_sdpa,
                     "gather+SDPA (planned indices and mask)", "plan", args.repeats, agree))
    return rows


def case_append(args, tokens, hkv, d, bs, dtype):
    gen = torch.Generator().manual_seed(2)
    nb = max(8, 2 * tokens // bs)
    k_flat = torch.randn(nb * bs, hkv, d, generator=gen).to(dtype)
    v_flat = torch.randn(nb * bs, hkv, d, generator=gen).to(dtype)
    kc, vc = k_flat.view(nb, bs, hkv, d), v_flat.view(nb, bs, hkv, d)
    slots = torch.randperm(nb * bs, generator=gen)[:tokens]
    k = torch.randn(tokens, hkv, d, generator=gen).to(dtype)
    v = torch.randn_like(k)

    def base():
        k_flat.index_copy_(0, slots, k)
        v_flat.index_copy_(0, slots, v)

    cand = lambda: ops.append_kv(k, v, kc, vc, slots)  # noqa: E731
    cand()
    agree = float(torch.equal(k_flat[slots], k) and torch.equal(v_flat[slots], v)) - 1.0
    return [_row("append_kv", f"tokens={tokens} heads={hkv} d={d} {str(dtype)[6:]}", cand, base,
                 "two index_copy_ (same caches)", "functional", args.repeats, agree)]


def _row(name, shape, cand, base, base_name, kind, repeats, agree):
    c_us, b_us = interleaved_us(cand, base, repeats)
    ratio = c_us / b_us
    target = TARGETS[kind]
    row = {"op": name, "case": shape, "kind": kind, "us": c_us, "baseline": base_name, "baseline_us": b_us,
           "ratio": ratio, "target_ratio": target, "meets_target": ratio <= target, "baseline_rel_diff": agree}
    print(f"  {name:<34} {c_us:8.1f} us | {base_name:<44} {b_us:8.1f} us | {ratio:5.2f}x "
          f"(target <= {target:.0f}x: {'met' if ratio <= target else 'MISSED'})  [{shape}]", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeats", type=int, default=400, help="timed calls of each candidate and baseline")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--smoke", action="store_true", help="one tiny case per op, few repeats (tests)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.smoke:
        a.repeats = min(a.repeats, 5)
    out = {**run_header(torch.device("cpu")),
           "machine": f"{cpu_name()} ({os.cpu_count()} cores, {a.threads} thread)",
           "repeats": a.repeats, "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
           "rows": []}
    print(f"profile_ops_cpu on {out['machine']}, torch {torch.__version__}, {a.repeats} interleaved calls each",
          flush=True)
    f32, bf16 = torch.float32, torch.bfloat16
    rows = out["rows"]
    rows += case_decode(a, 4, 64, 8, 2, 64, 16, f32)
    rows += case_append(a, 4, 2, 64, 16, f32)
    rows += case_prefill(a, [16, 16], 64, 8, 2, 64, 16, f32, "prefill")
    rows += case_prefill(a, [1, 1, 1, 9], 64, 8, 2, 64, 16, f32, "mixed")
    if not a.smoke:
        rows += case_decode(a, 8, 256, 32, 8, 128, 16, bf16)
        rows += case_append(a, 8, 8, 128, 16, bf16)
        rows += case_prefill(a, [64, 32], 256, 32, 8, 128, 16, bf16, "prefill")
        rows += case_prefill(a, [1, 1, 1, 1, 1, 1, 48], 256, 32, 8, 128, 16, bf16, "mixed")
    met = sum(r["meets_target"] for r in rows)
    print(f"{met}/{len(rows)} rows within their target ratio", flush=True)
    if a.out:
        print(f"wrote {write_json(a.out, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
