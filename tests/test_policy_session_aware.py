"""session_aware: the return model, the eviction order it gives, the fallback, and the agentic trace."""

import math
import random

import pytest

from kvtriton.policies import SessionAwarePolicy, make_policy
from kvtriton.policies.prefix_replay import PrefixCacheReplay
from kvtriton.policies.session_return import ReturnModel
from kvtriton.replay import simulate
from kvtriton.workloads import Request, make_workload
from kvtriton.workloads.paths import agentic_trace_path


def _req(sid, t, stop, ids=(), rid=0):
    return Request(rid, float(t), 64 * max(1, len(ids)), 1, tuple(ids), 64, session_id=sid, stop_reason=stop)


def _serve(p, sid, t, stop, keys):
    """One request through the policy as the prefix replay drives it (all keys inserted or hit, released
    last key first)."""
    hits = 0
    for k in keys:
        if k in p:
            hits += 1
        else:
            break
    p.on_request(keys, hits, _req(sid, t, stop, keys))
    for k in keys:
        if k in p:
            p.access_and_pin(k)
        else:
            p.insert_and_pin(k)
    p.unpin_many(reversed(keys))


def test_return_model_learns_tool_use_returns_sooner_than_end_turn():
    m = ReturnModel()
    t = 0.0
    for s in range(40):                      # tool loops: back in 5 s; people: back in 2000 s
        stop, gap = ("tool_use", 5.0) if s % 2 == 0 else ("end_turn", 2000.0)
        for turn in range(4):
            m.observe(s, t + turn * gap, stop)
        t += 10_000.0
    assert m.return_probability("tool_use", 30.0) == 1.0
    assert m.return_probability("end_turn", 30.0) == 0.0
    now = t
    m.observe("a", now, "tool_use")
    m.observe("b", now, "end_turn")
    assert m.score("a", now + 1.0) > m.score("b", now + 1.0)
    assert math.isnan(m.return_probability("other", 30.0))


def test_evicts_the_session_least_likely_to_return_tail_first():
    p = SessionAwarePolicy(capacity=100)
    t = 0.0
    for s in range(30):                      # history: tool_use sessions return in seconds, end_turn never
        stop = "tool_use" if s % 2 == 0 else "end_turn"
        keys = [(s, i) for i in range(2)]
        _serve(p, s, t, stop, keys)
        if stop == "tool_use":
            _serve(p, s, t + 3.0, stop, keys)
        t += 50.0
    for k in list(p._owner):
        p.remove(k)
    _serve(p, "tool", t, "tool_use", [("tool", i) for i in range(3)])
    _serve(p, "end", t + 1.0, "end_turn", [("end", i) for i in range(3)])
    _serve(p, "new", t + 2.0, "tool_use", [("new", 0)])
    # the end_turn session goes first (LRU would take the older tool session), from its tail
    assert [p.victim() for _ in range(3)] == [("end", 2), ("end", 1), ("end", 0)]
    assert p.victim()[0] in ("tool", "new")


def test_stale_blocks_of_a_session_go_before_its_latest_prompt():
    p = SessionAwarePolicy()
    _serve(p, 1, 0.0, "tool_use", ["a", "b", "x"])
    _serve(p, 1, 5.0, "tool_use", ["a", "b", "c", "d"])   # "x" is stale: not in the latest prompt
    assert [p.victim() for _ in range(5)] == ["x", "d", "c", "b", "a"]
    with pytest.raises(LookupError):
        p.victim()


def test_stale_blocks_of_any_session_go_before_the_ranked_sessions():
    p = SessionAwarePolicy()
    _serve(p, "tool", 0.0, "tool_use", ["t1", "t2", "old"])
    _serve(p, "end", 1.0, "end_turn", ["e1"])
    _serve(p, "tool", 2.0, "tool_use", ["t1", "t2", "t3"])      # "old" left the tool session's prompt
    assert p.victim() == "old"                                  # before the end_turn session's block
    assert p.victim() == "e1"


def test_pins_nest_and_pinned_blocks_are_never_victims():
    p = SessionAwarePolicy()
    _serve(p, 1, 0.0, "end_turn", ["a", "b"])
    p.on_request(["a"], 1, _req(2, 1.0, "tool_use", ["a"]))
    p.access_and_pin("a")
    p.pin("a")
    assert p.num_evictable == 1 and p.victim() == "b"
    with pytest.raises(LookupError):
        p.victim()
    p.unpin("a")
    assert p.num_evictable == 0
    p.unpin("a")
    assert p.victim() == "a" and len(p) == 0


def test_random_operations_keep_the_counts_consistent():
    rng = random.Random(0)
    p = SessionAwarePolicy()
    pinned, resident = {}, set()
    t = 0.0
    for step in range(3000):
        t += rng.random()
        sid = rng.randrange(6)
        p.on_request([], 0, _req(sid, t, rng.choice(["tool_use", "end_turn", None])))
        op = rng.random()
        k = rng.randrange(40)
        if op < 0.4 and k not in resident:
            p.insert_and_pin(k)
            resident.add(k)
            pinned[k] = 1
        elif op < 0.6 and k in resident:
            p.access_and_pin(k)
            pinned[k] = pinned.get(k, 0) + 1
        elif op < 0.8 and pinned:
            k = rng.choice(sorted(pinned))
            p.unpin(k)
            pinned[k] -= 1
            if not pinned[k]:
                del pinned[k]
        elif op < 0.9 and len(resident) > len(pinned):
            v = p.victim()
            assert v in resident and v not in pinned
            resident.discard(v)
        elif k in resident:
            p.remove(k)
            resident.discard(k)
            pinned.pop(k, None)
        assert len(p) == len(resident) and p.num_evictable == len(resident) - len(pinned)


def test_without_session_ids_it_is_its_fallback_exactly():
    reqs = make_workload("zipf", num_requests=300, block_tokens=64, seed=3)
    assert all(r.session_id is None for r in reqs)
    cap = max(len(r.hash_ids) for r in reqs) + 20
    for fb in ("prefix_aware", "arc"):
        a = simulate(reqs, "session_aware", cap, policy_kwargs={"fallback": fb})
        b = simulate(reqs, fb, cap)
        assert (a["hits"], a["evictions"]) == (b["hits"], b["evictions"])
    pol = make_policy("session_aware", capacity=cap)
    PrefixCacheReplay(pol, cap).step(reqs[0].hash_ids, reqs[0])
    assert pol.mode == "fallback"


def test_a_request_without_session_after_sessions_is_refused():
    p = SessionAwarePolicy()
    _serve(p, 1, 0.0, "tool_use", ["a"])
    assert p.mode == "session"
    with pytest.raises(ValueError, match="session_id"):
        p.on_request(["b"], 0, Request(1, 1.0, 64, 1, ("b",), 64))


@pytest.mark.parametrize("kwargs, match", [
    ({"fallback": "session_aware"}, "fallback"), ({"fallback": "mru"}, "valid policies"),
    ({"horizons": (30.0,), "weights": (1.0, 0.1)}, "equal length"),
    ({"horizons": (-1.0,), "weights": (1.0,)}, "horizons"),
    ({"weights": (1.0, float("nan"), 0.0)}, "weights"), ({"prior": 0}, "prior"),
    ({"pace_edges": (20, 10)}, "pace_edges"), ({"capacity": 0}, "capacity")])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SessionAwarePolicy(**kwargs)


def test_on_the_agentic_trace_it_beats_lru_and_learns_the_stop_reasons():
    try:
        path = agentic_trace_path()
    except FileNotFoundError:
        pytest.skip("the agentic traces are not here")
    from kvtriton.workloads import load_agentic

    reqs = load_agentic(path, limit=80)
    cap = max(len(r.hash_ids) for r in reqs) * 3
    pol = make_policy("session_aware", capacity=cap)
    ours = simulate(reqs, pol, cap)
    lru = simulate(reqs, "lru", cap)
    assert pol.mode == "session"
    assert ours["hit_rate"] > lru["hit_rate"]
    learned = pol.learned()
    assert learned["p_return_30s_tool_use"] > 2 * learned["p_return_30s_end_turn"]
