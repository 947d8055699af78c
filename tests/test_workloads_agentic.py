"""The agentic coding traces loader: namespaces, arrivals, coarsening, shared prefixes, sub-agents, errors.

Most tests read small conversations written to ``tmp_path``; a few read the shared archive
(``claude_code_traces.tgz``) with ``limit`` and skip when it is absent.
"""

from __future__ import annotations

import json
import math
import tarfile

import numpy as np
import pytest

from kvtriton.workloads import WORKLOADS, load_agentic, make_workload
from kvtriton.workloads.agentic import coarsen_ids, conversation_starts
from kvtriton.workloads.paths import agentic_trace_path

ARCHIVE = agentic_trace_path()


def _req(t, ids, *, extra=0, out=10, stop="tool_use", kind="n", **kw):
    """A prompt request of ``len(ids)`` full 64-token blocks (plus ``extra`` unhashed tokens)."""
    return {"t": t, "type": kind, "in": 64 * len(ids) + extra, "out": out, "hash_ids": list(ids),
            "stop": stop, "api_time": 1.0, "think_time": 0.5, **kw}


def _write(folder, name, requests, tool=600, system=424, **top):
    folder.mkdir(parents=True, exist_ok=True)
    conv = {"id": name, "block_size": 64, "tool_tokens": tool, "system_tokens": system,
            "requests": requests, **top}
    (folder / f"{name}.json").write_text(json.dumps(conv))
    return folder / f"{name}.json"


def _sub(t, duration_ms, requests, agent="agent_001"):
    return {"t": t, "type": "subagent", "agent_id": agent, "subagent_type": "Explore", "duration_ms": duration_ms,
            "tool_tokens": 300, "system_tokens": 212, "requests": requests}


def _rows(reqs):
    return [(r.request_id, r.arrival_s, r.input_length, r.output_length, r.hash_ids, r.block_tokens, r.session_id,
             r.turn, r.stop_reason, r.parent_id, r.meta.get("conversation"), r.meta.get("agent_id")) for r in reqs]


@pytest.fixture(scope="module")
def archive():
    if not ARCHIVE.is_file():
        pytest.skip(f"the agentic traces are not at {ARCHIVE} (set $KVTRITON_AGENTIC_TRACES)")
    return ARCHIVE


# ------------------------------------------------------------------------------------------ the archive

def test_archive_in_place_equals_unpacked_folders(archive, tmp_path):
    members = {}                                   # the three first trace files by name (one holds sub-agents)
    with tarfile.open(archive) as tar:
        for m in tar:
            if m.isfile() and m.name.endswith(".json"):
                members[m.name.rsplit("/", 1)[-1]] = tar.extractfile(m).read()
                if len(members) > 3:
                    members.pop(max(members))
    first = sorted(members)
    reqs = load_agentic(archive, limit=3, subagents=True, block_tokens=64)
    names = sorted({r.meta["conversation"] for r in reqs})
    assert [n + ".json" for n in names] == first
    assert [r.request_id for r in reqs] == list(range(len(reqs)))
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(reqs, reqs[1:]))
    assert {r.stop_reason for r in reqs} <= {"tool_use", "end_turn", None}
    assert any(r.parent_id is not None for r in reqs)                      # trace_0003 runs sub-agents
    assert all(len(r.hash_ids) <= math.ceil(r.input_length / 64) for r in reqs)
    for name in first:
        for folder in (tmp_path / "nested" / "traces", tmp_path / "flat"):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(members[name])
    for folder in (tmp_path / "nested", tmp_path / "flat"):
        assert _rows(load_agentic(folder, subagents=True, block_tokens=64)) == _rows(reqs)
    one = load_agentic(tmp_path / "flat" / first[0], block_tokens=64)          # a single file
    assert [r.hash_ids for r in one] == [r.hash_ids for r in reqs if r.session_id == 0 and r.parent_id is None]
    coarse = load_agentic(tmp_path / "flat")                                 # defaults: 512 tokens, no sub-agents
    assert all(r.block_tokens == 512 and r.parent_id is None for r in coarse)
    assert len(coarse) == sum(r.parent_id is None for r in reqs)


def test_registered_workload_and_default_path(archive, tmp_path):
    assert "agentic" in WORKLOADS
    a = make_workload("agentic", path=str(archive), limit=1)
    b = make_workload("agentic", traces_dir=str(archive.parent), limit=1)
    assert _rows(a) == _rows(b) and {r.session_id for r in a} == {0}
    assert a[0].meta["arrival"].startswith("Poisson conversation starts: rate 0.1/s")
    _write(tmp_path, "c0", [_req(0.0, [1, 2])])
    assert len(make_workload("agentic", traces_dir=str(tmp_path))) == 1
    with pytest.raises(ValueError, match="unknown parameter"):
        make_workload("agentic", path=str(archive), bogus=1)


# -------------------------------------------------------------------------------------------- namespaces

def test_each_conversation_has_its_namespace_and_subagents_share_it(tmp_path):
    _write(tmp_path, "a", [_req(0.0, [1, 2, 3]), _sub(30.0, 10_000, [_req(0.0, [3, 7])])])
    _write(tmp_path, "b", [_req(0.0, [1, 2]), _req(5.0, [1, 2, 4])])
    reqs = load_agentic(tmp_path, block_tokens=64, subagents=True)
    by = {(r.meta["conversation"], r.meta["agent_id"], r.turn): r.hash_ids for r in reqs}
    assert by[("a", None, 0)] == (1, 2, 3)                                # offset 0
    assert by[("a", "agent_001", 0)] == (3, 7)                             # the parent's namespace
    assert by[("b", None, 0)] == (9, 10) and by[("b", None, 1)] == (9, 10, 12)  # offset = top(a) + 1 = 8
    assert set(by[("a", None, 0)]).isdisjoint(by[("b", None, 1)])
    # the ids do not depend on the sub-agents flag
    main = load_agentic(tmp_path, block_tokens=64)
    assert {r.hash_ids for r in main} == {v for k, v in by.items() if k[1] is None}


# --------------------------------------------------------------------------------------------- arrivals

def _three(tmp_path):
    for c in range(3):
        _write(tmp_path, f"c{c}", [_req(0.0, [1]), _req(2.5, [1, 2]), _req(2.5, [1, 2, 3]), _req(40.0, [1, 2, 3, 4])])
    return tmp_path


def test_poisson_conversation_starts(tmp_path):
    folder = _three(tmp_path)
    reqs = load_agentic(folder, arrival_rate=0.5, seed=3, block_tokens=64)
    starts = np.cumsum(np.random.default_rng(3).exponential(2.0, 3)).tolist()
    assert starts == conversation_starts(3, 0.5, 3)
    for r in reqs:
        assert r.arrival_s == starts[r.session_id] + [0.0, 2.5, 2.5, 40.0][r.turn]
    assert [r.request_id for r in reqs] == list(range(12))
    assert [r.arrival_s for r in reqs] == sorted(r.arrival_s for r in reqs)
    where = {(r.session_id, r.turn): r.request_id for r in reqs}
    assert all(where[(s, 2)] == where[(s, 1)] + 1 for s in range(3))        # equal arrivals keep file order
    for s in range(3):
        turns = [r.turn for r in reqs if r.session_id == s]
        assert turns == [0, 1, 2, 3]
    assert "rate 0.5/s" in reqs[0].meta["arrival"] and "default_rng(3)" in reqs[0].meta["arrival"]
    assert _rows(load_agentic(folder, arrival_rate=0.5, seed=3, block_tokens=64)) == _rows(reqs)
    other = load_agentic(folder, arrival_rate=0.5, seed=4, block_tokens=64)
    assert [r.arrival_s for r in other] != [r.arrival_s for r in reqs]
    fast = load_agentic(folder, arrival_rate=50.0, seed=3, block_tokens=64)
    span = lambda rs: rs[-1].arrival_s - rs[0].arrival_s  # noqa: E731
    assert span(fast) < span(reqs)
    assert conversation_starts(2, 0.5, 3) == starts[:2]                     # limit keeps the first starts
    first_two = load_agentic(folder, arrival_rate=0.5, seed=3, block_tokens=64, limit=2)
    assert {r.session_id for r in first_two} == {0, 1}
    assert sorted((r.session_id, r.turn, r.arrival_s) for r in first_two) == sorted(
        (r.session_id, r.turn, r.arrival_s) for r in reqs if r.session_id < 2)


# ------------------------------------------------------------------------------------------- coarsening

def test_coarsening_rules_against_a_hand_written_reference(tmp_path):
    native = list(range(101, 120))                                          # 19 native blocks
    assert coarsen_ids(native, 8, "last") == [108, 116, 119]
    assert coarsen_ids(native, 8, "first") == [101, 109, 117]
    assert coarsen_ids(native[:16], 8, "last") == [108, 116]
    assert coarsen_ids(np.array(native), 2, "last").tolist() == native[1::2] + [119]
    _write(tmp_path, "c", [_req(0.0, native, extra=30)])
    for rule, want in (("last", (108, 116, 119)), ("first", (101, 109, 117))):   # one conversation: offset 0
        (r,) = load_agentic(tmp_path, block_tokens=512, coarsen=rule)
        assert r.hash_ids == want and r.block_tokens == 512
        assert r.input_length == 19 * 64 + 30
    (r,) = load_agentic(tmp_path, progress=True)                               # the default: every 8th id from 0
    assert r.hash_ids == (101, 109, 117)
    (r,) = load_agentic(tmp_path, block_tokens=128, coarsen="last")
    assert r.hash_ids == tuple(native[1::2] + [119])
    (r,) = load_agentic(tmp_path, block_tokens=64)
    assert r.hash_ids == tuple(native) and r.block_tokens == 64


# -------------------------------------------------------------------------------------- shared prefixes

def test_shared_prefix_namespace(tmp_path):
    _write(tmp_path, "a", [_req(0.0, range(1, 25))], tool=600, system=424)          # 1024 tokens: 2 blocks of 512
    _write(tmp_path, "b", [_req(0.0, range(1, 25))], tool=600, system=424)
    _write(tmp_path, "c", [_req(0.0, range(1, 25))], tool=1100, system=500)         # 1600 tokens: 3 blocks
    off = {r.meta["conversation"]: r.hash_ids for r in load_agentic(tmp_path)}
    assert len({ids[0] for ids in off.values()}) == 3
    on = {r.meta["conversation"]: r.hash_ids for r in load_agentic(tmp_path, shared_prefix=True)}
    top = 3 * 25                                                                   # the conversations' namespaces
    assert on["a"][:2] == on["b"][:2] == (top, top + 1)
    assert on["c"][:3] == (top + 2, top + 3, top + 4)
    assert on["a"][2:] == off["a"][2:] and on["c"][3:] == off["c"][3:]
    assert set(on["a"][2:]).isdisjoint(on["b"][2:])
    native = {r.meta["conversation"]: r.hash_ids for r in load_agentic(tmp_path, shared_prefix=True, block_tokens=64)}
    assert native["a"][:16] == native["b"][:16] and native["a"][16] != native["b"][16]   # 1024 / 64 = 16


# ---------------------------------------------------------------------------------- sub-agents and stops

def test_subagents_on_and_off(tmp_path):
    reqs = [_req(0.0, [1, 2], stop="tool_use"),
            _req(10.0, [1, 2, 3], stop="tool_use"),
            _sub(60.0, 45_000, [_req(0.0, [20, 21]), _req(4.0, [20, 21, 22], stop="end_turn")]),
            _sub(70.0, None, [_req(1.0, [30])], agent="agent_002"),
            _req(80.0, [1, 2, 3, 4], stop="end_turn"),
            _req(90.0, [1, 2, 3, 4, 5], stop=""),
            {k: v for k, v in _req(95.0, [1, 2, 3, 4, 5, 6]).items() if k != "stop"}]
    _write(tmp_path, "c", reqs)
    main = load_agentic(tmp_path, block_tokens=64, arrival_rate=1.0)
    assert len(main) == 5 and all(r.parent_id is None and r.meta["agent_id"] is None for r in main)
    assert [r.stop_reason for r in main] == ["tool_use", "tool_use", "end_turn", None, None]
    assert [r.turn for r in main] == list(range(5))
    both = load_agentic(tmp_path, block_tokens=64, arrival_rate=1.0, subagents=True)
    assert len(both) == 8
    start = conversation_starts(1, 1.0, 0)[0]
    launcher = next(r for r in both if r.parent_id is None and r.turn == 1)
    subs = [r for r in both if r.meta["agent_id"] == "agent_001"]
    assert [r.turn for r in subs] == [0, 1] and [r.stop_reason for r in subs] == ["tool_use", "end_turn"]
    assert [r.arrival_s for r in subs] == [start + 15.0 + 0.0, start + 15.0 + 4.0]  # 60 - 45 s, + own t
    assert all(r.parent_id == launcher.request_id and r.session_id == 0 for r in subs)
    assert subs[0].hash_ids == (20, 21) and subs[0].meta["subagent_type"] == "Explore"
    (late,) = [r for r in both if r.meta["agent_id"] == "agent_002"]
    assert late.arrival_s == start + 70.0 + 1.0 and late.parent_id == launcher.request_id  # no duration
    assert [r.request_id for r in both] == list(range(8))


def test_fewer_ids_than_tokens_are_kept_more_are_refused(tmp_path):
    _write(tmp_path, "c", [_req(0.0, [1, 2], extra=64 * 5 + 3)])                # 8 blocks of tokens, 2 ids
    (r,) = load_agentic(tmp_path, block_tokens=64)
    assert r.hash_ids == (1, 2) and r.input_length == 64 * 7 + 3
    tiny = _req(0.0, [])
    tiny["in"] = 40                                                              # under one block: no ids
    _write(tmp_path, "c", [tiny, _req(1.0, [1], extra=7)])
    assert [r.hash_ids for r in load_agentic(tmp_path, block_tokens=64)] == [(), (1,)]
    bad = _req(0.0, [1, 2, 3])
    bad["in"] = 64 * 2
    _write(tmp_path, "c", [bad])
    with pytest.raises(ValueError, match=r"c\.json: requests\[0\]: 'hash_ids' has 3 blocks"):
        load_agentic(tmp_path)


# ---------------------------------------------------------------------------------------------- errors

def _set(field, value):
    def edit(entry):
        if value is _MISSING:
            entry.pop(field)
        else:
            entry[field] = value
    return edit


_MISSING = object()
_BAD_ENTRY = [("in", _MISSING), ("in", -1), ("in", 0), ("in", "12"), ("in", 1.5), ("in", True),
              ("out", _MISSING), ("out", -3), ("out", "x"), ("out", 2.5),
              ("hash_ids", _MISSING), ("hash_ids", "1,2"), ("hash_ids", []), ("hash_ids", [1, 2.5]),
              ("hash_ids", [1, "2"]), ("hash_ids", [1, -2]), ("hash_ids", [1, True]), ("hash_ids", [1, None]),
              ("hash_ids", [[1], 2]), ("hash_ids", [1, 2**70]),
              ("t", _MISSING), ("t", -1.0), ("t", "0"), ("t", 1e999), ("t", None), ("t", 1.0),
              ("type", "x"), ("type", _MISSING), ("type", 3),
              ("stop", 5), ("stop", ["tool_use"]), ("api_time", -1.0), ("think_time", "slow")]


@pytest.mark.parametrize("field,value", _BAD_ENTRY, ids=[f"{f}={v if v is not _MISSING else 'missing'}"
                                                          for f, v in _BAD_ENTRY])
@pytest.mark.parametrize("inside", [False, True], ids=["main", "subagent"])
def test_bad_entry_names_file_entry_and_field(tmp_path, field, value, inside):
    if inside and field == "type" and value == "x":
        value = "subagent"                                                    # no sub-agents inside sub-agents
    entry = _req(2.0, [1, 2, 3])
    _set(field, value)(entry)
    if inside:
        reqs = [_req(0.0, [1]), _sub(5.0, 1000, [_req(1.5, [4]), entry])]
        where = r"requests\[1\]\.requests\[1\]"
    else:
        reqs = [_req(0.0, [1]), _req(1.5, [1, 2]), entry] if field == "t" else [_req(0.0, [1]), entry]
        where = r"requests\[2\]" if field == "t" else r"requests\[1\]"
    _write(tmp_path, "conv_7", reqs)
    with pytest.raises(ValueError, match=rf"conv_7\.json: {where}: '{field}'") as e:
        load_agentic(tmp_path, subagents=True)
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize("doc,match", [
    ({"requests": {"t": 0}}, r"x\.json: 'requests' must be a list"),
    ({"requests": [_req(0.0, [1]), 7]}, r"x\.json: requests\[1\]: expected a JSON object"),
    ({"requests": [_sub(1.0, 10, "none")]}, r"x\.json: requests\[0\]: 'requests' must be a list"),
    ({"requests": [_sub(1.0, -10, [])]}, r"x\.json: requests\[0\]: 'duration_ms'"),
    ({"requests": [_req(0.0, [1])], "block_size": 16}, r"x\.json: 'block_size' must be 64"),
    ({"requests": [_req(0.0, [1])], "tool_tokens": -1}, r"x\.json: 'tool_tokens'"),
])
def test_bad_conversation(tmp_path, doc, match):
    tool = doc.pop("tool_tokens", 600)
    _write(tmp_path, "x", tool=tool, **doc)
    with pytest.raises(ValueError, match=match):
        load_agentic(tmp_path, shared_prefix=True)


def test_bad_json_and_empty(tmp_path):
    (tmp_path / "x.json").write_text('{"requests": [')
    with pytest.raises(ValueError, match=r"x\.json: not valid JSON"):
        load_agentic(tmp_path)
    (tmp_path / "x.json").write_text('[1, 2]')
    with pytest.raises(ValueError, match=r"x\.json: expected a JSON object"):
        load_agentic(tmp_path)
    _write(tmp_path, "x", [])
    with pytest.raises(ValueError, match="no requests"):
        load_agentic(tmp_path)


@pytest.mark.parametrize("kwargs,match", [
    ({"arrival_rate": 0}, "arrival_rate must be a finite positive number"),
    ({"arrival_rate": -1.0}, "arrival_rate"), ({"arrival_rate": float("nan")}, "arrival_rate"),
    ({"arrival_rate": float("inf")}, "arrival_rate"), ({"arrival_rate": "1"}, "arrival_rate"),
    ({"arrival_rate": True}, "arrival_rate"),
    ({"block_tokens": 100}, "block_tokens must be a positive multiple of 64"), ({"block_tokens": 0}, "block_tokens"),
    ({"block_tokens": 32}, "block_tokens"), ({"block_tokens": 512.0}, "block_tokens"),
    ({"block_tokens": -512}, "block_tokens"),
    ({"limit": 0}, "limit must be a positive int"), ({"limit": 1.5}, "limit"), ({"limit": True}, "limit"),
    ({"seed": -1}, "seed must be an int >= 0"), ({"seed": 1.0}, "seed"),
    ({"coarsen": "middle"}, "coarsen must be one of first, last"),
    ({"path": 12}, "path must be"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    _write(tmp_path, "c", [_req(0.0, [1])])
    kwargs.setdefault("path", tmp_path)
    with pytest.raises(ValueError, match=match):
        load_agentic(**kwargs)


def test_missing_traces_name_the_path_and_the_source(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.tgz.*callanjfox/kv-cache-tester"):
        load_agentic(tmp_path / "nope.tgz")
    with pytest.raises(FileNotFoundError, match="no trace files"):
        load_agentic(tmp_path)
    (tmp_path / "junk.tgz").write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="junk.tgz"):
        load_agentic(tmp_path / "junk.tgz")


def test_small_archive_with_and_without_limit(tmp_path):
    folder = tmp_path / "unpacked" / "traces"
    for name, ids in (("trace_0010", [5, 6]), ("trace_0002", [1]), ("trace_0003", [7, 8, 9])):
        _write(folder, name, [_req(0.0, ids), _req(3.0, ids + [99])])
    with tarfile.open(tmp_path / "t.tgz", "w:gz") as tar:
        tar.add(folder, arcname="traces")
    whole = load_agentic(tmp_path / "t.tgz", block_tokens=64)
    assert _rows(whole) == _rows(load_agentic(folder.parent, block_tokens=64))
    assert [r.meta["conversation"] for r in whole if r.turn == 0 and r.session_id == 0] == ["trace_0002"]
    two = load_agentic(tmp_path / "t.tgz", block_tokens=64, limit=2)
    assert sorted({r.meta["conversation"] for r in two}) == ["trace_0002", "trace_0003"]
    assert _rows(two) == _rows(load_agentic(folder.parent, block_tokens=64, limit=2))
