"""Check, then time, every kvtriton kernel against its PyTorch baseline, in one run.

    python experiments/bench_kernels.py --out bench_kernels.json           # CUDA, full (< 3 min)
    python experiments/bench_kernels.py --quick                            # fewer, smaller cases
    python experiments/bench_kernels.py --device cpu --smoke --out s.json  # tiny shapes, wall clock

On CUDA: first every op is checked against its reference on small random shapes (exact equality for the
copies, a float64 reference for attention, functional and through ``PagedAttentionPlan``); then each
kernel and its baseline are timed with
``triton.testing.do_bench`` (median, L2 flushed between runs) beside the device-to-device copy bandwidth
measured in the same process (``torch.Tensor.copy_`` of 1 GiB, bytes read + written). Shapes: 32 query
heads, 8 KV heads, head_dim 128, block size 16, bfloat16.

Bytes are what the op must move: every byte it reads plus every byte it writes (K/V tiles, queries,
outputs, index tensors); scratch traffic of the implementation (e.g. split-KV partials) is not counted.
``frac_copy`` = achieved GB/s / copy GB/s; ``speedup`` = baseline time / kernel time.

Prefill (compute-bound) rows also report achieved TFLOP/s (``extra.tflops``: 4 * heads * head_dim per
(query, key) pair a query attends to) for the kernel and its baseline:

* no prefix, 1 to 64 sequences of 512 to 16,384 tokens, against ``F.scaled_dot_product_attention(
  is_causal=True)`` on the same data made contiguous (flash backend; K/V heads repeated for GQA):
  target speedup >= 0.8 at >= 4096 tokens;
* a cached prefix (90% of each sequence in the pages, a chunk of 10% queried) against ``gather_kv`` +
  SDPA with an offset mask: target >= 3x, and at most 1.5x the time per FLOP of a no-prefix prefill of
  the same FLOPs, timed beside it (``extra.slowdown_vs_same_flops_prefill``);
* a mixed step (sequences decoding plus prefill chunks after a prefix) through ``PagedAttentionPlan``,
  eager and from a CUDA graph, against the prefill kernel over the whole batch (the one-launch
  alternative) and the two functional ops on the two sub-batches (``extra.functional_two_ops_ms``).

On CPU (``--device cpu``) the kernels run in Triton's interpreter when ``TRITON_INTERPRET=1`` and the
references otherwise; timings are ``time.perf_counter`` medians and only show that the pipeline works.

JSON written with ``--out`` (the run header of ``_bench_utils.run_header``, but ``device`` is the device's
name, e.g. ``NVIDIA H200`` or ``cpu (<model>, <N> threads)``)::

    {"date", "device", "device_name", "cpu", "cpus", "platform", "python", "torch", "triton",
     "copy_gbps", "backend", "smoke", "quick", "checks": [...], "failed_sections": [...],
     "results": [{"kernel", "case", "bytes", "ms", "gbps", "frac_copy", "baseline", "baseline_ms",
                  "speedup", "target_frac", "target_speedup", "meets_target", "extra": {...}}]}

Exit status 1 when a correctness check fails (the JSON is still written).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from _bench_utils import device_name, resolve_device, run_header, write_json
from kvtriton import ops
from kvtriton.ops import reference as ref
from kvtriton.ops._backend import INTERPRET, use_triton
from kvtriton.ops.attention import _device_sms, decode_launch_config

HQ, HKV, D, BS = 32, 8, 128, 16
DTYPE = torch.bfloat16
GiB = 1 << 30


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------

class Timer:
    """Median milliseconds of ``fn()``: ``do_bench`` on CUDA, wall clock elsewhere."""

    def __init__(self, device: torch.device, smoke: bool):
        self.device = device
        self.reps = 2 if smoke else 10

    def __call__(self, fn) -> float:
        if self.device.type == "cuda":
            from triton.testing import do_bench
            return float(do_bench(fn, warmup=10, rep=60, return_mode="median"))
        fn()  # warm-up (first call pays compilation / dispatch setup)
        times = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def graph(self, fn, calls: int = 10) -> float | None:
        """Median milliseconds of one ``fn()`` replayed from a CUDA graph of ``calls`` back-to-back
        calls: the device time with no host launch cost (how a serving engine that captures its decode
        step runs it). None off CUDA or when ``fn`` cannot be captured."""
        if self.device.type != "cuda":
            return None
        try:
            from triton.testing import do_bench
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream(self.device).wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(calls):
                    fn()
            ms = float(do_bench(g.replay, warmup=5, rep=60, return_mode="median")) / calls
            del g
            return ms
        except Exception as e:  # report, do not fail the benchmark
            print(f"    (CUDA graph capture failed: {type(e).__name__}: {e})", flush=True)
            return None


def _graph_extra(timer, fn, nbytes, copy_gbps) -> dict:
    ms = timer.graph(fn)
    if ms is None:
        return {}
    gbps = nbytes / (ms * 1e-3) / 1e9
    return {"graph_ms": ms, "graph_gbps": gbps, "graph_frac_copy": gbps / copy_gbps if copy_gbps else None}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# Correctness (small shapes, every op)
# ----------------------------------------------------------------------------------------------------

def _rel_err(out, expect):
    out, expect = out.double(), expect.double()
    fin = torch.isfinite(expect)
    if not torch.equal(fin, torch.isfinite(out)):
        return math.inf
    return ((out[fin] - expect[fin]).norm() / expect[fin].norm().clamp_min(1e-30)).item()


def _arena(nb, layers, dev, dtype=DTYPE, h=HKV, d=D, bs=BS):
    return torch.randn(nb, layers, 2, bs, h, d, device=dev).to(dtype)


def run_checks(dev, small: bool):
    """Each op against its reference; returns [{"kernel", "ok", "detail"}]."""
    h, d = (2, 64) if small else (HKV, D)
    n_tok, ctx = (60, 100) if small else (300, 300)
    checks = []

    def record(name, fn, kernels):
        try:
            ok, detail = fn()
        except Exception as e:  # a crash is a failed check, not a crashed benchmark
            ok, detail = False, f"{type(e).__name__}: {e}"
        checks.append({"kernel": name, "kernels": kernels, "ok": bool(ok), "detail": detail})
        print(f"  check {name:<24} {'ok' if ok else 'FAILED'}  {detail}", flush=True)

    def append():
        arena = _arena(64, 2, dev, h=h, d=d)
        kc, vc = arena[:, 1, 0], arena[:, 1, 1]
        n = n_tok
        slots = torch.randperm(64 * BS, device=dev)[:n]
        slots[::7] = -1
        k = torch.randn(n, h, d, device=dev).to(DTYPE)
        v = torch.randn(n, h, d, device=dev).to(DTYPE)
        expect = arena.clone()
        ref.append_kv(k, v, expect[:, 1, 0], expect[:, 1, 1], slots)
        ops.append_kv(k, v, kc, vc, slots)
        return torch.equal(arena, expect), f"{n} tokens, 1/7 padding"

    def gather():
        mb = -(-(3 * ctx // 2) // BS)  # table columns for the longest sequence
        nb = 4 * mb + 8
        arena = _arena(nb, 2, dev, h=h, d=d)
        kc, vc = arena[:, 0, 0], arena[:, 0, 1]
        lens = torch.tensor([1, 16, 17, 3 * ctx // 2], dtype=torch.int32, device=dev)
        tables = torch.randperm(nb, device=dev)[:4 * mb].view(4, mb).int()
        k, v, cu = ops.gather_kv(kc, vc, tables, lens)
        rk, rv, rcu = ref.gather_kv(kc, vc, tables, lens)
        ok = torch.equal(k, rk) and torch.equal(v, rv) and torch.equal(cu.cpu(), rcu.cpu())
        ids = torch.randperm(nb, device=dev)[:40]
        blocks = ops.gather_blocks(arena, ids)
        ok_b = torch.equal(blocks, arena[ids])
        target = torch.zeros_like(arena)
        ops.scatter_blocks(target, ids, blocks)
        ok_s = torch.equal(target[ids], arena[ids])
        return ok and ok_b and ok_s, f"gather_kv {ok}, gather_blocks {ok_b}, scatter_blocks {ok_s}"

    def move():
        arena = _arena(128, 3, dev, h=h, d=d)
        perm = torch.randperm(128, device=dev)
        src, dst = perm[:50], perm[50:100]
        expect = arena.clone()
        expect[dst] = arena[src]
        ops.move_blocks(arena, src, dst)
        return torch.equal(arena, expect), "50 of 128 blocks, 3 layers"

    def compact():
        mb = -(-(3 * ctx // 2) // BS)
        nb = 4 * mb + 8
        arena = _arena(nb, 1, dev, h=h, d=d)
        kc, vc = arena[:, 0, 0], arena[:, 0, 1]
        lens = torch.tensor([5, 16, ctx, 3 * ctx // 2], dtype=torch.int32, device=dev)
        tables = torch.randperm(nb, device=dev)[:4 * mb].view(4, mb).int()
        keep = torch.rand(4, mb * BS, device=dev) < 0.4
        expect = arena.clone()
        new_ref = ref.compact_tokens(expect[:, 0, 0], expect[:, 0, 1], tables, lens, keep)
        new = ops.compact_tokens(kc, vc, tables, lens, keep)
        k, v, _ = ops.gather_kv(kc, vc, tables, new)
        rk, rv, _ = ref.gather_kv(expect[:, 0, 0], expect[:, 0, 1], tables, new_ref)
        ok = torch.equal(new.cpu(), new_ref.cpu()) and torch.equal(k, rk) and torch.equal(v, rv)
        return ok, "keep 40%"

    def attention():
        worst = []
        ok = True
        hq = 4 * h
        for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
            batch = 3
            mb = -(-ctx // BS)
            arena = _arena(batch * mb + 2, 2, dev, dtype=dtype, h=h, d=d)
            kc, vc = arena[:, 1, 0], arena[:, 1, 1]
            tables = torch.randperm(batch * mb + 2, device=dev)[:batch * mb].view(batch, mb).int()
            lens = torch.tensor([ctx, 1, 0], dtype=torch.int32, device=dev)
            q = torch.randn(batch, hq, d, device=dev).to(dtype)
            for kw in ({}, {"num_splits": 3}, {"sliding_window": 40}):
                out, lse, mass = ops.paged_decode_attention(q, kc, vc, tables, lens, return_lse=True,
                                                            return_block_mass=True, **kw)
                kw.pop("num_splits", None)
                r_out, r_lse, r_mass = ref.paged_decode_attention(q, kc, vc, tables, lens, return_lse=True,
                                                                  return_block_mass=True, **kw)
                errs = (_rel_err(out, r_out), _rel_err(lse, r_lse), _rel_err(mass, r_mass))
                ok &= errs[0] < tol and errs[1] < max(tol, 1e-5) and errs[2] < max(tol, 1e-5)
                worst.append(max(errs))
        return ok, f"max rel err {max(worst):.2e} (bf16 < 1e-2, fp32 < 1e-5; out, lse, block mass)"

    def prefill():
        worst, ok = [], True
        hq = 4 * h
        for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
            lens, chunks = [ctx, 1, ctx // 2 + 3, 0, 40], [ctx, 1, 17, 0, 1]   # plain, decode, prefix hit, empty
            mb = -(-ctx // BS)
            nb = len(lens) * mb + 2
            arena = _arena(nb, 2, dev, dtype=dtype, h=h, d=d)
            kc, vc = arena[:, 1, 0], arena[:, 1, 1]
            tables = torch.randperm(nb, device=dev)[: len(lens) * mb].view(len(lens), mb).int()
            seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
            cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
            cu[1:] = torch.tensor(chunks).cumsum(0)
            q = torch.randn(int(cu[-1]), hq, d, device=dev).to(dtype)
            r_out, r_lse = ref.paged_prefill_attention(q, kc, vc, tables, seq_lens, cu.to(dev), return_lse=True,
                                                       sliding_window=None)
            out, lse = ops.paged_prefill_attention(q, kc, vc, tables, seq_lens, cu.to(dev), return_lse=True)
            plan = ops.PagedAttentionPlan().plan(tables.cpu(), seq_lens.cpu(), cu, num_q_heads=hq, num_kv_heads=h,
                                                 head_dim=d, block_size=BS, num_blocks=nb, dtype=dtype, device=dev,
                                                 return_lse=True)
            p_out, p_lse = plan.run(q, kc, vc)
            for o, lo in ((out, lse), (p_out, p_lse)):
                errs = (_rel_err(o, r_out), _rel_err(lo, r_lse))
                ok &= errs[0] < tol and errs[1] < 1e-5
                worst.append(max(errs))
        return ok, (f"functional and planned ({plan.mode}): max rel err {max(worst):.2e} (bf16 < 1e-2, "
                    f"fp32 < 1e-5; out, lse)")

    for name, fn, kernels in (
            ("paged_prefill_attention", prefill, ["paged_prefill_attention", "PagedAttentionPlan.run"]),
            ("append_kv", append, ["append_kv"]),
            ("gather_kv/blocks", gather, ["gather_kv", "gather_blocks", "scatter_blocks"]),
            ("move_blocks", move, ["move_blocks"]),
            ("compact_tokens", compact, ["compact_tokens", "gather_kv"]),
            ("paged_decode_attention", attention, ["paged_decode_attention"])):
        record(name, fn, kernels)
    _free(dev)
    return checks


# ----------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------

def _row(kernel, case, nbytes, ms, copy_gbps, baseline, baseline_ms, target_frac=None, target_speedup=None,
         **extra):
    gbps = nbytes / (ms * 1e-3) / 1e9
    frac = gbps / copy_gbps if copy_gbps else float("nan")
    speedup = baseline_ms / ms if baseline_ms else float("nan")
    meets = None
    if target_frac is not None or target_speedup is not None:
        meets = (target_frac is None or frac >= target_frac) and (target_speedup is None or speedup >= target_speedup)
    return {"kernel": kernel, "case": case, "bytes": int(nbytes), "ms": ms, "gbps": gbps, "frac_copy": frac,
            "baseline": baseline, "baseline_ms": baseline_ms, "speedup": speedup, "target_frac": target_frac,
            "target_speedup": target_speedup, "meets_target": meets, "extra": extra}


def copy_bandwidth(dev, timer, nbytes):
    x = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    x.random_(0, 255)
    y = torch.empty_like(x)
    ms = timer(lambda: y.copy_(x))
    del x, y
    _free(dev)
    return 2 * nbytes / (ms * 1e-3) / 1e9, ms


def attention_case(dev, batch, ctx, hq=HQ, hkv=HKV, d=D):
    """One decode-attention problem: ``(arena, key_cache, value_cache, block_tables, seq_lens, q)``.

    One layer of a block-interleaved arena (K and V of a block side by side, block stride 2x), every
    sequence ``ctx`` tokens long, block tables a random permutation of the blocks."""
    mb = -(-ctx // BS)
    nb = batch * mb
    arena = torch.randn(nb, 1, 2, BS, hkv, d, device=dev, dtype=DTYPE)
    tables = torch.randperm(nb, device=dev).view(batch, mb).int()
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    q = torch.randn(batch, hq, d, device=dev, dtype=DTYPE)
    return arena, arena[:, 0, 0], arena[:, 0, 1], tables, lens, q


def bench_attention(dev, timer, copy_gbps, cases, hq, hkv, d):
    rows = []
    esz = torch.empty((), dtype=DTYPE).element_size()
    for batch, ctx in cases:
        mb = -(-ctx // BS)
        arena, kc, vc, tables, lens, q = attention_case(dev, batch, ctx, hq, hkv, d)
        ms = timer(lambda: ops.paged_decode_attention(q, kc, vc, tables, lens))
        # GQA for SDPA without copies: the group's query heads become the query length (decode has no
        # causal mask), so the fused kernels (flash / efficient) apply and K/V are read once per group.
        qs = q.view(batch, hkv, hq // hkv, d)

        def sdpa(k, v):
            return F.scaled_dot_product_attention(qs, k, v).reshape(batch, hq, d)

        total = batch * ctx

        def gather_sdpa():
            k, v, _ = ops.gather_kv(kc, vc, tables, lens, num_tokens=total)
            k = k.view(batch, ctx, hkv, d).transpose(1, 2)
            v = v.view(batch, ctx, hkv, d).transpose(1, 2)
            return sdpa(k, v)

        # The baseline computes the same thing (guards the GQA head mapping above).
        agree = _rel_err(gather_sdpa().float(), ops.paged_decode_attention(q, kc, vc, tables, lens).float())
        base_ms = timer(gather_sdpa)
        k_c = torch.randn(batch, hkv, ctx, d, device=dev, dtype=DTYPE)
        v_c = torch.randn_like(k_c)
        ideal_ms = timer(lambda: sdpa(k_c, v_c))
        del k_c, v_c
        nbytes = (2 * total * hkv * d * esz + 2 * q.numel() * esz + tables.numel() * 4 + lens.numel() * 4)
        long_ctx = (batch, ctx) in ((128, 4096), (32, 4096))
        cfg = decode_launch_config(batch, hkv, hq // hkv, d, BS, mb * BS, esz, _device_sms(q.device))
        graph = _graph_extra(timer, lambda: ops.paged_decode_attention(q, kc, vc, tables, lens), nbytes,
                             copy_gbps)
        base_graph = timer.graph(gather_sdpa)
        if base_graph is not None:
            graph["baseline_graph_ms"] = base_graph
            if graph.get("graph_ms"):
                graph["graph_speedup"] = base_graph / graph["graph_ms"]
        rows.append(_row("paged_decode_attention", f"batch={batch} ctx={ctx}", nbytes, ms, copy_gbps,
                         "gather_kv+sdpa", base_ms, **graph,
                         target_frac=(0.9 if long_ctx else 0.75) if dev.type == "cuda" else None,
                         target_speedup=3.0 if dev.type == "cuda" else None,
                         sdpa_contiguous_ms=ideal_ms, vs_sdpa_contiguous=ideal_ms / ms, baseline_rel_diff=agree,
                         num_splits=cfg.num_splits, block_n=cfg.block_n, num_warps=cfg.num_warps,
                         num_stages=cfg.num_stages, layout="arena view [nb, 1, 2, bs, H, D][:, 0, k/v]",
                         block_tables="random permutation"))
        _print_row(rows[-1])
        del arena, kc, vc, tables, lens, q
        _free(dev)
    return rows


# ----------------------------------------------------------------------------------------------------
# Prefill (issue 12 section 4): no prefix vs SDPA(is_causal) on contiguous data; a cached prefix vs
# gather + SDPA with an offset mask; a mixed batch through PagedAttentionPlan, eager and from a graph.
# ----------------------------------------------------------------------------------------------------

def _causal_flops(hq, d, pairs):
    """Attention FLOPs: QK^T and PV, 2 FLOPs per multiply-add each, over ``pairs`` (query, key) pairs."""
    return 4 * hq * d * pairs


def _sdpa_flash(dev):
    """SDPA restricted to the flash backend on CUDA (the fastest for causal 16-bit), any backend on CPU."""
    import contextlib
    if dev.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def prefill_case(dev, lens, chunks, hq=HQ, hkv=HKV, d=D, seed=0):
    """Paged prefill problem: the sequences' K/V already in the pages (random permutation block table, a
    block-interleaved arena), queries of the last ``chunks[b]`` tokens packed by ``cu_seqlens_q``.
    Returns ``(arena, kc, vc, tables, seq_lens, cu_seqlens_q (host), q)``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    mb = max(1, -(-max(lens) // BS))
    nb = len(lens) * mb
    arena = torch.randn(nb, 1, 2, BS, hkv, d, device=dev, dtype=DTYPE)
    tables = torch.randperm(nb, generator=g).view(len(lens), mb).int()
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(chunks).cumsum(0)
    q = torch.randn(int(cu[-1]), hq, d, device=dev, dtype=DTYPE)
    return arena, arena[:, 0, 0], arena[:, 0, 1], tables.to(dev), seq_lens.to(dev), cu, q


def _contiguous_kv(kc, vc, tables, lens, hq):
    """Each sequence's K/V gathered to contiguous ``[batch, hq, L, d]`` (GQA heads repeated) for SDPA."""
    k, v, _ = ops.gather_kv(kc, vc, tables, lens)
    batch, L = lens.shape[0], int(lens[0])
    g = hq // kc.shape[2]
    k = k.view(batch, L, kc.shape[2], kc.shape[3]).transpose(1, 2).repeat_interleave(g, 1).contiguous()
    v = v.view(batch, L, kc.shape[2], kc.shape[3]).transpose(1, 2).repeat_interleave(g, 1).contiguous()
    return k, v


def bench_prefill(dev, timer, copy_gbps, cases, prefix_cases, hq, hkv, d):
    """No prefix against SDPA(is_causal) on contiguous data (flash); a cached prefix (90% of each sequence,
    chunk 10%) against gather + SDPA with an offset mask, and against the no-prefix prefill of the same
    FLOPs (run beside it)."""
    rows = []
    esz = torch.empty((), dtype=DTYPE).element_size()
    tflops_of = {}
    for batch, n in cases:
        arena, kc, vc, tables, lens, cu, q = prefill_case(dev, [n] * batch, [n] * batch, hq, hkv, d)
        cu_d = cu.to(dev)
        ms = timer(lambda: ops.paged_prefill_attention(q, kc, vc, tables, lens, cu_d))
        k, v = _contiguous_kv(kc, vc, tables, lens, hq)
        qs = q.view(batch, n, hq, d).transpose(1, 2).contiguous()

        def sdpa():
            with _sdpa_flash(dev):
                return F.scaled_dot_product_attention(qs, k, v, is_causal=True)

        agree = _rel_err(ops.paged_prefill_attention(q, kc, vc, tables, lens, cu_d).float(),
                         sdpa().transpose(1, 2).reshape(batch * n, hq, d).float())
        base_ms = timer(sdpa)
        flops = _causal_flops(hq, d, batch * n * (n + 1) // 2)
        tflops, base_tflops = flops / (ms * 1e-3) / 1e12, flops / (base_ms * 1e-3) / 1e12
        tflops_of[(batch, n)] = tflops
        nbytes = 2 * q.numel() * esz + 2 * batch * n * hkv * d * esz + tables.numel() * 4
        rows.append(_row("paged_prefill_attention", f"prefill batch={batch} tokens={n}", nbytes, ms, copy_gbps,
                         "sdpa(is_causal) contiguous (flash)", base_ms,
                         target_speedup=0.8 if (n >= 4096 and dev.type == "cuda") else None,
                         tflops=tflops, baseline_tflops=base_tflops, flops=flops, baseline_rel_diff=agree,
                         prefix=0, layout="arena view; baseline: contiguous [batch, hq, n, d], K/V heads repeated"))
        _print_row(rows[-1], f"{tflops:.1f} TFLOP/s vs {base_tflops:.1f}")
        del arena, kc, vc, k, v, q, qs
        _free(dev)
    for batch, L in prefix_cases:
        c = max(1, L // 10)
        p = L - c
        arena, kc, vc, tables, lens, cu, q = prefill_case(dev, [L] * batch, [c] * batch, hq, hkv, d, seed=1)
        cu_d = cu.to(dev)
        ms = timer(lambda: ops.paged_prefill_attention(q, kc, vc, tables, lens, cu_d))
        mask = (torch.arange(L, device=dev)[None, :] <= p + torch.arange(c, device=dev)[:, None])
        qs = q.view(batch, c, hq, d).transpose(1, 2)

        def gather_sdpa():
            k, v = _contiguous_kv(kc, vc, tables, lens, hq)
            return F.scaled_dot_product_attention(qs, k, v, attn_mask=mask)

        agree = _rel_err(ops.paged_prefill_attention(q, kc, vc, tables, lens, cu_d).float(),
                         gather_sdpa().transpose(1, 2).reshape(batch * c, hq, d).float())
        base_ms = timer(gather_sdpa)
        flops = _causal_flops(hq, d, batch * (c * p + c * (c + 1) // 2))
        tflops = flops / (ms * 1e-3) / 1e12
        # The no-prefix prefill with the same FLOPs per sequence (n^2 / 2 ~ c * (p + c / 2)), beside it.
        n_eq = max(16, int(round(math.sqrt(2 * (c * p + c * (c + 1) / 2)))))
        a2, kc2, vc2, t2, l2, cu2, q2 = prefill_case(dev, [n_eq] * batch, [n_eq] * batch, hq, hkv, d, seed=2)
        cu2_d = cu2.to(dev)
        eq_ms = timer(lambda: ops.paged_prefill_attention(q2, kc2, vc2, t2, l2, cu2_d))
        eq_flops = _causal_flops(hq, d, batch * n_eq * (n_eq + 1) // 2)
        eq_tflops = eq_flops / (eq_ms * 1e-3) / 1e12
        del a2, kc2, vc2, q2
        nbytes = 2 * q.numel() * esz + 2 * batch * L * hkv * d * esz + tables.numel() * 4
        within = eq_tflops / tflops if tflops else float("nan")
        rows.append(_row("paged_prefill_attention", f"prefix batch={batch} L={L} chunk={c}", nbytes, ms, copy_gbps,
                         "gather_kv+sdpa (offset mask)", base_ms,
                         target_speedup=3.0 if dev.type == "cuda" else None,
                         tflops=tflops, baseline_tflops=flops / (base_ms * 1e-3) / 1e12, flops=flops,
                         prefix=p, chunk=c, baseline_rel_diff=agree, same_flops_prefill_tokens=n_eq,
                         same_flops_prefill_ms=eq_ms, same_flops_prefill_tflops=eq_tflops,
                         slowdown_vs_same_flops_prefill=within,
                         meets_same_flops_target=(within <= 1.5) if dev.type == "cuda" else None))
        _print_row(rows[-1], f"{tflops:.1f} TFLOP/s; no-prefix prefill of the same FLOPs {eq_tflops:.1f} "
                             f"TFLOP/s ({within:.2f}x, target <= 1.5x)")
        del arena, kc, vc, q
        _free(dev)
    return rows


def mixed_split(tables, lens, cu, chunks, dev):
    """A mixed batch as the two functional calls a caller without a plan makes: ``(d_rows, p_rows,
    (tables, lens) of the one-token chunks, (tables, lens, cu_seqlens_q) of the longer ones)``."""
    one = [b for b, c in enumerate(chunks) if c == 1]
    many = [b for b, c in enumerate(chunks) if c > 1]
    d_rows = cu[one].long().to(dev)
    p_rows = torch.cat([torch.arange(int(cu[b]), int(cu[b + 1])) for b in many]).to(dev)
    p_cu = torch.zeros(len(many) + 1, dtype=torch.int32)
    p_cu[1:] = torch.tensor([chunks[b] for b in many]).cumsum(0)
    return d_rows, p_rows, (tables[one], lens[one]), (tables[many], lens[many], p_cu.to(dev))


def mixed_case(dev, n_decode, ctx, n_prefill, chunk, prefix, hq=HQ, hkv=HKV, d=D):
    """A scheduler's mixed step: ``n_decode`` sequences decoding at ``ctx`` tokens, interleaved with
    ``n_prefill`` chunks of ``chunk`` tokens after a cached ``prefix``."""
    lens, chunks = [], []
    for i in range(n_decode + n_prefill):
        if i % max(1, (n_decode + n_prefill) // max(1, n_prefill)) == 0 and chunks.count(chunk) < n_prefill:
            lens.append(prefix + chunk)
            chunks.append(chunk)
        else:
            lens.append(ctx)
            chunks.append(1)
    return prefill_case(dev, lens, chunks, hq, hkv, d, seed=3) + (lens, chunks)


def bench_mixed(dev, timer, copy_gbps, cases, hq, hkv, d):
    """A mixed batch through PagedAttentionPlan (decode kernel on the one-token chunks, prefill kernel on
    the rest), eager and from a CUDA graph, against the prefill kernel over the whole batch (the
    one-launch alternative) and against the two functional ops on the two sub-batches."""
    rows = []
    esz = torch.empty((), dtype=DTYPE).element_size()
    for n_decode, ctx, n_prefill, chunk, prefix in cases:
        arena, kc, vc, tables, lens, cu, q, lens_l, chunks = mixed_case(dev, n_decode, ctx, n_prefill, chunk,
                                                                        prefix, hq, hkv, d)
        plan = ops.PagedAttentionPlan().plan(tables.cpu(), lens.cpu(), cu, num_q_heads=hq, num_kv_heads=hkv,
                                             head_dim=d, block_size=BS, num_blocks=kc.shape[0], dtype=DTYPE,
                                             device=dev)
        cu_d = cu.to(dev)
        ms = timer(lambda: plan.run(q, kc, vc))
        whole_ms = timer(lambda: ops.paged_prefill_attention(q, kc, vc, tables, lens, cu_d))
        d_rows, p_rows, (t_one, l_one), (t_many, l_many, p_cu) = mixed_split(tables, lens, cu, chunks, dev)

        def functional():
            out = torch.empty_like(q)
            out[d_rows] = ops.paged_decode_attention(q[d_rows], kc, vc, t_one, l_one)
            out[p_rows] = ops.paged_prefill_attention(q[p_rows], kc, vc, t_many, l_many, p_cu)
            return out

        func_ms = timer(functional)
        out = plan.run(q, kc, vc)
        agree = _rel_err(out.float(), ops.paged_prefill_attention(q, kc, vc, tables, lens, cu_d).float())
        same = bool(torch.equal(out, functional()))
        pairs = sum(c * (L - c) + c * (c + 1) // 2 for L, c in zip(lens_l, chunks))
        flops = _causal_flops(hq, d, pairs)
        kv_tokens = sum(lens_l)
        nbytes = 4 * q.numel() * esz + 2 * kv_tokens * hkv * d * esz + tables.numel() * 4
        extra = {}
        g_ms = timer.graph(lambda: plan.run(q, kc, vc))
        if g_ms is not None:
            extra = {"graph_ms": g_ms, "graph_gbps": nbytes / (g_ms * 1e-3) / 1e9,
                     "graph_frac_copy": nbytes / (g_ms * 1e-3) / 1e9 / copy_gbps if copy_gbps else None,
                     "graph_tflops": flops / (g_ms * 1e-3) / 1e12}
            wg = timer.graph(lambda: ops.paged_prefill_attention(q, kc, vc, tables, lens, cu_d))
            if wg is not None:
                extra["baseline_graph_ms"] = wg
                extra["graph_speedup"] = wg / g_ms
        rows.append(_row("PagedAttentionPlan.run", f"mixed {n_decode}x{ctx} decode + {n_prefill}x{chunk} "
                         f"(prefix {prefix})", nbytes, ms, copy_gbps, "prefill kernel, whole batch", whole_ms,
                         **extra, tflops=flops / (ms * 1e-3) / 1e12, flops=flops, functional_two_ops_ms=func_ms,
                         vs_functional=func_ms / ms, equals_functional_parts=same, baseline_rel_diff=agree,
                         launches=plan.describe().__repr__()))
        _print_row(rows[-1], f"functional decode+prefill {func_ms:.4f} ms; graph "
                             f"{_fmt(extra.get('graph_ms'), '.4f')} ms")
        del arena, kc, vc, q, plan
        _free(dev)
    return rows


def append_case(dev, n, hkv=HKV, d=D):
    """One append problem: ``(arena, key_cache, value_cache, slot_mapping, key, value)`` with ``n`` new
    tokens scattered to random distinct slots of an arena twice their size (at least 64 blocks)."""
    nb = max(64, 2 * n // BS)
    arena = torch.randn(nb, 1, 2, BS, hkv, d, device=dev, dtype=DTYPE)
    slots = torch.randperm(nb * BS, device=dev)[:n]
    k = torch.randn(n, hkv, d, device=dev, dtype=DTYPE)
    return arena, arena[:, 0, 0], arena[:, 0, 1], slots, k, torch.randn_like(k)


def bench_append(dev, timer, copy_gbps, cases, hkv, d):
    rows = []
    esz = torch.empty((), dtype=DTYPE).element_size()
    for n in cases:
        nb = max(64, 2 * n // BS)
        arena, kc, vc, slots, k, v = append_case(dev, n, hkv, d)
        ms = timer(lambda: ops.append_kv(k, v, kc, vc, slots))
        # index_copy_ needs a per-slot dimension: contiguous K and V caches [num_slots, H, D].
        kc_flat = torch.empty(nb * BS, hkv, d, device=dev, dtype=DTYPE)
        vc_flat = torch.empty_like(kc_flat)

        def baseline():
            kc_flat.index_copy_(0, slots, k)
            vc_flat.index_copy_(0, slots, v)

        base_ms = timer(baseline)
        nbytes = 2 * (2 * n * hkv * d * esz) + n * 8
        graph = _graph_extra(timer, lambda: ops.append_kv(k, v, kc, vc, slots), nbytes, copy_gbps)
        base_graph = timer.graph(baseline)
        if base_graph is not None:
            graph["baseline_graph_ms"] = base_graph
            if graph.get("graph_ms"):
                graph["graph_speedup"] = base_graph / graph["graph_ms"]
        rows.append(_row("append_kv", f"tokens={n}", nbytes, ms, copy_gbps, "index_copy_ (K and V)", base_ms, **graph,
                         target_frac=0.6 if (n >= 4096 and dev.type == "cuda") else None,
                         slots="random distinct", layout="kernel: arena view; baseline: contiguous [slots, H, D]"))
        _print_row(rows[-1])
        del arena, kc, vc, k, v, kc_flat, vc_flat
        _free(dev)
    return rows


def bench_gather(dev, timer, copy_gbps, cases, layers, hkv, d, ragged):
    rows = []
    esz = torch.empty((), dtype=DTYPE).element_size()
    nb = max(cases) + max(cases) // 8
    arena = torch.empty(nb, layers, 2, BS, hkv, d, device=dev, dtype=DTYPE)
    arena.view(torch.int16).random_(-16384, 16384)   # any bit patterns: these are copies
    block_bytes = arena[0].numel() * esz
    for n in cases:
        ids = torch.randperm(nb, device=dev)[:n]
        out = torch.empty(n, *arena.shape[1:], device=dev, dtype=DTYPE)
        ms = timer(lambda: ops.gather_blocks(arena, ids, out=out))
        base_ms = timer(lambda: torch.index_select(arena, 0, ids, out=out))
        nbytes = 2 * n * block_bytes + n * 8
        rows.append(_row("gather_blocks", f"blocks={n} ({block_bytes >> 10} KiB)", nbytes, ms, copy_gbps,
                         "index_select", base_ms,
                         target_frac=0.9 if (n >= 16384 and dev.type == "cuda") else None,
                         layers=layers, block_bytes=block_bytes))
        _print_row(rows[-1])
        del out
        _free(dev)
    if ragged:
        batch, ctx = ragged
        mb = -(-ctx // BS)
        kc, vc = arena[:, 0, 0], arena[:, 0, 1]
        tables = torch.randperm(nb, device=dev)[:batch * mb].view(batch, mb).int()
        lens = torch.randint(ctx // 2, ctx + 1, (batch,), device=dev, dtype=torch.int32)
        lens_l = lens.long()
        total = int(lens_l.sum())
        ms = timer(lambda: ops.gather_kv(kc, vc, tables, lens, num_tokens=total))
        # Baseline: advanced indexing with the token -> (block, offset) map precomputed outside the timing.
        seq = torch.repeat_interleave(torch.arange(batch, device=dev), lens_l)
        starts = torch.cumsum(lens_l, 0) - lens_l
        t = torch.arange(total, device=dev) - starts[seq]
        blk = tables.long()[seq, t // BS]
        off = t % BS

        def baseline():
            return kc[blk, off], vc[blk, off]

        base_ms = timer(baseline)
        nbytes = 2 * (2 * total * hkv * d * esz) + tables.numel() * 4 + lens.numel() * 4 + (batch + 1) * 4
        rows.append(_row("gather_kv", f"batch={batch} ctx<={ctx} ragged", nbytes, ms, copy_gbps,
                         "advanced indexing (index map precomputed)", base_ms, tokens=total, layers_in_arena=layers))
        _print_row(rows[-1])
    del arena
    _free(dev)
    return rows


def bench_move(dev, timer, copy_gbps, cases, layers, hkv, d):
    rows = []
    esz = torch.empty((), dtype=DTYPE).element_size()
    nb = 2 * max(cases) + 64
    arena = torch.empty(nb, layers, 2, BS, hkv, d, device=dev, dtype=DTYPE)
    arena.view(torch.int16).random_(-16384, 16384)
    block_bytes = arena[0].numel() * esz
    for n in cases:
        perm = torch.randperm(nb, device=dev)
        src, dst = perm[:n].contiguous(), perm[n:2 * n].contiguous()
        ms = timer(lambda: ops.move_blocks(arena, src, dst, validate=False))
        base_ms = timer(lambda: arena.index_copy_(0, dst, arena.index_select(0, src)))
        nbytes = 2 * n * block_bytes + 2 * n * 8
        rows.append(_row("move_blocks", f"blocks={n} ({block_bytes >> 20} MiB, {layers} layers)", nbytes, ms,
                         copy_gbps, "index_select+index_copy_", base_ms,
                         target_frac=0.75 if (n >= 8192 and dev.type == "cuda") else None,
                         layers=layers, block_bytes=block_bytes, arena_blocks=nb))
        _print_row(rows[-1])
        _free(dev)
    del arena
    _free(dev)
    return rows


def bench_compact(dev, timer, copy_gbps, batch, ctx, hkv, d):
    esz = torch.empty((), dtype=DTYPE).element_size()
    mb = -(-ctx // BS)
    nb = batch * mb
    arena = torch.randn(nb, 1, 2, BS, hkv, d, device=dev, dtype=DTYPE)
    kc, vc = arena[:, 0, 0], arena[:, 0, 1]
    tables = torch.randperm(nb, device=dev).view(batch, mb).int()
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    keep = torch.rand(batch, mb * BS, device=dev) < 0.5
    kept = int(keep[:, :ctx].sum())
    ms = timer(lambda: ops.compact_tokens(kc, vc, tables, lens, keep))
    # Baseline: vectorised PyTorch (the reference loops per sequence): kept token -> new position.
    b_idx, t_idx = keep[:, :ctx].nonzero(as_tuple=True)
    new_pos = keep[:, :ctx].long().cumsum(1)[b_idx, t_idx] - 1
    sb, so = tables.long()[b_idx, t_idx // BS], t_idx % BS
    db, do = tables.long()[b_idx, new_pos // BS], new_pos % BS

    def baseline():
        kc[db, do] = kc[sb, so]
        vc[db, do] = vc[sb, so]

    base_ms = timer(baseline)
    nbytes = 2 * (2 * kept * hkv * d * esz) + keep.numel() + tables.numel() * 4 + 2 * lens.numel() * 4
    row = _row("compact_tokens", f"batch={batch} ctx={ctx} keep=50%", nbytes, ms, copy_gbps,
               "advanced indexing (index maps precomputed)", base_ms, kept_tokens=kept)
    _print_row(row)
    del arena
    _free(dev)
    return [row]


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------

def _fmt(x, spec):
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return "nan"
    return format(x, spec)


def _print_row(r, note=""):
    print(f"  {r['kernel']:<22} {r['case']:<30} {_fmt(r['ms'], '.4f'):>9} ms {_fmt(r['gbps'], '.1f'):>8} GB/s "
          f"{_fmt(r['frac_copy'], '.2f'):>5} of copy | {r['baseline']}: {_fmt(r['baseline_ms'], '.4f')} ms "
          f"-> {_fmt(r['speedup'], '.2f')}x" + (f" | {note}" if note else ""), flush=True)


def print_table(results, copy_gbps, device):
    head = (f"{'kernel':<22} {'case':<32} {'ms':>9} {'GB/s':>8} {'frac':>5} {'target':>6} "
            f"{'baseline':<28} {'base ms':>9} {'speedup':>7} {'target':>6} {'ok':>3}")
    print(f"\nSummary on {device}: copy bandwidth {copy_gbps:.1f} GB/s (bytes read + written)")
    print(head)
    print("-" * len(head))
    for r in results:
        ok = {True: "yes", False: "NO", None: "-"}[r["meets_target"]]
        print(f"{r['kernel']:<22} {r['case']:<32} {_fmt(r['ms'], '.4f'):>9} {_fmt(r['gbps'], '.1f'):>8} "
              f"{_fmt(r['frac_copy'], '.2f'):>5} {_fmt(r['target_frac'], '.2f'):>6} {r['baseline'][:28]:<28} "
              f"{_fmt(r['baseline_ms'], '.4f'):>9} {_fmt(r['speedup'], '.2f'):>7} "
              f"{_fmt(r['target_speedup'], '.1f'):>6} {ok:>3}")
        if r["extra"].get("graph_ms"):
            e = r["extra"]
            print(f"{'':<22} {'  from a CUDA graph (no launch cost)':<32} {_fmt(e['graph_ms'], '.4f'):>9} "
                  f"{_fmt(e['graph_gbps'], '.1f'):>8} {_fmt(e['graph_frac_copy'], '.2f'):>5} {'':>6} "
                  f"{'baseline from a CUDA graph':<28} {_fmt(e.get('baseline_graph_ms'), '.4f'):>9} "
                  f"{_fmt(e.get('graph_speedup'), '.2f'):>7}")
        if "tflops" in r["extra"]:
            e = r["extra"]
            print(f"{'':<22} {'  TFLOP/s (kernel, baseline)':<32} {_fmt(e['tflops'], '.1f'):>9} "
                  f"{_fmt(e.get('baseline_tflops'), '.1f'):>8}"
                  + (f"   same-FLOPs no-prefix prefill {_fmt(e['slowdown_vs_same_flops_prefill'], '.2f')}x slower "
                     f"(target <= 1.5x)" if "slowdown_vs_same_flops_prefill" in e else "")
                  + (f"   two functional ops {_fmt(e['functional_two_ops_ms'], '.4f')} ms" if
                     "functional_two_ops_ms" in e else ""))
        if r["kernel"] == "paged_decode_attention" and "sdpa_contiguous_ms" in r["extra"]:
            e = r["extra"]
            print(f"{'':<22} {'  vs SDPA on contiguous K/V':<32} {'':>9} {'':>8} {'':>5} {'':>6} "
                  f"{'sdpa (unpaged ideal)':<28} {_fmt(e['sdpa_contiguous_ms'], '.4f'):>9} "
                  f"{_fmt(e['vs_sdpa_contiguous'], '.2f'):>7}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--quick", action="store_true", help="fewer and smaller cases")
    ap.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (for CPU runs of the pipeline)")
    args = ap.parse_args(argv)

    try:
        dev = resolve_device(args.device)
    except ValueError as e:
        ap.error(str(e))
    if dev.type == "cpu" and not args.smoke:
        print("note: CPU run without --smoke; shapes are large for the interpreter", flush=True)
    torch.manual_seed(0)
    # "device" is the device's name in this file (what the notebook and gpu_check.py group by)
    header = {**run_header(dev), "device": device_name(dev)}
    backend = ("triton" if dev.type == "cuda" else
               "triton-interpreter" if use_triton(torch.empty(0, device=dev)) else "reference")
    print(f"bench_kernels on {header['device']}, torch {header['torch']}, triton {header['triton']}, backend "
          f"{backend}{' (interpreter)' if INTERPRET and dev.type == 'cpu' else ''}", flush=True)
    t_start = time.perf_counter()
    timer = Timer(dev, args.smoke)

    print("correctness:", flush=True)
    checks = run_checks(dev, small=args.smoke or dev.type == "cpu")

    if args.smoke:
        hq, hkv, d = 8, 2, 64
        copy_bytes = 16 << 20
        attn_cases, append_cases = [(2, 64)], [64]
        gather_cases, gather_layers, ragged = [16], 1, (2, 64)
        move_cases, move_layers = [8], 2
        compact_case = (2, 64)
        prefill_cases, prefix_cases = [(2, 32)], [(2, 80)]
        mixed_cases = [(3, 48, 1, 16, 24)]
    else:
        hq, hkv, d = HQ, HKV, D
        copy_bytes = GiB
        attn_cases = [(32, 1024), (32, 4096), (128, 4096), (8, 32768)]
        append_cases = [256, 4096, 65536]
        gather_cases, gather_layers, ragged = [1024, 16384], 4, (32, 4096)
        move_cases = [1024, 8192]
        compact_case = (32, 4096)
        # Prefill: 1 to 64 sequences of 512 to 16,384 tokens; a cached prefix of 90% (chunk 10%); a
        # mixed step of decoding sequences and prefill chunks after a prefix.
        prefill_cases = [(64, 512), (16, 2048), (4, 4096), (2, 8192), (1, 16384)]
        prefix_cases = [(16, 4096), (4, 8192), (1, 16384)]
        mixed_cases = [(32, 2048, 2, 512, 1536), (128, 1024, 4, 256, 2048)]
        # Blocks of a 32-layer model (2 MiB each) when the arena (2 * 8192 + 64 blocks) and the
        # baseline's staging copy fit in 70% of device memory; fewer layers otherwise (recorded in extra).
        move_layers = 32
        if dev.type == "cuda":
            total = torch.cuda.get_device_properties(dev).total_memory
            per_layer_block = 2 * BS * hkv * d * 2
            while move_layers > 1 and (2 * max(move_cases) + 64 + max(move_cases)) * move_layers * per_layer_block > 0.7 * total:
                move_layers //= 2
        if args.quick:
            prefill_cases, prefix_cases, mixed_cases = [(4, 4096)], [(4, 8192)], mixed_cases[:1]
            attn_cases = [(32, 4096), (8, 32768)]
            append_cases = [4096]
            gather_cases = [16384]
            move_cases = [8192]
            move_layers = min(move_layers, 8)

    copy_gbps, copy_ms = copy_bandwidth(dev, timer, copy_bytes)
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s ({copy_bytes >> 20} MiB copy_ in {copy_ms:.3f} ms)", flush=True)

    results = []
    sections = [
        ("paged_decode_attention", lambda: bench_attention(dev, timer, copy_gbps, attn_cases, hq, hkv, d)),
        ("paged_prefill_attention", lambda: bench_prefill(dev, timer, copy_gbps, prefill_cases, prefix_cases,
                                                          hq, hkv, d)),
        ("mixed batch (PagedAttentionPlan)", lambda: bench_mixed(dev, timer, copy_gbps, mixed_cases, hq, hkv, d)),
        ("append_kv", lambda: bench_append(dev, timer, copy_gbps, append_cases, hkv, d)),
        ("gather", lambda: bench_gather(dev, timer, copy_gbps, gather_cases, gather_layers, hkv, d, ragged)),
        ("move_blocks", lambda: bench_move(dev, timer, copy_gbps, move_cases, move_layers, hkv, d)),
        ("compact_tokens", lambda: bench_compact(dev, timer, copy_gbps, *compact_case, hkv, d)),
    ]
    failed_sections = []
    for name, fn in sections:
        print(f"timing {name} ({time.perf_counter() - t_start:.0f} s elapsed):", flush=True)
        try:
            results.extend(fn())
        except Exception as e:  # keep the other sections' numbers
            failed_sections.append(f"{name}: {type(e).__name__}: {e}")
            print(f"  {name} FAILED: {type(e).__name__}: {e}", flush=True)
            _free(dev)
    bad = {c["kernel"] for c in checks if not c["ok"]}
    unchecked = {k for c in checks if not c["ok"] for k in c["kernels"]}
    for r in results:
        r["extra"]["correct"] = r["kernel"] not in unchecked

    print_table(results, copy_gbps, header["device"])
    print(f"\n{len(checks) - len(bad)}/{len(checks)} correctness checks passed; "
          f"total {time.perf_counter() - t_start:.0f} s", flush=True)
    report = {
        **header,
        "copy_gbps": copy_gbps,
        "backend": backend,
        "smoke": bool(args.smoke),
        "quick": bool(args.quick),
        "checks": checks,
        "failed_sections": failed_sections,
        "results": results,
    }
    if args.out:
        print(f"wrote {write_json(args.out, report)}", flush=True)
    return 1 if (bad or failed_sections) else 0


if __name__ == "__main__":
    sys.exit(main())
