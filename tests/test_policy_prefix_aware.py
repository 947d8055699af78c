"""prefix_aware: the online choice of beta by shadow caches, its continuity, and its reference points."""

import pytest

from kvtriton.policies import PrefixAwarePolicy, make_policy
from kvtriton.policies.prefix_aware import _shadow, _shadow_step
from kvtriton.replay import simulate
from kvtriton.workloads import load_mooncake, multiturn_workload, zipf_prefix_workload
from kvtriton.workloads.request import Request


def req(i, ids, length=None):
    length = 512 * len(ids) if length is None else length
    return Request(request_id=i, arrival_s=float(i), input_length=length, output_length=1, hash_ids=tuple(ids))


def test_beta_is_learned_only_with_a_capacity_and_no_fixed_beta():
    assert PrefixAwarePolicy(capacity=100).adaptive
    assert PrefixAwarePolicy(capacity=100).beta == 2.0           # starts at 2.0, one of the candidates
    assert not PrefixAwarePolicy(capacity=100, beta=2.0).adaptive
    assert not PrefixAwarePolicy().adaptive                       # no capacity: nothing to size shadows by
    assert PrefixAwarePolicy(capacity=100, betas=(1.0, 8.0, 16.0)).beta == 8.0


@pytest.mark.parametrize("kwargs, match", [
    ({"beta": -1.0}, "beta"), ({"beta": True}, "beta"), ({"betas": ()}, "betas"), ({"betas": (1.0, 0)}, "betas"),
    ({"betas": 3}, "betas"), ({"half_life": 0}, "half_life"), ({"every": 0}, "every"), ({"every": 2.5}, "every"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrefixAwarePolicy(capacity=10, **kwargs)


def test_a_shadow_counts_the_hits_the_replay_counts():
    trace = zipf_prefix_workload(300, num_prefixes=6, seed=3)
    cap = 40
    sh = _shadow(cap, 2.0, None)
    hits = sum(_shadow_step(sh, r.hash_ids, r) for r in trace)
    assert hits == simulate(trace, PrefixAwarePolicy(capacity=cap, beta=2.0), cap)["hits"]
    assert hits > 0


def test_changing_beta_keeps_given_priorities_and_the_age_continuous():
    p = PrefixAwarePolicy(capacity=2, beta=2.0)
    r0 = req(0, [1, 2])
    p.on_request(r0.hash_ids, 0, r0)
    for k in r0.hash_ids:
        p.insert_and_pin(k)
    p.unpin_many([2, 1])
    assert p.victim() == 2                                        # age 2 * 1 / 2 = 1.0 from now on
    before = p.priority(1)
    p._set_beta(8.0)
    assert p.priority(1) == before
    r1 = req(1, [3])
    p.on_request(r1.hash_ids, 0, r1)
    p.insert_and_pin(3)
    p.unpin_many([3])
    assert p.priority(3) == pytest.approx(1.0 + 1)                # the age did not jump with beta
    assert p.victim() == 1                                        # 1.0 + 1 reference, released first
    p.on_request(r1.hash_ids, 1, r1)
    p.access_and_pin(3)
    p.unpin_many([3])
    assert p.priority(3) == pytest.approx(1.0 + 8.0 * 1 / 2 + 2)  # after that, it grows at 8 / C


def test_learning_is_deterministic_and_moves_beta():
    trace = multiturn_workload(120, turns=(2, 8), seed=1) + zipf_prefix_workload(400, num_prefixes=20, seed=2)
    runs = []
    for _ in range(2):
        p = PrefixAwarePolicy(capacity=60, every=10, half_life=100)
        betas = []
        orig = p._set_beta

        def spy(b, orig=orig, betas=betas):
            betas.append(b)
            orig(b)
        p._set_beta = spy
        r = simulate(trace, p, 60)
        runs.append((r["hits"], tuple(betas)))
    assert runs[0] == runs[1]
    assert runs[0][1], "beta never changed"


def test_reference_points_on_the_mooncake_traces(traces_dir):
    # The synthetic trace wants a high beta at 1,000 blocks, the conversation trace a low one; one fixed
    # beta loses on either, the learned one beats ARC and S3-FIFO on both.
    syn = load_mooncake(traces_dir / "synthetic_trace.jsonl")
    p = make_policy("prefix_aware", capacity=1000)
    got = simulate(syn, p, 1000)["hit_rate"]
    assert p.beta == 4.0
    best = max(simulate(syn, name, 1000)["hit_rate"] for name in ("arc", "s3fifo", "lru"))
    assert got > 1.03 * best
    assert got > 1.05 * simulate(syn, "prefix_aware", 1000, policy_kwargs={"beta": 2.0})["hit_rate"]
    conv = load_mooncake(traces_dir / "conversation_trace.jsonl")[:6000]
    p = make_policy("prefix_aware", capacity=1000)
    got = simulate(conv, p, 1000)["hit_rate"]
    assert p.beta == 0.5
    best = max(simulate(conv, name, 1000)["hit_rate"] for name in ("arc", "s3fifo", "lru"))
    assert got > 1.2 * best


def test_state_stays_bounded_on_a_long_trace():
    # The main cache's and every shadow's heap, counts and history stay within a multiple of the
    # capacity (the history within its bound) however long the trace.
    cap, hist = 60, 300
    trace = zipf_prefix_workload(4000, num_prefixes=40, seed=5)
    p = PrefixAwarePolicy(capacity=cap, history=hist, every=20)
    simulate(trace, p, cap)
    biggest = max(len(r.hash_ids) for r in trace)
    for q in [p] + [sh.policy for sh in p._shadows]:
        assert len(q._prio) == len(q._refs) == len(q._stamp) <= cap and not q._pinned
        assert len(q._heap) <= max(64, 2 * len(q._prio)) + biggest
        assert len(q._history) <= hist
    assert all(len(sh.resident) <= cap for sh in p._shadows)
