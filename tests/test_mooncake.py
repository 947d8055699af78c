"""Mooncake JSONL loader: fields, limits, and malformed input naming the file and line."""

import json

import pytest

from kvtriton.workloads.mooncake import load_mooncake
from kvtriton.workloads.request import Request


def write(tmp_path, lines, name="t.jsonl"):
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines))
    return p


GOOD = [json.dumps({"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [0, 1]}),
        json.dumps({"timestamp": 1500, "input_length": 512, "output_length": 0, "hash_ids": [0]})]


def test_fields(tmp_path):
    reqs = load_mooncake(write(tmp_path, GOOD + [""]))
    assert len(reqs) == 2 and all(isinstance(r, Request) for r in reqs)
    a, b = reqs
    assert (a.request_id, a.arrival_s, a.input_length, a.output_length, a.hash_ids, a.block_tokens) == \
        (0, 0.0, 600, 5, (0, 1), 512)
    assert (b.request_id, b.arrival_s, b.hash_ids) == (1, 1.5, (0,))
    assert len(load_mooncake(write(tmp_path, GOOD), limit=1)) == 1


@pytest.mark.parametrize("bad, match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"input_length": 5, "output_length": 1, "hash_ids": [1]}), "timestamp"),
    (json.dumps({"timestamp": -1, "input_length": 5, "output_length": 1, "hash_ids": [1]}), "timestamp"),
    (json.dumps({"timestamp": 0, "input_length": 0, "output_length": 1, "hash_ids": [1]}), "input_length"),
    (json.dumps({"timestamp": 0, "input_length": 5, "output_length": -2, "hash_ids": [1]}), "output_length"),
    (json.dumps({"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": []}), "hash_ids"),
    (json.dumps({"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1, "x"]}), "hash_ids"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, match):
    p = write(tmp_path, GOOD + [bad])
    with pytest.raises(ValueError, match=match) as e:
        load_mooncake(p)
    assert str(p) in str(e.value) and "line 3" in str(e.value)


def test_empty_trace_and_bad_limit(tmp_path):
    with pytest.raises(ValueError, match="no requests"):
        load_mooncake(write(tmp_path, ["", "  "]))
    with pytest.raises(ValueError, match="limit"):
        load_mooncake(write(tmp_path, GOOD), limit=0)
    with pytest.raises(FileNotFoundError):
        load_mooncake(tmp_path / "missing.jsonl")


def test_public_trace(traces_dir):
    reqs = load_mooncake(traces_dir / "conversation_trace.jsonl", limit=2000)
    assert len(reqs) == 2000
    assert reqs[0].arrival_s == 0.0 and reqs[0].hash_ids[0] == 0
    assert all(r.num_blocks == -(-r.input_length // 512) for r in reqs)
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(reqs, reqs[1:]))


@pytest.mark.parametrize("raw, match", [
    (b'{"timestamp": Infinity, "input_length": 5, "output_length": 1, "hash_ids": [1]}', "Infinity"),
    (b'{"timestamp": NaN, "input_length": 5, "output_length": 1, "hash_ids": [1]}', "NaN"),
    (b'{"timestamp": 1e999, "input_length": 5, "output_length": 1, "hash_ids": [1]}', "timestamp"),
    (b'{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1], "x": "\xff\xfe"}', "UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    # 10 tokens are one 512-token block, not nine
    (b'{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1,2,3,4,5,6,7,8,9]}', "needs"),
    (b'{"timestamp": 0, "input_length": 1025, "output_length": 1, "hash_ids": [1, 2]}', "needs"),
])
def test_bad_bytes_and_values_name_file_and_line(tmp_path, raw, match):
    """Non-finite numbers, invalid UTF-8, deep nesting and lengths that contradict the hash ids are
    ValueErrors naming the file and line, never a bare UnicodeDecodeError or RecursionError."""
    p = tmp_path / "t.jsonl"
    p.write_bytes(("\n".join(GOOD) + "\n").encode() + raw + b"\n")
    with pytest.raises(ValueError, match=match) as e:
        load_mooncake(p)
    assert str(p) in str(e.value) and "line 3" in str(e.value)


def test_unknown_workload_parameter_lists_valid_ones():
    from kvtriton.workloads import make_workload
    with pytest.raises(ValueError, match="num_requestz.*valid parameters: num_requests"):
        make_workload("zipf", num_requestz=3)


def test_trace_folder_rule(tmp_path, monkeypatch):
    """One rule for every caller: $KVTRITON_TRACES, else shared/traces/mooncake beside the project."""
    from kvtriton.workloads import default_traces_dir, mooncake_trace_path
    monkeypatch.setenv("KVTRITON_TRACES", str(tmp_path))
    assert mooncake_trace_path("mooncake-synthetic") == tmp_path / "synthetic_trace.jsonl"
    monkeypatch.delenv("KVTRITON_TRACES")
    monkeypatch.chdir(tmp_path)                     # no ../shared here: the checkout's neighbour is used
    assert default_traces_dir().parts[-3:] == ("shared", "traces", "mooncake")
    with pytest.raises(ValueError, match="valid: mooncake_conversation, mooncake_synthetic"):
        mooncake_trace_path("agentic")
