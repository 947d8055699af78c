"""Fast prefix-cache replay: semantics on hand-worked traces, bad input, reference points."""

import pytest

from kvtriton.policies import available_policies, make_policy
from kvtriton.replay import miss_ratio_curve, simulate
from kvtriton.workloads.request import Request


def req(i, ids, length=None):
    length = 512 * len(ids) if length is None else length
    return Request(request_id=i, arrival_s=float(i), input_length=length, output_length=1, hash_ids=tuple(ids))


def test_hits_are_the_longest_resident_prefix_and_tokens_weigh_the_partial_block():
    trace = [req(0, [1, 2, 3], 1100), req(1, [1, 2, 4], 1500), req(2, [5, 2, 3], 1536)]
    r = simulate(trace, "lru", None)
    # request 1 hits 1, 2; request 2 misses 5 so its resident 2, 3 do not count.
    assert (r["hits"], r["references"]) == (2, 9)
    assert r["hit_rate"] == pytest.approx(2 / 9)
    assert r["token_references"] == 1100 + 1500 + 1536
    assert r["token_hits"] == 1024
    assert r["evictions"] == 0
    full = simulate([req(0, [1, 2], 700), req(1, [1, 2], 700)], "lru", None)
    assert full["token_hits"] == 700 and full["token_hit_rate"] == pytest.approx(0.5)


def test_prefix_order_evicts_a_request_tail_first():
    trace = [req(0, [1, 2, 3]), req(1, [4]), req(2, [1, 2, 3])]
    pre = simulate(trace, "lru", 3, order="prefix")
    fwd = simulate(trace, "lru", 3, order="forward")
    assert pre["hits"] == 2          # 3 went for 4: the prefix 1, 2 survives
    assert fwd["hits"] == 0          # 1 went for 4: nothing of the prefix is usable
    assert pre["evictions"] == 2 and fwd["evictions"] == 4


def test_running_request_blocks_are_pinned():
    # FIFO would evict block 1 (oldest) while request 1 still needs it, were it not pinned.
    trace = [req(0, [1]), req(1, [1, 2, 3])]
    r = simulate(trace, "fifo", 3)
    assert r["hits"] == 1 and r["evictions"] == 0
    r = simulate([req(0, [9]), req(1, [1, 2]), req(2, [1, 2, 3])], "fifo", 3)
    assert r["hits"] == 2 and r["evictions"] == 1


@pytest.mark.parametrize("name", available_policies())
def test_every_policy_replays_and_stays_within_capacity(name):
    import random
    rng = random.Random(1)
    trace = [req(i, [0] + [rng.randrange(40) + 100 * (j + 1) for j in range(rng.randrange(1, 6))])
             for i in range(300)]
    r = simulate(trace, name, 12, sample_every=50)
    assert 0.0 < r["hit_rate"] <= simulate(trace, "lru", None)["hit_rate"] + 1e-12
    assert len(r["series"]) == 6
    assert all(0 < s["occupancy"] <= 1.0 for s in r["series"])
    assert r["series"][-1]["hit_rate"] == pytest.approx(r["hit_rate"])


def test_policy_instance_and_context_hook():
    seen = []

    class Spy(type(make_policy("lru"))):
        def on_request(self, keys, num_hit, request=None):
            seen.append((tuple(keys), num_hit, request.request_id))

    trace = [req(0, [1, 2]), req(1, [1, 3])]
    simulate(trace, Spy(), 4)
    assert seen == [((1, 2), 0, 0), ((1, 3), 1, 1)]
    seen.clear()
    simulate(iter(trace), Spy(), 4)         # any iterable of records
    assert seen == [((1, 2), 0, 0), ((1, 3), 1, 1)]


def test_bad_input_is_refused_before_any_work():
    trace = [req(0, [1, 2, 3]), req(1, [1, 2])]
    with pytest.raises(ValueError, match="valid policies: .*lru"):
        simulate(trace, "nope", 10)
    with pytest.raises(ValueError, match="valid policies"):
        miss_ratio_curve(trace, policies=["lru", "nope"], capacities=[10], progress=False)
    with pytest.raises(ValueError, match="capacity_blocks=2 is below the largest request's 3 blocks"):
        simulate(trace, "lru", 2)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="capacity_blocks"):
            simulate(trace, "lru", bad)
    with pytest.raises(ValueError, match="capacity_blocks"):
        miss_ratio_curve(trace, policies=["lru"], capacities=[10, 0], progress=False)
    with pytest.raises(ValueError, match="no requests"):
        simulate([], "lru", 10)
    with pytest.raises(ValueError, match="no requests"):
        miss_ratio_curve([], policies=["lru"], capacities=[10], progress=False)
    with pytest.raises(ValueError, match="order"):
        simulate(trace, "lru", 10, order="backward")
    with pytest.raises(ValueError, match="input_length"):
        simulate([req(0, [1], -1)], "lru", 10)
    with pytest.raises(ValueError, match="capacities is empty"):
        miss_ratio_curve(trace, policies=["lru"], capacities=[], progress=False)
    used = make_policy("lru")
    used.insert(7)
    with pytest.raises(ValueError, match="fresh"):
        simulate(trace, used, 10)


def test_miss_ratio_curve_frame_and_workers_agree():
    import random
    rng = random.Random(2)
    trace = [req(i, [0] + [rng.randrange(30) + 100 * (j + 1) for j in range(rng.randrange(1, 5))])
             for i in range(200)]
    kw = dict(policies=["lru", "arc", "belady"], capacities=[8, 32], progress=False)
    one = miss_ratio_curve(trace, workers=1, **kw)
    two = miss_ratio_curve(trace, workers=2, **kw)
    for col in ("policy", "capacity_blocks", "hit_rate", "token_hit_rate", "miss_ratio", "evictions", "hits",
                "references", "seconds"):
        assert col in one.columns
    assert list(one["policy"]) == ["lru", "lru", "arc", "arc", "belady", "belady"]
    assert list(one["capacity_blocks"]) == [8, 32] * 3
    assert one.drop(columns="seconds").equals(two.drop(columns="seconds"))
    assert (one["miss_ratio"] == 1 - one["hit_rate"]).all()
    by = one.set_index(["policy", "capacity_blocks"])["hits"]
    for cap in (8, 32):
        assert by["belady", cap] >= by["lru", cap]
        assert by["belady", cap] >= by["arc", cap]


def test_reference_points_on_the_conversation_trace(traces_dir):
    from kvtriton.workloads.mooncake import load_mooncake

    trace = load_mooncake(traces_dir / "conversation_trace.jsonl")
    assert simulate(trace, "lru", None)["hit_rate"] == pytest.approx(0.3664, abs=5e-4)
    assert simulate(trace, "lru", 10_000)["hit_rate"] == pytest.approx(0.21, abs=0.005)
    assert simulate(trace, "lru", 30_000)["hit_rate"] == pytest.approx(0.33, abs=0.006)
    assert simulate(trace, "lru", 10_000, order="forward")["hit_rate"] == pytest.approx(0.21, abs=0.005)
    assert simulate(trace, "belady", 10_000)["hit_rate"] == pytest.approx(0.3664, abs=5e-4)


def test_prefix_aware_beats_the_classic_policies_at_10k_blocks(traces_dir):
    from kvtriton.workloads.mooncake import load_mooncake

    trace = load_mooncake(traces_dir / "conversation_trace.jsonl")
    best = max(simulate(trace, name, 10_000)["hit_rate"] for name in ("lru", "arc", "s3fifo", "sieve"))
    assert simulate(trace, "prefix_aware", 10_000)["hit_rate"] > 1.04 * best
