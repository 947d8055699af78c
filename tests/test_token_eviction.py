"""Token-eviction strategies (kvtriton.token_eviction): each selection rule against a loop reference
written here independently, on fresh random inputs of several sizes."""

from __future__ import annotations

import math

import pytest
import torch

from kvtriton import ops
from kvtriton.token_eviction import (H2O, available_token_strategies, kept_positions, make_token_strategy,
                                     page_key_minmax, pyramid_budgets, quest_bound, resolve_budget,
                                     select_per_layer)

SIZES = [(1, 1, 0.5), (7, 3, 0.6), (33, 2, 0.3), (64, 4, 17), (97, 8, 0.25)]   # seq_len, heads, budget


def _budget_tokens(budget, n):
    return min(n, budget if isinstance(budget, int) else math.ceil(budget * n - 1e-9))


def _ref_keep(scores, n, n_keep, sink, window):
    """Loop reference: protected positions, then repeatedly the best remaining (earliest on ties)."""
    keep = [i < sink or i >= n - window for i in range(n)]
    while sum(keep) < n_keep:
        best = None
        for i in range(n):
            if not keep[i] and (best is None or scores[i] > scores[best]):
                best = i
        keep[best] = True
    return torch.tensor(keep, dtype=torch.bool)


def _sink_window(n):
    return (min(2, n // 4), min(3, n // 4))


def _random_attn(*shape):
    return torch.softmax(torch.randn(*shape, dtype=torch.float64) * 3, -1)


@pytest.mark.parametrize("n,h,budget", SIZES)
def test_streaming_llm_matches_reference(n, h, budget):
    sink = min(4, n // 3)
    keep = make_token_strategy("streaming_llm", sink=sink).select(n, budget)
    k = _budget_tokens(budget, n)
    expect = torch.tensor([i < sink or i >= n - (k - sink) for i in range(n)])
    assert torch.equal(keep, expect)


@pytest.mark.parametrize("n,h,budget", SIZES)
def test_tova_matches_reference(n, h, budget):
    attn = _random_attn(h, n)
    keep = make_token_strategy("tova").select(n, budget, last_query=attn)
    scores = [sum(float(attn[j, i]) for j in range(h)) / h for i in range(n)]
    assert torch.equal(keep, _ref_keep(scores, n, _budget_tokens(budget, n), 0, 0))


@pytest.mark.parametrize("n,h,budget", SIZES)
def test_key_norm_keeps_lowest_norms(n, h, budget):
    keys = torch.randn(n, h, 16) * torch.rand(n, 1, 1) * 3
    sink, window = _sink_window(n)
    keep = make_token_strategy("key_norm", sink=sink, window=window).select(n, budget, keys=keys)
    scores = [-sum(math.sqrt(sum(float(x) ** 2 for x in keys[i, j])) for j in range(h)) / h for i in range(n)]
    assert torch.equal(keep, _ref_keep(scores, n, _budget_tokens(budget, n), sink, window))


def _ref_snapkv_scores(attn, n, window, k, pool, head_reduce):
    h, w, _ = attn.shape
    prefix = max(n - window, 0)
    per_head = []
    for j in range(h):
        col = [sum(float(attn[j, q, i]) for q in range(w)) for i in range(prefix)]
        pooled = []
        for i in range(prefix):
            vals = [col[t] if 0 <= t < prefix else 0.0 for t in range(i - k // 2, i + k // 2 + 1)]
            real = [col[t] for t in range(i - k // 2, i + k // 2 + 1) if 0 <= t < prefix]
            pooled.append(max(real) if pool == "max" else sum(vals) / k)
        per_head.append(pooled + [0.0] * (n - prefix))
    agg = max if head_reduce == "max" else (lambda xs: sum(xs) / len(xs))
    return [agg([per_head[j][i] for j in range(h)]) for i in range(n)]


@pytest.mark.parametrize("n,h,budget", SIZES)
@pytest.mark.parametrize("pool,k,head_reduce", [("max", 7, "mean"), ("avg", 5, "max"), ("max", 1, "mean")])
def test_snapkv_matches_reference(n, h, budget, pool, k, head_reduce):
    w = min(4, n)
    window = w if _budget_tokens(budget, n) >= w else 0
    attn = _random_attn(h, w, n) * torch.ones(w, n).tril(n - w)   # causal observation window
    strat = make_token_strategy("snapkv", window=window, kernel_size=k, pool=pool, head_reduce=head_reduce)
    keep = strat.select(n, budget, attention_window=attn)
    scores = _ref_snapkv_scores(attn, n, window, k, pool, head_reduce)
    assert torch.equal(keep, _ref_keep(scores, n, _budget_tokens(budget, n), 0, window))


@pytest.mark.parametrize("n,h,budget", SIZES)
def test_h2o_accumulates_across_steps(n, h, budget):
    sink, window = _sink_window(n)
    strat = make_token_strategy("h2o", sink=sink, window=window)
    start = max(1, n - 5)
    acc = [0.0] * n
    prefill = _random_attn(h, start, start) * torch.ones(start, start).tril()
    strat.update(prefill)
    for i in range(start):
        acc[i] += sum(float(prefill[j, q, i]) for j in range(h) for q in range(start)) / h
    for t in range(start, n + 1):                       # decode steps over a growing cache
        a = _random_attn(h, t)
        strat.update(a)
        for i in range(t):
            acc[i] += sum(float(a[j, i]) for j in range(h)) / h
    assert torch.allclose(strat.scores, torch.tensor(acc, dtype=torch.float64))
    keep = strat.select(n, budget)
    assert torch.equal(keep, _ref_keep(acc, n, _budget_tokens(budget, n), sink, window))
    strat.apply_keep(keep)
    assert torch.allclose(strat.scores, torch.tensor(acc, dtype=torch.float64)[keep])


def test_h2o_state_survives_eviction():
    strat = H2O(window=1)
    strat.update(torch.tensor([[0.7, 0.1, 0.2]]))
    keep = strat.select(3, 2)
    assert kept_positions(keep).tolist() == [0, 2]
    strat.apply_keep(keep)
    strat.update(torch.tensor([[0.1, 0.5, 0.4]]))           # cache now [old 0, old 2, new]
    assert torch.allclose(strat.scores, torch.tensor([0.8, 0.7, 0.4], dtype=torch.float64))
    with pytest.raises(ValueError, match="seq_len"):
        strat.select(5, 2)


def _inputs_for(name, n, h):
    base = name.removesuffix("_page")
    if base == "snapkv":
        return {"attention_window": _random_attn(h, min(4, n), n)}
    if base == "tova":
        return {"last_query": _random_attn(h, n)}
    if base == "key_norm":
        return {"keys": torch.randn(n, h, 8)}
    if base == "h2o":
        return {"decode_attention": _random_attn(h, n)}
    if base == "quest":
        keys = torch.randn(n, h, 8)
        return {"page_minmax": page_key_minmax(keys, 4), "query": torch.randn(h, 8)}
    return {}


@pytest.mark.parametrize("name", available_token_strategies())
@pytest.mark.parametrize("n", [1, 13, 40])
def test_full_budget_keeps_everything(name, n):
    kw = {"page_size": 4} if name.endswith("_page") or name == "quest" else {}
    for budget in (1.0, n, n + 5):
        strat = make_token_strategy(name, **kw)
        keep = strat.select(n, budget, **_inputs_for(name, n, 2))
        assert keep.dtype == torch.bool and keep.shape == (n,) and bool(keep.all())


@pytest.mark.parametrize("name", ["snapkv_page", "tova_page", "key_norm_page", "streaming_llm_page", "h2o_page"])
@pytest.mark.parametrize("n,page_size", [(37, 4), (64, 16), (9, 8)])
def test_page_variant_keeps_whole_pages(name, n, page_size):
    sink = 1 if name.startswith("streaming") else 0
    strat = make_token_strategy(name, page_size=page_size, **({"sink": sink} if sink else {}))
    inputs = _inputs_for(name, n, 3)
    budget = min(1.0, max(0.3, (strat.sink + strat.window) / n))
    pages = strat.select_pages(n, budget, **inputs)
    keep = strat.select(n, budget, **_same(inputs))
    page_of = torch.arange(n) // page_size
    for p in range(-(-n // page_size)):
        assert keep[page_of == p].all() or not keep[page_of == p].any()       # whole pages only
    assert keep[-1] and keep[:strat.sink].all() and keep[n - strat.window:].all()
    # the selected pages are the protected ones plus the best by summed token score
    scores = strat.token_scores(n, **_same(inputs))
    num_pages = -(-n // page_size)
    psum = [float(scores[page_of == p].sum()) for p in range(num_pages)]
    prot = {p for p in range(num_pages) if p == num_pages - 1 or any(
        (i < strat.sink or i >= n - strat.window) for i in range(p * page_size, min(n, (p + 1) * page_size)))}
    want = len(prot) + max(0, -(-resolve_budget(budget, n, strat.sink, strat.window) // page_size) - len(prot))
    rest = sorted((p for p in range(num_pages) if p not in prot), key=lambda p: (-psum[p], p))
    assert pages.tolist() == sorted(prot | set(rest[:want - len(prot)]))


def _same(inputs):
    """h2o's select accumulates its input; the page test calls twice, so pass nothing the second time."""
    return {} if "decode_attention" in inputs else inputs


def test_quest_bound_is_an_upper_bound_and_finds_the_argmax():
    for _ in range(20):
        n, hkv, g, d, ps = int(torch.randint(1, 80, ())), int(torch.randint(1, 4, ())), 3, 16, 8
        keys = torch.randn(n, hkv, d)
        q = torch.randn(hkv * g, d)
        kmin, kmax = page_key_minmax(keys, ps)
        bound = quest_bound(q, kmin, kmax)
        for i in range(hkv * g):
            scores = keys[:, i // g] @ q[i]
            for p in range(-(-n // ps)):
                assert bound[i, p] >= scores[p * ps:(p + 1) * ps].max() - 1e-4
    quest = make_token_strategy("quest", page_size=1)      # page_size 1: the bound is exact
    n, d = 50, 16
    keys, q = torch.randn(n, 1, d), torch.randn(1, d)
    pages = quest.select_pages(n, 2, page_minmax=page_key_minmax(keys, 1), query=q)
    assert int((keys[:, 0] @ q[0]).argmax()) in pages.tolist() and (n - 1) in pages.tolist()
    quest = make_token_strategy("quest", page_size=8)      # a planted key far above the rest
    keys[21, 0] = 10 * q[0]
    pages = quest.select_pages(n, 16, page_minmax=page_key_minmax(keys, 8), query=q)
    assert pages.tolist() == [21 // 8, (n - 1) // 8]


def test_pyramid_budgets():
    for total, layers, beta in [(1000, 8, 20.0), (10, 3, 1.0), (37, 37, 5.0), (4096, 32, 3.0), (50, 1, 20.0)]:
        b = pyramid_budgets(total, layers, beta)
        assert sum(b) == total and len(b) == layers and min(b) >= 1
        assert all(x >= y for x, y in zip(b, b[1:]))
        if beta > 1 and total >= 10 * layers and layers > 1:
            assert b[0] > b[-1]
    tova = make_token_strategy("tova")
    masks = select_per_layer(tova, [{"last_query": _random_attn(2, 64)} for _ in range(4)], 64, 0.25)
    counts = [int(m.sum()) for m in masks]
    assert counts == pyramid_budgets(64, 4) and counts[0] > counts[-1]


def test_bad_arguments_name_what_is_allowed():
    for bad in (0, 0.0, -1, 1.5, True, "half", float("nan")):
        with pytest.raises(ValueError, match="budget must be"):
            resolve_budget(bad, 10)
    with pytest.raises(ValueError, match="sink \\+ window"):
        resolve_budget(3, 100, sink=2, window=4)
    with pytest.raises(ValueError, match="sink \\+ window"):
        make_token_strategy("snapkv", window=8).select(100, 0.05, attention_window=_random_attn(1, 8, 100))
    assert resolve_budget(0.5, 7) == 4 and resolve_budget(100, 7) == 7 and resolve_budget(3, 3, 2, 4) == 3
    with pytest.raises(ValueError, match="valid strategies: .*snapkv"):
        make_token_strategy("snap")
    assert type(make_token_strategy("SnapKV")).__name__ == "SnapKV"
    with pytest.raises(ValueError, match="kernel_size"):
        make_token_strategy("snapkv", kernel_size=4)
    with pytest.raises(ValueError, match="missing \\['last_query'\\]"):
        make_token_strategy("tova").select(5, 0.5)
    with pytest.raises(ValueError, match="total must be"):
        pyramid_budgets(3, 4)


def test_snapkv_keep_mask_drives_compact_tokens():
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    block_size, hkv, g, d = 4, 2, 2, 8
    lens = [23, 9, 16]
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    kc = torch.randn(num_blocks, block_size, hkv, d)
    vc = torch.randn(num_blocks, block_size, hkv, d)
    perm = torch.randperm(num_blocks)
    bt = torch.full((len(lens), 6), -1, dtype=torch.int32)
    slots, keys, values, used = [], [], [], 0
    for b, n in enumerate(lens):
        nb = -(-n // block_size)
        bt[b, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb
        t = torch.arange(n)
        slots.append(bt[b].long()[t // block_size] * block_size + t % block_size)
        keys.append(torch.randn(n, hkv, d))
        values.append(torch.randn(n, hkv, d))
    ops.append_kv(torch.cat(keys), torch.cat(values), kc, vc, torch.cat(slots))
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    gk, gv, cu = ops.gather_kv(kc, vc, bt, seq_lens)
    w = 3
    snap = make_token_strategy("snapkv", window=w, kernel_size=3)
    keep = torch.zeros(len(lens), max(lens), dtype=torch.bool)
    for b, n in enumerate(lens):
        k_b, q = gk[cu[b]:cu[b + 1]].double(), torch.randn(w, hkv * g, d, dtype=torch.float64)
        s = torch.einsum("qhd,thd->hqt", q, k_b.repeat_interleave(g, 1)) / math.sqrt(d)
        causal = torch.arange(n)[None, :] <= torch.arange(n - w, n)[:, None]
        attn = torch.softmax(s.masked_fill(~causal, -math.inf), -1)
        keep[b, :n] = snap.select(n, 0.5, attention_window=attn)
    with ops.backend("reference"):
        new_lens = ops.compact_tokens(kc, vc, bt, seq_lens, keep)
    assert new_lens.tolist() == [int(keep[b, :n].sum()) for b, n in enumerate(lens)]
    nk, nv, ncu = ops.gather_kv(kc, vc, bt, new_lens)
    for b, n in enumerate(lens):
        pos = kept_positions(keep[b, :n])
        assert pos.tolist() == sorted(pos.tolist()) and (n - 1) in pos.tolist()
        assert torch.equal(nk[ncu[b]:ncu[b + 1]], gk[cu[b]:cu[b + 1]][pos])
        assert torch.equal(nv[ncu[b]:ncu[b + 1]], gv[cu[b]:cu[b + 1]][pos])
