"""The compiled replay kernels give exactly the Python policies' results; engine choice and fallbacks."""

import subprocess
import sys
from functools import lru_cache

import pytest

from kvtriton.policies import make_policy
from kvtriton.replay import ENGINES, miss_ratio_curve, simulate
from kvtriton.replay.compiled import KERNEL_POLICIES
from kvtriton.replay.flat_trace import prepare_trace
from kvtriton.workloads import multiturn_workload, zipf_prefix_workload
from kvtriton.workloads.request import Request

numba = pytest.importorskip("numba")
from hypothesis import given, settings, strategies as st  # noqa: E402

ORDERS = ("prefix", "forward")
FIELDS = ("hits", "references", "token_hits", "token_references", "evictions", "requests", "hit_rate",
          "token_hit_rate", "miss_ratio")


def req(i, ids, length=None, bt=512):
    length = bt * len(ids) if length is None else length
    return Request(request_id=i, arrival_s=float(i), input_length=length, output_length=1, hash_ids=tuple(ids),
                   block_tokens=bt)


def assert_same(trace, name, cap, order, sample_every=None, policy_kwargs=None, python=None):
    """Compiled equals Python for one run; returns the compiled result."""
    fast = simulate(trace, name, cap, order=order, sample_every=sample_every, policy_kwargs=policy_kwargs,
                    engine="compiled")
    ref = python if python is not None else simulate(trace, name, cap, order=order, sample_every=sample_every,
                                                     policy_kwargs=policy_kwargs, engine="python")
    assert fast["engine"] == "compiled" and ref["engine"] == "python"
    where = f"{name} at {cap} blocks, {order} order"
    for f in FIELDS:
        assert fast[f] == ref[f], f"{f} differs for {where}: compiled {fast[f]}, python {ref[f]}"
    assert _nan_safe(fast.get("series")) == _nan_safe(ref.get("series")), f"series differ for {where}"
    return fast


def _nan_safe(series):
    """The series with NaN (the occupancy of an unlimited cache) made comparable."""
    if series is None:
        return None
    return [{k: "nan" if v != v else v for k, v in row.items()} for row in series]


def chained(paths, bt=64):
    """Requests whose ids are prefix-chained: one id per distinct prefix of the symbol paths."""
    ids: dict = {}
    out = []
    for i, (path, partial) in enumerate(paths):
        keys = [ids.setdefault(tuple(path[:j + 1]), len(ids)) for j in range(len(path))]
        out.append(req(i, keys, bt * len(keys) - partial, bt))
    return out


paths = st.lists(st.tuples(st.lists(st.integers(0, 2), min_size=1, max_size=7), st.integers(0, 63)),
                 min_size=1, max_size=40)


@settings(max_examples=40, deadline=None)
@given(paths, st.integers(0, 6))
def test_random_prefix_chained_workloads(paths, extra):
    trace = chained(paths)
    need = max(len(r.hash_ids) for r in trace)
    for name in KERNEL_POLICIES:
        for order in ORDERS:
            for cap in (need, need + extra, None):
                assert_same(trace, name, cap, order, sample_every=3)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(0, 12), min_size=1, max_size=6), min_size=1, max_size=40),
       st.integers(0, 4))
def test_random_ids_with_repeats_inside_a_request(lists, extra):
    # Not prefix-chained and with a key repeated inside a request (it is pinned twice, released twice).
    trace = [req(i, ids) for i, ids in enumerate(lists)]
    need = max(len(ids) for ids in lists)
    for name in KERNEL_POLICIES:
        for order in ORDERS:
            assert_same(trace, name, need + extra, order, sample_every=2)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("make", ["zipf", "multiturn"])
def test_synthetic_workloads(make, order):
    if make == "zipf":
        trace = zipf_prefix_workload(250, num_prefixes=12, prefix_blocks=(2, 20), suffix_tokens=(64, 1500),
                                     block_tokens=64, seed=3)
    else:
        trace = multiturn_workload(40, turns=(2, 8), system_prompt_tokens=700, block_tokens=64, seed=5)
    need = max(len(r.hash_ids) for r in trace)
    total = sum(len(r.hash_ids) for r in trace)
    for name in KERNEL_POLICIES:
        for cap in (need, need + 7, 2 * need, total // 4, None):
            assert_same(trace, name, max(cap, need) if cap else None, order, sample_every=25)


def test_policy_kwargs_are_honoured():
    trace = zipf_prefix_workload(300, num_prefixes=20, prefix_blocks=(2, 12), block_tokens=128, seed=1)
    need = max(len(r.hash_ids) for r in trace)
    cap = need + 20
    default = assert_same(trace, "s3fifo", cap, "prefix")
    results = set()
    for kw in ({"small_ratio": 0.3}, {"move_to_main_threshold": 2}, {"small_ratio": 0.5, "move_to_main_threshold": 3},
               {"capacity": cap}):
        results.add(assert_same(trace, "s3fifo", cap, "prefix", policy_kwargs=kw)["hits"])
    assert results - {default["hits"]}, "the keyword arguments changed nothing"
    for name in ("lru", "arc", "lfu", "gdsf"):
        assert_same(trace, name, cap, "forward", policy_kwargs={"capacity": cap})
    assert_same(trace, "arc", None, "prefix", policy_kwargs={"capacity": 5})  # never read: no evictions


def test_engine_choice_and_field():
    trace = [req(0, [1, 2, 3]), req(1, [1, 2, 4]), req(2, [5])]
    assert ENGINES == ("auto", "python", "compiled")
    assert simulate(trace, "lru", 4)["engine"] == "compiled"
    assert simulate(trace, "lru", 4, engine="python")["engine"] == "python"
    assert simulate(trace, "adaptive", 4, engine="compiled")["policy"] == "arc"  # aliases too
    for name in ("belady", "prefix_aware", "kv_hawkeye"):
        r = simulate(trace, name, 4)
        assert r["engine"] == "python" and "engine_note" not in r
        with pytest.raises(ValueError, match=f"'{name}' has no compiled kernel.*lru, fifo, sieve, s3fifo, arc"):
            simulate(trace, name, 4, engine="compiled")
    assert simulate(trace, make_policy("lru"), 4)["engine"] == "python"
    with pytest.raises(ValueError, match="policy instance replays in Python.*policies with a compiled kernel"):
        simulate(trace, make_policy("lru"), 4, engine="compiled")
    # Keyword arguments a kernel cannot honour: the Python engine, said so.
    r = simulate(trace, "gdsf", 4, policy_kwargs={"cost_fn": lambda k, s: 2.0})
    assert r["engine"] == "python-fallback" and "cost_fn" in r["engine_note"]
    assert r["hits"] == simulate(trace, "gdsf", 4, engine="python", policy_kwargs={"cost_fn": lambda k, s: 2.0})["hits"]
    with pytest.raises(ValueError, match="cost_fn"):
        simulate(trace, "gdsf", 4, policy_kwargs={"cost_fn": lambda k, s: 2.0}, engine="compiled")
    r = simulate(trace, "s3fifo", 4, policy_kwargs={"capacity": 9})
    assert r["engine"] == "python-fallback" and "capacity=9" in r["engine_note"]
    with pytest.raises(TypeError):  # unknown keyword arguments fail as on the Python path
        simulate(trace, "lru", 4, policy_kwargs={"bogus": 1})
    with pytest.raises(ValueError, match="small_ratio"):
        simulate(trace, "s3fifo", 4, policy_kwargs={"small_ratio": 2.0})


@pytest.mark.parametrize("bad", ["fast", "Compiled", "", None, 1, ("auto",)])
def test_bad_engine_values(bad):
    trace = [req(0, [1, 2])]
    with pytest.raises(ValueError, match="engine must be one of"):
        simulate(trace, "lru", 4, engine=bad)
    with pytest.raises(ValueError, match="engine must be one of"):
        miss_ratio_curve(trace, policies=["lru"], capacities=[4], engine=bad, progress=False)


def test_miss_ratio_curve_engines_and_workers_agree():
    trace = multiturn_workload(30, turns=(2, 6), block_tokens=128, seed=2)
    need = max(len(r.hash_ids) for r in trace)
    kw = dict(policies=list(KERNEL_POLICIES) + ["belady"], capacities=[need, 2 * need, 4 * need], progress=False)
    fast = miss_ratio_curve(trace, workers=2, **kw)
    slow = miss_ratio_curve(trace, workers=1, engine="python", **kw)
    assert list(fast["engine"]) == ["compiled"] * 3 * len(KERNEL_POLICIES) + ["python"] * 3
    assert set(slow["engine"]) == {"python"}
    cols = ["policy", "capacity_blocks", "hits", "token_hits", "evictions", "hit_rate", "token_hit_rate"]
    assert fast[cols].equals(slow[cols])
    one = miss_ratio_curve(trace, workers=1, **kw)
    assert one.drop(columns="seconds").equals(fast.drop(columns="seconds"))
    with pytest.raises(ValueError, match="no compiled kernel"):
        miss_ratio_curve(trace, policies=["lru", "belady"], capacities=[need], engine="compiled", progress=False)


@pytest.mark.parametrize("kind", ["sparse", "negative", "strings"])
def test_ids_that_are_not_dense(kind):
    base = chained([([0, 1, 2], 0), ([0, 1, 0], 5), ([1], 0), ([0, 1, 2, 2], 0), ([2, 2], 0), ([0, 1], 0)] * 4)
    remap = {"sparse": lambda k: k * 10**15 + 7, "negative": lambda k: -k - 1, "strings": lambda k: f"b{k}"}[kind]
    trace = [req(r.request_id, [remap(k) for k in r.hash_ids], r.input_length, r.block_tokens) for r in base]
    keys, num = prepare_trace(trace).dense_keys()
    assert num == len({k for r in trace for k in r.hash_ids}) and keys.max() == num - 1
    for name in KERNEL_POLICIES:
        for cap in (4, 5, None):
            assert_same(trace, name, cap, "prefix")
            assert_same(trace, name, cap, "forward")


def test_importable_and_falls_back_without_numba():
    code = ("import sys; sys.modules['numba'] = None\n"
            "from kvtriton.replay import simulate\n"
            "from kvtriton.workloads.request import Request\n"
            "t = [Request(0, 0.0, 1024, 1, (1, 2)), Request(1, 1.0, 1024, 1, (1, 3))]\n"
            "r = simulate(t, 'lru', 2)\n"
            "assert r['engine'] == 'python-fallback' and 'numba' in r['engine_note'] and r['hits'] == 1, r\n"
            "try:\n    simulate(t, 'lru', 2, engine='compiled')\nexcept ValueError as e:\n"
            "    assert 'numba' in str(e) and 'lru, fifo' in str(e)\nelse:\n    raise SystemExit('no error')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# -------------------------------------------------------------------------------------- Mooncake traces

@lru_cache(maxsize=None)
def _mooncake(name, limit=None):
    from kvtriton.workloads.mooncake import load_mooncake
    from kvtriton.workloads.paths import mooncake_trace_path

    path = mooncake_trace_path(f"mooncake_{name}")
    if not path.exists():
        pytest.skip(f"Mooncake trace not found at {path}")
    return load_mooncake(path, limit=limit)


@pytest.mark.parametrize("name", KERNEL_POLICIES)
def test_full_mooncake_traces(name):
    # One full-trace equality per policy and trace; the other capacities and orders on prefixes below.
    assert_same(_mooncake("conversation"), name, 3000, "prefix", sample_every=1000)
    assert_same(_mooncake("synthetic"), name, 10000, "forward")


@pytest.mark.parametrize("name", KERNEL_POLICIES)
def test_mooncake_capacities_and_orders(name):
    conv, syn = _mooncake("conversation", 2500), _mooncake("synthetic", 1200)
    for cap in (1000, 3000, 10000):
        for order in ORDERS:
            assert_same(conv, name, cap, order)
            assert_same(syn, name, cap, order)
    full = _mooncake("conversation")
    for cap in (1000, 10000):  # the full trace on the compiled path: shape of the results
        r = simulate(full, name, cap, sample_every=4000)
        assert r["engine"] == "compiled" and r["references"] == 288_500 and len(r["series"]) == 3
