"""Eviction policies: hand-worked sequences from each paper, pinning, and properties."""

import random

import pytest
from hypothesis import given, settings, strategies as st

from kvtriton.policies import (ARCPolicy, BeladyPolicy, EvictionPolicy, FIFOPolicy, GDSFPolicy, LFUPolicy,
                               LRUPolicy, S3FIFOPolicy, SievePolicy, available_policies, canonical_name,
                               make_policy)

ONLINE = [n for n in available_policies() if n != "belady"]


def test_registry_names_and_aliases():
    names = set(available_policies())
    assert {"lru", "fifo", "lfu", "gdsf", "arc", "s3fifo", "sieve", "belady"} <= names
    assert canonical_name("GDSF") == "gdsf" and canonical_name("size_aware_lru") == "gdsf"
    assert canonical_name("arc") == "arc" and canonical_name("Adaptive") == "arc"
    assert isinstance(make_policy("arc", capacity=8), ARCPolicy)
    with pytest.raises(ValueError, match="valid policies: .*lru"):
        make_policy("mru")


@pytest.mark.parametrize("name", ONLINE)
def test_victim_on_empty_and_all_pinned_raises_lookup_error(name):
    p = make_policy(name, capacity=4)
    with pytest.raises(LookupError):
        p.victim()
    p.insert("a")
    p.pin("a")
    with pytest.raises(LookupError):
        p.victim()
    assert len(p) == 1 and p.num_evictable == 0 and "a" in p
    p.unpin("a")
    assert p.victim() == "a"
    assert len(p) == 0 and "a" not in p


@pytest.mark.parametrize("name", ONLINE)
def test_bad_calls_raise_and_change_nothing(name):
    p = make_policy(name, capacity=4)
    p.insert(1)
    with pytest.raises(ValueError):
        p.insert(1)
    with pytest.raises(KeyError):
        p.access(2)
    with pytest.raises(KeyError):
        p.remove(2)
    with pytest.raises(ValueError):
        p.unpin(1)
    for size in (0, -3):
        with pytest.raises(ValueError, match="size"):
            p.insert(5, size=size)
    assert len(p) == 1 and p.num_evictable == 1 and 5 not in p
    with pytest.raises(ValueError, match="capacity"):
        make_policy(name, capacity=0)


def test_lru_order_and_pin_keeps_it_out_until_released():
    p = LRUPolicy()
    for k in (1, 2, 3):
        p.insert(k)
    p.access(1)
    p.pin(2)
    assert p.victim() == 3          # 2 is older but pinned
    p.unpin(2)                      # released now: most recent
    assert p.victim() == 1
    assert p.victim() == 2


def test_fifo_ignores_hits_and_a_pinned_key_keeps_its_place():
    p = FIFOPolicy()
    for k in (1, 2, 3):
        p.insert(k)
    p.access(1)
    p.pin(1)
    assert p.victim() == 2          # 1 is first in but pinned
    p.unpin(1)
    assert p.victim() == 1          # still the oldest
    assert p.victim() == 3


def test_nested_pins():
    p = LRUPolicy()
    p.insert("x")
    p.pin("x")
    p.pin("x")
    p.unpin("x")
    assert p.num_evictable == 0
    p.unpin("x")
    assert p.num_evictable == 1


def test_lfu_aging_lets_new_keys_overtake_old_popularity():
    p = LFUPolicy()
    p.insert("a")
    for _ in range(3):
        p.access("a")               # frequency 4, priority 4
    assert p.priority("a") == 4
    out = []
    for i in range(4):
        p.insert(i)                 # priority = age + 1, the age rising with every victim
        out.append(p.victim())
    # Without aging "a" would stay forever; with it the fourth newcomer ties and the older "a" goes.
    assert out == [0, 1, 2, "a"]
    assert p.age == 4


def test_lfu_pin_keeps_frequency():
    p = LFUPolicy()
    p.insert("a")
    p.insert("b")
    p.access("a")
    p.pin("a")
    p.access("a")
    p.unpin("a")
    assert p.frequency("a") == 3
    assert p.victim() == "b"


def test_gdsf_priority_is_inflation_plus_frequency_times_cost_over_size():
    p = GDSFPolicy()
    p.insert("big", size=2)         # H = 0 + 1/2
    p.insert("small", size=1)       # H = 0 + 1
    assert p.priority("big") == 0.5 and p.priority("small") == 1.0
    assert p.victim() == "big"      # L becomes 0.5
    assert p.inflation == 0.5
    p.access("small")               # H = 0.5 + 2/1
    assert p.priority("small") == 2.5
    p.insert("huge", size=4)        # H = 0.5 + 1/4
    assert p.priority("huge") == 0.75
    assert p.victim() == "huge"
    q = GDSFPolicy(cost_fn=lambda key, size: 10.0)
    q.insert("k", size=4)
    assert q.priority("k") == 2.5


def test_arc_adapts_p_on_ghost_hits():
    # Megiddo & Modha 2003, Fig. 4: a B1 hit grows p by max(1, |B2|/|B1|), a B2 hit shrinks it by
    # max(1, |B1|/|B2|); both move the key to T2's MRU end.
    p = ARCPolicy(capacity=4)
    for k in (1, 2, 3, 4):
        p.insert(k)
    p.access(3)
    p.access(4)
    assert p.lists() == {"t1": [1, 2], "t2": [3, 4], "b1": [], "b2": []}
    assert p.victim() == 1          # |T1| = 2 > p = 0
    p.insert(5)
    assert p.victim() == 2
    assert p.lists()["b1"] == [1, 2]
    p.insert(1)                     # B1 ghost hit
    assert p.p == 1.0
    assert p.lists() == {"t1": [5], "t2": [3, 4, 1], "b1": [2], "b2": []}
    assert p.victim() == 3          # |T1| = 1 is not above p = 1: take T2's LRU
    assert p.lists()["b2"] == [3]
    p.insert(3)                     # B2 ghost hit: p -= max(1, |B1|/|B2|) = 1
    assert p.p == 0.0
    assert p.lists() == {"t1": [5], "t2": [4, 1, 3], "b1": [2], "b2": []}
    # p grows faster when B2 is larger than B1.
    assert p.victim() == 5
    assert p.victim() == 4
    assert p.victim() == 1
    assert p.lists()["b1"] == [2, 5] and p.lists()["b2"] == [4, 1]
    p.insert(2)                     # B1 hit, |B2|/|B1| = 2/2 -> +1
    assert p.p == 1.0


def test_arc_pinned_key_returns_to_its_list():
    p = ARCPolicy(capacity=4)
    p.insert("a")
    p.insert("b")
    p.pin("a")
    p.access("a")                   # hit while pinned: belongs to T2 now
    p.unpin("a")
    assert p.lists()["t2"] == ["a"] and p.lists()["t1"] == ["b"]


def test_sieve_hand_and_visited_bits():
    # Zhang et al. NSDI'24, Fig. 2 style: the hand sweeps from the tail towards the head, clearing
    # visited bits, evicts the first unvisited key, and stays where it stopped; retained keys never move.
    p = SievePolicy()
    for k in "ABCD":
        p.insert(k)
    p.access("A")
    p.access("C")
    assert p.victim() == "B"        # A visited: cleared and passed
    assert p.hand == "C"
    p.insert("E")
    assert p.victim() == "D"        # C visited: cleared and passed
    assert p.hand == "E"
    p.insert("F")
    assert p.victim() == "E"
    assert p.order() == ["A", "C", "F"]   # A and C stayed where they were
    assert p.victim() == "F"
    assert p.hand is None           # ran off the head: the next sweep starts at the tail
    assert p.victim() == "A"        # its bit was cleared on the first sweep


def test_sieve_passes_pinned_keys_without_clearing_their_bit():
    p = SievePolicy()
    for k in "ABC":
        p.insert(k)
    p.access("A")
    p.pin("A")
    p.pin("B")
    assert p.victim() == "C"
    p.unpin("A")
    p.unpin("B")
    assert p.victim() == "B"        # A is still visited: cleared and passed
    assert p.victim() == "A"


def test_s3fifo_small_queue_promotion_and_ghost():
    # Yang et al. SOSP'23: new keys go to S (10% of the cache); S's oldest key moves to M if it was hit,
    # else it is evicted into the ghost queue G; a key found in G is inserted into M directly.
    p = S3FIFOPolicy(capacity=10)   # S target: 1 key, G: up to 9 keys
    p.insert("a")
    p.access("a")
    p.insert("b")
    assert p.victim() == "b"        # a (hit) moved to M, b (not hit) evicted into G
    assert p.queues() == {"small": [], "main": ["a"], "ghost": ["b"]}
    p.insert("b")                   # ghost hit: straight into M
    assert p.queues() == {"small": [], "main": ["a", "b"], "ghost": []}
    # M is a 2-bit CLOCK: a (frequency 1) is reinserted with frequency 0, b goes.
    assert p.victim() == "b"
    assert p.queues()["main"] == ["a"] and p.frequency("a") == 0
    for k in range(12):
        p.insert(k)
        if len(p) > 10:
            p.victim()
    assert len(p.queues()["ghost"]) <= 9
    q = S3FIFOPolicy(capacity=10)
    q.insert("x")
    for _ in range(5):
        q.access("x")
    assert q.frequency("x") == 3    # capped


def test_belady_evicts_farthest_next_use_and_checks_the_future():
    future = [1, 2, 3, 1, 2, 4, 1]
    p = BeladyPolicy(future)
    p.insert(1)
    p.insert(2)
    assert p.next_use(1) == 3 and p.next_use(2) == 4
    assert p.victim() == 2          # next used later than 1
    p.insert(3)                     # never used again
    p.access(1)
    assert p.victim() == 3
    with pytest.raises(ValueError, match="future sequence has 2"):
        p.insert(9)
    p.insert(2)
    assert p.position == 5
    p.seek(6)
    p.access(1)
    assert p.next_use(1) == float("inf")


def _plain_hits(policy, seq, cap):
    hits = 0
    for k in seq:
        if k in policy:
            hits += 1
            policy.access(k)
        else:
            if len(policy) >= cap:
                policy.victim()
            policy.insert(k)
    return hits


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=120), st.integers(1, 10))
def test_belady_never_fewer_hits_than_any_policy(seq, cap):
    best = _plain_hits(BeladyPolicy(seq, capacity=cap), seq, cap)
    for name in ONLINE:
        assert best >= _plain_hits(make_policy(name, capacity=cap), seq, cap), name


OPS = st.lists(st.tuples(st.sampled_from(["insert", "access", "remove", "victim", "pin", "unpin"]),
                         st.integers(0, 9)), max_size=150)


@pytest.mark.parametrize("name", ONLINE)
@settings(max_examples=100, deadline=None)
@given(ops=OPS)
def test_random_interleavings_keep_counts_consistent(name, ops):
    p = make_policy(name, capacity=6)
    resident: set = set()
    pins: dict = {}
    for op, k in ops:
        if op == "insert" and k not in resident:
            p.insert(k)
            resident.add(k)
        elif op == "access" and k in resident:
            p.access(k)
        elif op == "remove" and k in resident:
            p.remove(k)
            resident.discard(k)
            pins.pop(k, None)
        elif op == "victim":
            if len(resident) == len(pins):
                with pytest.raises(LookupError):
                    p.victim()
            else:
                v = p.victim()
                assert v in resident and v not in pins
                resident.discard(v)
        elif op == "pin" and k in resident:
            p.pin(k)
            pins[k] = pins.get(k, 0) + 1
        elif op == "unpin" and k in pins:
            p.unpin(k)
            pins[k] -= 1
            if not pins[k]:
                del pins[k]
        assert len(p) == len(resident)
        assert p.num_evictable == len(resident) - len(pins)
        for j in range(10):
            assert (j in p) == (j in resident)
    # Draining returns every unpinned key exactly once.
    drained = set()
    while p.num_evictable:
        drained.add(p.victim())
    assert drained == resident - set(pins)


def test_fused_hooks_match_the_primitive_calls():
    rng = random.Random(0)
    for name in ONLINE:
        a, b = make_policy(name, capacity=8), make_policy(name, capacity=8)
        for step in range(300):
            keys = rng.sample(range(20), 3)
            for k in keys:
                if k in a:
                    a.access_and_pin(k)
                    b.access(k)
                    b.pin(k)
                else:
                    while len(a) >= 8:
                        assert a.victim() == b.victim(), name
                    a.insert_and_pin(k)
                    b.insert(k)
                    b.pin(k)
            a.unpin_many(reversed(keys))
            for k in reversed(keys):
                b.unpin(k)
        assert sorted(a.victim() for _ in range(a.num_evictable)) == sorted(b.victim() for _ in range(len(b)))


def test_base_class_is_abstract():
    with pytest.raises(TypeError):
        EvictionPolicy()


def test_prefix_aware_dead_tail_history_and_priority():
    from kvtriton.policies import PrefixAwarePolicy
    from kvtriton.workloads.request import Request

    p = PrefixAwarePolicy(capacity=4, beta=2.0)
    r = Request(request_id=0, arrival_s=0.0, input_length=1100, output_length=1, hash_ids=(1, 2, 3))
    p.on_request(r.hash_ids, 0, r)          # 1100 tokens: block 3 holds 76 of 512, a dead tail
    for k in r.hash_ids:
        p.insert_and_pin(k)
    p.unpin_many(reversed(r.hash_ids))
    assert p.priority(3) == float("-inf")
    assert p.priority(1) == p.priority(2) == 1.0   # 2 * 0 evictions / 4 + 1 reference
    assert p.victim() == 3
    assert p.victim() == 2                  # tie with 1: released first (the tail goes first)
    full = Request(request_id=1, arrival_s=0.0, input_length=1024, output_length=1, hash_ids=(1, 2))
    p.on_request(full.hash_ids, 1, full)    # fills its blocks: nothing dead
    p.access_and_pin(1)
    p.insert_and_pin(2)
    assert p.references(2) == 2             # remembered across its eviction
    p.unpin_many([2, 1])
    assert p.priority(2) == 2.0 * 2 / 4 + 2 and p.priority(1) == 1.0 + 2
    with pytest.raises(ValueError, match="beta"):
        PrefixAwarePolicy(beta=0)
