"""Synthetic generators and the workload registry: determinism, well-formed records, prefix chaining."""

import math

import pytest

from kvtriton.spec import DESIGN_CACHE_BYTES, PRESETS
from kvtriton.workloads import (Request, available_workloads, design_cache_tokens, design_mix_workload,
                                make_workload, multiturn_workload, zipf_prefix_workload)

GENERATORS = {
    "zipf": lambda seed, bt=512: zipf_prefix_workload(60, seed=seed, block_tokens=bt),
    "multiturn": lambda seed, bt=512: multiturn_workload(12, system_prompt_tokens=700, seed=seed,
                                                         block_tokens=bt),
    "design_mix": lambda seed, bt=512: design_mix_workload(40, seed=seed, block_tokens=bt),
}


def _check_well_formed(reqs):
    assert reqs and all(isinstance(r, Request) for r in reqs)
    assert [r.request_id for r in reqs] == list(range(len(reqs)))
    arr = [r.arrival_s for r in reqs]
    assert arr == sorted(arr) and arr[0] >= 0
    for r in reqs:
        assert r.input_length >= 1 and r.output_length >= 1
        assert len(r.hash_ids) == math.ceil(r.input_length / r.block_tokens)


def _check_prefix_chained(reqs):
    """Equal id at position k <=> equal ids at every position <= k, and an id sits at one position."""
    prefix_of = {}
    for r in reqs:
        for k, h in enumerate(r.hash_ids):
            key = tuple(r.hash_ids[:k])
            assert prefix_of.setdefault(h, (k, key)) == (k, key), f"id {h} names two different prefixes"


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generators_deterministic_and_well_formed(name):
    a, b, c = GENERATORS[name](3), GENERATORS[name](3), GENERATORS[name](4)
    assert a == b
    assert a != c
    _check_well_formed(a)
    _check_prefix_chained(a)


@pytest.mark.parametrize("bt", [16, 100, 512])
def test_block_tokens_configurable(bt):
    for gen in GENERATORS.values():
        reqs = gen(0, bt)
        assert all(r.block_tokens == bt for r in reqs)
        _check_well_formed(reqs)
        _check_prefix_chained(reqs)


def test_zipf_popularity_and_sharing():
    reqs = zipf_prefix_workload(2000, num_prefixes=6, zipf_alpha=1.2, prefix_blocks=(2, 3),
                                suffix_tokens=(10, 600), block_tokens=64, seed=1)
    counts = [sum(r.meta["prefix"] == p for r in reqs) for p in range(6)]
    assert counts[0] > counts[1] > counts[3] > 0
    first = {}
    for r in reqs:
        n = r.meta["prefix_blocks"]
        assert 2 <= n <= 3 and r.input_length > n * 64
        assert first.setdefault(r.meta["prefix"], r.hash_ids[:n]) == r.hash_ids[:n]
    assert len(set(first.values())) == 6
    suffix_ids = [h for r in reqs for h in r.hash_ids[r.meta["prefix_blocks"]:]]
    assert len(suffix_ids) == len(set(suffix_ids))  # user suffixes are never shared


def test_multiturn_turns_extend_previous_prompt():
    bt = 128
    reqs = multiturn_workload(6, turns=(3, 5), system_prompt_tokens=300, block_tokens=bt, seed=7)
    sessions = {}
    for r in reqs:
        sessions.setdefault(r.session_id, []).append(r)
    assert len(sessions) == 6
    for s, rs in sessions.items():
        assert [r.turn for r in rs] == list(range(len(rs))) and 3 <= len(rs) <= 5
        for prev, cur in zip(rs, rs[1:]):
            assert cur.arrival_s > prev.arrival_s
            assert cur.input_length > prev.input_length + prev.output_length
            full_prev = prev.input_length // bt
            assert cur.hash_ids[:full_prev] == prev.hash_ids[:full_prev]
            if prev.input_length % bt:  # a partial block's id is not reused once it fills up
                assert cur.hash_ids[full_prev] != prev.hash_ids[full_prev]
    # the system prompt's two whole blocks are shared by every session, the rest is not
    firsts = [rs[0] for rs in sessions.values()]
    assert len({r.hash_ids[:2] for r in firsts}) == 1
    assert len({r.hash_ids[2] for r in firsts}) == len(firsts)


def test_design_mix_sizes():
    reqs = design_mix_workload(400, vista_fraction=0.3, output_tokens=(4, 12), seed=5)
    assert {r.model for r in reqs} == {"vista", "deepseek-ocr"}
    frac = sum(r.model == "vista" for r in reqs) / len(reqs)
    assert 0.22 < frac < 0.38
    for r in reqs:
        tokens = r.input_length + r.output_length
        assert tokens == design_cache_tokens(r.model)
        nbytes = tokens * PRESETS[r.model].bytes_per_token
        # the K/V fit in the design's size and miss it by less than one token
        assert DESIGN_CACHE_BYTES[r.model] - PRESETS[r.model].bytes_per_token < nbytes <= DESIGN_CACHE_BYTES[r.model]
        assert r.meta["cache_bytes"] == DESIGN_CACHE_BYTES[r.model]
    assert design_cache_tokens("vista") == 80 and design_cache_tokens("deepseek-ocr") == 85
    assert all(r.model == "vista" for r in design_mix_workload(20, vista_fraction=1.0))


def test_arrival_rate_inf_and_gaps():
    reqs = zipf_prefix_workload(30, arrival_rate=float("inf"))
    assert all(r.arrival_s == 0.0 for r in reqs)
    reqs = zipf_prefix_workload(3000, arrival_rate=10.0, seed=2)
    assert reqs[-1].arrival_s / len(reqs) == pytest.approx(0.1, rel=0.1)


def test_make_workload_registry():
    assert set(available_workloads()) >= {"mooncake_conversation", "mooncake_synthetic", "zipf",
                                          "multiturn", "design_mix"}
    assert make_workload("zipf", num_requests=5, seed=1) == zipf_prefix_workload(5, seed=1)
    assert make_workload("design-mix", num_requests=3) == design_mix_workload(3)
    with pytest.raises(ValueError, match="valid workloads: .*design_mix.*zipf"):
        make_workload("zipfian", num_requests=5)


def test_make_workload_mooncake(traces_dir):
    reqs = make_workload("mooncake_conversation", traces_dir=traces_dir, limit=7)
    assert len(reqs) == 7 and all(isinstance(r, Request) for r in reqs)
    assert reqs[0].block_tokens == 512 and reqs[0].hash_ids[0] == 0


@pytest.mark.parametrize("call, arg", [
    (lambda: zipf_prefix_workload(0), "num_requests"),
    (lambda: zipf_prefix_workload(-3), "num_requests"),
    (lambda: zipf_prefix_workload(5, num_prefixes=0), "num_prefixes"),
    (lambda: zipf_prefix_workload(5, zipf_alpha=-1), "zipf_alpha"),
    (lambda: zipf_prefix_workload(5, suffix_tokens=(10, 5)), "suffix_tokens"),
    (lambda: zipf_prefix_workload(5, prefix_blocks=(0, 2)), "prefix_blocks"),
    (lambda: zipf_prefix_workload(5, arrival_rate=0), "arrival_rate"),
    (lambda: zipf_prefix_workload(5, block_tokens=0), "block_tokens"),
    (lambda: multiturn_workload(0), "num_sessions"),
    (lambda: multiturn_workload(2, turns=(0, 2)), "turns"),
    (lambda: multiturn_workload(2, turn_gap_s=-1.0), "turn_gap_s"),
    (lambda: multiturn_workload(2, system_prompt_tokens=-1), "system_prompt_tokens"),
    (lambda: design_mix_workload(5, vista_fraction=1.5), "vista_fraction"),
    (lambda: design_mix_workload(5, output_tokens=80), "output_tokens"),
    (lambda: design_cache_tokens("llama"), "model"),
])
def test_bad_arguments(call, arg):
    with pytest.raises(ValueError, match=arg):
        call()
