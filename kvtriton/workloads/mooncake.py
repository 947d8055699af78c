"""Loader for Mooncake JSONL request traces.

The public traces (``conversation_trace.jsonl``, ``synthetic_trace.jsonl``, ...) come from the Mooncake
repository, https://github.com/kvcache-ai/Mooncake, folder ``FAST25-release/traces/``. Download them
there and pass their path; the project does not ship them.
"""

from __future__ import annotations

import json
import os

from ..checks import check_int, check_number, is_int
from .request import Request

BLOCK_TOKENS = 512  # Mooncake hashes prompts in blocks of 512 tokens


def _int(obj, field, where, minimum):
    v = obj.get(field)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return check_int(f"{where}: {field!r}", v, minimum, allowed=f"an integer >= {minimum}")


def _parse_line(raw: bytes, where: str):
    """One line's JSON object, or ValueError naming ``where``: invalid UTF-8, invalid JSON, non-finite
    numbers (``Infinity``, ``NaN``) and nesting too deep to parse are all refused."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None

    def refuse_constant(name):
        raise ValueError(f"{where}: non-finite number {name} is not allowed")

    try:
        return json.loads(text, parse_constant=refuse_constant)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to parse") from None


def _request(obj, where: str, request_id: int, lineno: int) -> Request:
    """Check one parsed line's fields and build its ``Request`` (ValueError naming ``where``)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    ts = obj.get("timestamp")
    check_number(f"{where}: 'timestamp'", ts, 0, allowed="a finite number of ms >= 0")
    input_length = _int(obj, "input_length", where, 1)
    output_length = _int(obj, "output_length", where, 0)
    ids = obj.get("hash_ids")
    if not isinstance(ids, list) or not ids:
        raise ValueError(f"{where}: 'hash_ids' must be a non-empty list of ints, got {ids!r}")
    for h in ids:
        if not is_int(h):
            raise ValueError(f"{where}: 'hash_ids' must hold ints, found {h!r}")
    expected = -(-input_length // BLOCK_TOKENS)
    if len(ids) != expected:
        raise ValueError(f"{where}: 'hash_ids' has {len(ids)} blocks but 'input_length' {input_length} needs "
                         f"ceil({input_length} / {BLOCK_TOKENS}) = {expected}")
    return Request(request_id=request_id, arrival_s=ts / 1000.0, input_length=input_length,
                   output_length=output_length, hash_ids=tuple(ids), block_tokens=BLOCK_TOKENS,
                   meta={"line": lineno})


def load_mooncake(path, limit: int | None = None) -> list[Request]:
    """Read a Mooncake JSONL trace into ``Request`` records, in file order.

    Each line is an object with ``timestamp`` (ms from the trace start, finite, becomes ``arrival_s`` in
    seconds), ``input_length`` and ``output_length`` (tokens) and ``hash_ids`` (the prompt's 512-token
    blocks as prefix-chained hash ids, becomes a tuple; exactly ``ceil(input_length / 512)`` of them).
    Blank lines are skipped. ``limit``: read at most this many requests. A malformed line (invalid
    UTF-8 or JSON, a missing, non-finite or out-of-range field, hash ids that contradict the length)
    raises ValueError naming the file and line, and nothing is returned; a trace with no requests
    raises ValueError.
    """
    check_int("limit", limit, 1, allow_none=True, allowed="a positive int or None")
    path = os.fspath(path)
    out: list[Request] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not raw.strip():
                continue
            where = f"{path}, line {lineno}"
            out.append(_request(_parse_line(raw, where), where, len(out), lineno))
    if not out:
        raise ValueError(f"{path}: the trace has no requests")
    return out
