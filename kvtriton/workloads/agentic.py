"""Loader for the agentic coding traces (``claude_code_traces.tgz``: one JSON conversation a file).

The traces come from the repository https://github.com/callanjfox/kv-cache-tester, folder ``traces/``
(Apache-2.0): anonymised coding-agent conversations whose prompts are given as 64-token blocks of
prefix-chained hash ids, scoped to their conversation. The project does not ship them; read the archive
in place (``tarfile`` streams it) or an unpacked folder.

File layout (one conversation a file): ``id``, ``block_size`` (64), ``tool_tokens``, ``system_tokens``
and ``requests``, in order. A request has ``t`` (seconds from the conversation's start), ``type`` (``n``
or ``s``), ``in`` / ``out`` (tokens), ``hash_ids``, ``stop`` (``tool_use``, ``end_turn``, empty or
missing), ``api_time`` and ``think_time``. A ``type: subagent`` entry is a sub-agent run: ``agent_id``,
``duration_ms``, its own ``tool_tokens`` / ``system_tokens`` and its own ``requests`` (``t`` counted from
the sub-agent's own start), sharing the conversation's hash namespace. See :func:`load_agentic`.
"""

from __future__ import annotations

import gzip
import heapq
import json
import os
import tarfile
import zlib
from pathlib import Path

import numpy as np

from ..checks import check_int, check_number, is_int
from .request import Request

NATIVE_BLOCK_TOKENS = 64      # the traces hash prompts in blocks of 64 tokens
ENTRY_TYPES = ("n", "s", "subagent")
UPSTREAM = "https://github.com/callanjfox/kv-cache-tester (folder traces/)"


# ------------------------------------------------------------------------------------------- reading

def _member_key(name: str):
    """Sort key of a trace file: its base name (``trace_0001.json``), then its full path."""
    return (name.rsplit("/", 1)[-1], name)


def _read_sources(path: Path, limit: int | None, handle) -> list:
    """``handle(label, raw bytes)`` of each trace file of ``path`` (a ``.tgz``/``.tar`` archive, read in
    place, a folder, or one ``.json`` file), the first ``limit`` by file name (all when None), in
    file-name order. Without a limit each file is handled as it is read, so that only one file's text is
    held at a time."""
    if path.is_dir():
        files = sorted((p for p in (path / "traces").glob("*.json")), key=lambda p: _member_key(p.name))
        if not files:
            files = sorted(path.glob("*.json"), key=lambda p: _member_key(p.name))
        if not files:
            raise FileNotFoundError(f"{path}: no trace files (neither traces/*.json nor *.json); get the "
                                    f"agentic traces from {UPSTREAM}")
        return [handle(str(p), p.read_bytes()) for p in files[:limit]]
    if path.suffix == ".json":                     # a single conversation
        return [handle(str(path), path.read_bytes())]
    try:
        tar = tarfile.open(path, "r:*")
    except tarfile.TarError as e:
        raise ValueError(f"path: {path} is neither a folder nor a readable tar archive ({e})") from None
    try:
        with tar:
            kept = _stream_members(tar, limit, lambda name, raw: handle(f"{path}:{name}", raw))
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: the archive is damaged ({type(e).__name__}: {e})") from None
    if not kept:
        raise ValueError(f"{path}: the archive holds no trace files (*.json)")
    kept.sort(key=lambda x: x[0].key)
    return [item if limit is None else handle(f"{path}:{name}", item) for _, name, item in kept]


def _stream_members(tar, limit, handle):
    """One pass over ``tar``: ``[(key, name, item)]`` of its ``*.json`` files, ``item`` = ``handle(name,
    bytes)`` when ``limit`` is None, else the bytes of the ``limit`` first files by name (a heap that keeps
    the largest kept name on top)."""
    kept: list = []
    for m in tar:
        if not (m.isfile() and m.name.endswith(".json")) or "/._" in "/" + m.name:
            continue
        key = _member_key(m.name)
        if limit is None:
            kept.append((_Reversed(key), m.name, handle(m.name, tar.extractfile(m).read())))
            continue
        if len(kept) >= limit and key >= kept[0][0].key:
            continue
        item = (_Reversed(key), m.name, tar.extractfile(m).read())
        if len(kept) >= limit:
            heapq.heapreplace(kept, item)
        else:
            heapq.heappush(kept, item)
    return kept


class _Reversed:
    """A sort key in reverse order: ``heapq`` then keeps the largest of the kept names on top."""

    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key

    def __lt__(self, other):
        return self.key > other.key

    def __eq__(self, other):
        return self.key == other.key


def _parse(raw: bytes, where: str):
    """The file's JSON object, or ValueError naming ``where`` (invalid UTF-8 or JSON). ``NaN`` and
    ``Infinity`` parse as floats: the field checks then refuse them, naming the entry and field."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to parse") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object (one conversation), got {type(obj).__name__}")
    return obj


# ---------------------------------------------------------------------------------------- validation

def _int_field(obj, field, where, minimum):
    v = obj.get(field)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return check_int(f"{where}: {field!r}", v, minimum, allowed=f"an integer >= {minimum}")


def _opt_time(obj, field, where):
    """An optional duration in seconds (``api_time``, ``think_time``): a finite number >= 0, or None."""
    return check_number(f"{where}: {field!r}", obj.get(field), 0, allow_none=True,
                        allowed="a finite number of seconds >= 0, or missing/null")


def _check_ids(ids, length: int, where: str, strict: bool):
    """Check ``hash_ids``: a list of ints in [0, 2**63), at most ceil(length / 64) of them, non-empty unless
    the prompt is shorter than one block; return them as a numpy array. ``strict``: also look for JSON
    booleans among them (numpy would read ``true`` as 1; the caller skips the scan for files without
    ``true``/``false`` in their text)."""
    if not isinstance(ids, list) or (not ids and length >= NATIVE_BLOCK_TOKENS):
        raise ValueError(f"{where}: 'hash_ids' must be a non-empty list of ints >= 0, got "
                         f"{'an empty list' if isinstance(ids, list) else repr(ids)[:80]}")
    if not ids:
        return np.zeros(0, dtype=np.int64)
    try:
        arr = np.asarray(ids)
    except (ValueError, OverflowError):
        arr = np.asarray(ids, dtype=object)
    if arr.ndim != 1 or arr.dtype.kind != "i" or (strict and bool in set(map(type, ids))):
        bad = next((h for h in ids if not is_int(h) or not 0 <= h < 2**63), None)
        raise ValueError(f"{where}: 'hash_ids' must hold ints in [0, 2**63), found {bad!r}")
    if arr.min() < 0:
        raise ValueError(f"{where}: 'hash_ids' must hold ints >= 0, found {int(arr.min())}")
    most = -(-length // NATIVE_BLOCK_TOKENS)
    if len(ids) > most:
        raise ValueError(f"{where}: 'hash_ids' has {len(ids)} blocks but 'in' {length} covers at most "
                         f"ceil({length} / {NATIVE_BLOCK_TOKENS}) = {most}")
    return arr


def _check_request(r, where: str, prev_t: float, strict: bool) -> tuple[dict, int]:
    """Check one prompt request (``type`` n or s); return its fields and its largest hash id."""
    t = check_number(f"{where}: 't'", r.get("t"), 0, allowed="a finite number of seconds >= 0")
    if t < prev_t:
        raise ValueError(f"{where}: 't' goes backwards ({t} after {prev_t})")
    length = _int_field(r, "in", where, 1)
    out = _int_field(r, "out", where, 0)
    ids = _check_ids(r.get("hash_ids"), length, where, strict)
    stop = r.get("stop")
    if stop is not None and not isinstance(stop, str):
        raise ValueError(f"{where}: 'stop' must be a string (tool_use, end_turn, ...), empty or missing, "
                         f"got {stop!r}")
    model = r.get("model")
    rec = {"t": t, "type": r["type"], "in": length, "out": out, "ids": ids, "stop": stop or None,
           "api_time": _opt_time(r, "api_time", where), "think_time": _opt_time(r, "think_time", where),
           "model": model if isinstance(model, str) else None}
    return rec, int(ids.max()) if len(ids) else -1


def _prompt_tokens(obj, where: str, required: bool):
    """``(tool_tokens, system_tokens)`` of a conversation or sub-agent (None when absent and not required)."""
    if not required and obj.get("tool_tokens") is None and obj.get("system_tokens") is None:
        return None
    return (_int_field(obj, "tool_tokens", where, 0), _int_field(obj, "system_tokens", where, 0))


def _check_subagent(e, where: str, prev_t: float, strict: bool) -> tuple[dict, int]:
    """Check a ``subagent`` entry and its nested requests; return its fields and its largest hash id (its
    ``tool_tokens`` / ``system_tokens`` are optional: without them it shares its conversation's)."""
    t = check_number(f"{where}: 't'", e.get("t"), 0, allowed="a finite number of seconds >= 0")
    if t < prev_t:
        raise ValueError(f"{where}: 't' goes backwards ({t} after {prev_t})")
    dur = check_number(f"{where}: 'duration_ms'", e.get("duration_ms"), 0, allow_none=True,
                       allowed="a finite number of ms >= 0, or missing/null")
    agent = e.get("agent_id")
    if agent is not None and not isinstance(agent, str):
        raise ValueError(f"{where}: 'agent_id' must be a string or missing, got {agent!r}")
    nested = e.get("requests")
    if not isinstance(nested, list):
        raise ValueError(f"{where}: 'requests' must be a list (the sub-agent's requests), got "
                         f"{type(nested).__name__}")
    reqs, top, last = [], -1, 0.0
    for j, r in enumerate(nested):
        w = f"{where}.requests[{j}]"
        if not isinstance(r, dict):
            raise ValueError(f"{w}: expected a JSON object, got {type(r).__name__}")
        if r.get("type") not in ("n", "s"):
            raise ValueError(f"{w}: 'type' must be one of n, s inside a sub-agent, got {r.get('type')!r}")
        rec, m = _check_request(r, w, last, strict)
        reqs.append(rec)
        top, last = max(top, m), rec["t"]
    start = t - dur / 1000.0 if dur is not None else t
    sub_type = e.get("subagent_type")
    return {"t": t, "type": "subagent", "start": max(0.0, start), "agent_id": agent, "requests": reqs,
            "subagent_type": sub_type if isinstance(sub_type, str) else None,
            "prompt": _prompt_tokens(e, where, False)}, top


def _conversation(obj, where: str, need_prompt: bool, strict: bool = True) -> dict:
    """Check one conversation file; return ``{"name", "prompt", "entries", "top"}`` (``need_prompt``: its
    ``tool_tokens`` and ``system_tokens`` are required; ``strict``: see ``_check_ids``)."""
    bs = obj.get("block_size", NATIVE_BLOCK_TOKENS)
    if bs != NATIVE_BLOCK_TOKENS:
        raise ValueError(f"{where}: 'block_size' must be {NATIVE_BLOCK_TOKENS} (the traces' block), got {bs!r}")
    entries = obj.get("requests")
    if not isinstance(entries, list):
        raise ValueError(f"{where}: 'requests' must be a list, got {type(entries).__name__}")
    out, top, last = [], -1, 0.0
    for i, e in enumerate(entries):
        w = f"{where}: requests[{i}]"
        if not isinstance(e, dict):
            raise ValueError(f"{w}: expected a JSON object, got {type(e).__name__}")
        kind = e.get("type")
        if kind not in ENTRY_TYPES:
            raise ValueError(f"{w}: 'type' must be one of {', '.join(ENTRY_TYPES)}, got {kind!r}")
        rec, m = (_check_subagent(e, w, last, strict) if kind == "subagent"
                  else _check_request(e, w, last, strict))
        out.append(rec)
        top, last = max(top, m), rec["t"]
    cid = obj.get("id")
    return {"name": cid if isinstance(cid, str) else where.rsplit("/", 1)[-1].removesuffix(".json"),
            "prompt": _prompt_tokens(obj, where, need_prompt), "entries": out, "top": top}


# ------------------------------------------------------------------------------------------ building

COARSEN_RULES = ("first", "last")
# ``"first"`` (``ids[::k]``) reproduces an independent prefix-cache study of these traces (512-token blocks
# "keeping every eighth chained id": 11.75M references, 423,981 distinct blocks, an unlimited cache's hit
# rate 0.964); ``"last"`` gives 465,789 distinct blocks and 0.960 (see ``load_agentic``).
DEFAULT_COARSEN = "first"


def coarsen_ids(ids, k: int, rule: str = DEFAULT_COARSEN):
    """Native 64-token block ids (a list or a 1-d numpy array) -> ids of blocks of ``k`` native blocks
    (the same type).

    ``"last"``: a coarse block is named by the chained id of its last native block (positions k-1, 2k-1,
    ...), and a final partial group by the last native id. ``"first"``: by its first native block
    (``ids[::k]``). Both give ceil(len(ids) / k) ids."""
    if k == 1:
        return ids
    if rule == "first":
        return ids[::k]
    out = ids[k - 1::k]
    if len(ids) % k:
        out = np.append(out, ids[-1:]) if isinstance(ids, np.ndarray) else out + ids[-1:]
    return out


class _Builder:
    """Turns checked conversations into ``Request`` records (global ids, arrival times, shared prefixes)."""

    def __init__(self, block_tokens, shared_prefix, subagents, label):
        self.block_tokens, self.label = block_tokens, label
        self.shared_prefix, self.subagents = shared_prefix, subagents
        self.offset = 0               # the next conversation's namespace offset
        self.prompts: dict = {}       # (tool_tokens, system_tokens) -> its shared prefix ids
        self.requests: list[Request] = []
        self.launchers: list = []     # (sub-agent request, the main request that launched it)

    def _ids(self, ids, to_global, prompt) -> tuple:
        g = list(map(to_global, ids.tolist()))
        if self.shared_prefix and prompt is not None:
            n = min(len(g), self._shared_count(prompt))
            g[:n] = self.prompts[prompt][:n]
        return tuple(g)

    def _shared_count(self, prompt) -> int:
        return (prompt[0] + prompt[1]) // self.block_tokens

    def _request(self, rec, arrival, table, prompt, ci, turn, meta) -> Request:
        meta.update(type=rec["type"], think_time=rec["think_time"], api_time=rec["api_time"],
                    model=rec["model"], arrival=self.label)
        r = Request(request_id=-1, arrival_s=arrival, input_length=rec["in"], output_length=rec["out"],
                    hash_ids=self._ids(rec["ids"], table, prompt), block_tokens=self.block_tokens,
                    session_id=ci, turn=turn, stop_reason=rec["stop"], meta=meta)
        self.requests.append(r)
        return r

    def add(self, conv: dict, ci: int, start: float) -> None:
        """Add conversation number ``ci`` (checked by ``_conversation``) starting at ``start`` seconds."""
        size = conv["top"] + 1
        # one int object per id of the namespace, shared by every request that holds it (much less memory
        # than an int per reference); ids too sparse for a table are added to the offset one by one
        table = (list(range(self.offset, self.offset + size)).__getitem__ if size <= 4 * conv["refs"] + 4096
                 else self.offset.__add__)
        self.offset += size
        turn, launcher = 0, None
        for e in conv["entries"]:
            if e["type"] != "subagent":
                meta = {"conversation": conv["name"], "agent_id": None, "subagent_type": None}
                launcher = self._request(e, start + e["t"], table, conv["prompt"], ci, turn, meta)
                turn += 1
            elif self.subagents:
                prompt = e["prompt"] if e["prompt"] is not None else conv["prompt"]
                for j, rec in enumerate(e["requests"]):
                    meta = {"conversation": conv["name"], "agent_id": e["agent_id"],
                            "subagent_type": e["subagent_type"]}
                    r = self._request(rec, start + e["start"] + rec["t"], table, prompt, ci, j, meta)
                    self.launchers.append((r, launcher))

    def allocate_prompts(self, convs) -> None:
        """Give every (tool_tokens, system_tokens) pair its shared prefix ids, in order of first use, above
        all conversations' namespaces (``convs``: all the conversations of the load)."""
        base = sum(c["top"] + 1 for c in convs)
        for c in convs:
            pairs = [c["prompt"]] + [e["prompt"] for e in c["entries"]
                                     if self.subagents and e["type"] == "subagent"]
            for p in pairs:
                if p is not None and p not in self.prompts:
                    n = self._shared_count(p)
                    self.prompts[p] = list(range(base, base + n))
                    base += n

    def finish(self) -> list[Request]:
        """The records sorted by arrival (stable), numbered, with sub-agents' ``parent_id`` set."""
        reqs = self.requests
        reqs.sort(key=lambda r: r.arrival_s)
        for i, r in enumerate(reqs):
            r.request_id = i
        for r, launcher in self.launchers:
            r.parent_id = launcher.request_id if launcher is not None else None
        return reqs


def _compact(conv: dict, k: int, rule: str) -> dict:
    """Replace every request's native ``hash_ids`` (JSON lists) by its coarse ids as a numpy array (a
    fraction of the memory of Python ints; the JSON object can then be dropped)."""
    dtype = np.int32 if conv["top"] < 2**31 else np.int64
    conv["refs"] = 0
    for e in conv["entries"]:
        for rec in (e["requests"] if e["type"] == "subagent" else (e,)):
            conv["refs"] += len(rec["ids"])
            rec["ids"] = coarsen_ids(rec["ids"], k, rule).astype(dtype)
    return conv


# -------------------------------------------------------------------------------------------- loading

def arrival_description(arrival_rate: float, seed: int) -> str:
    """The arrival process of a load, in words (every request's ``meta["arrival"]``)."""
    return (f"Poisson conversation starts: rate {arrival_rate:g}/s (exponential gaps, mean {1 / arrival_rate:g} s, "
            f"numpy.random.default_rng({seed})), first start after one gap; each request at its "
            f"conversation's start + t")


def conversation_starts(n: int, arrival_rate: float, seed: int) -> list[float]:
    """Start times (s) of ``n`` conversations: ``cumsum(default_rng(seed).exponential(1 / arrival_rate, n))``
    (the first ``m`` starts do not depend on ``n``)."""
    gaps = np.random.default_rng(seed).exponential(1.0 / arrival_rate, n)
    return np.cumsum(gaps).tolist()


def _check_args(arrival_rate, seed, block_tokens, coarsen, limit):
    rate = check_number("arrival_rate", arrival_rate, positive=True,
                        allowed="a finite positive number (conversations per second)")
    seed = check_int("seed", seed, 0, allowed="an int >= 0")
    if not is_int(block_tokens) or block_tokens < 1 or block_tokens % NATIVE_BLOCK_TOKENS:
        raise ValueError(f"block_tokens must be a positive multiple of {NATIVE_BLOCK_TOKENS} (64 native, or "
                         f"e.g. 512 for coarser blocks), got {block_tokens!r}")
    if coarsen not in COARSEN_RULES:
        raise ValueError(f"coarsen must be one of {', '.join(COARSEN_RULES)}, got {coarsen!r}")
    limit = check_int("limit", limit, 1, allow_none=True, allowed="a positive int (conversations) or None")
    return rate, seed, int(block_tokens), limit


def _resolve(path) -> Path:
    if path is None:
        from .paths import agentic_trace_path
        path = agentic_trace_path()
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a .tgz archive or a folder of trace files (a str or path), got {path!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"agentic traces not found at {path}: get claude_code_traces.tgz (or the "
                                f"traces/ folder) from {UPSTREAM} and pass its path, or set "
                                f"$KVTRITON_AGENTIC_TRACES")
    return path


def load_agentic(path=None, *, arrival_rate: float = 0.1, seed: int = 0, block_tokens: int = 512,
                 coarsen: str = DEFAULT_COARSEN, shared_prefix: bool = False, subagents: bool = False,
                 limit: int | None = None, progress: bool = False) -> list[Request]:
    """Read the agentic coding traces into ``Request`` records sorted by arrival time.

    ``path``: ``claude_code_traces.tgz`` (read in place), a folder holding ``traces/*.json`` or ``*.json``,
    or one conversation's ``.json`` file; default :func:`kvtriton.workloads.paths.agentic_trace_path`.
    Conversations are taken in file-name order; ``limit``: the first N of them.

    Hash ids. Conversation c (0-based, in file-name order) owns ids ``[offset_c, offset_c + top_c]``, where
    ``top_c`` is its largest local id (main and sub-agent requests) and ``offset_c`` is the sum of
    ``top + 1`` over the earlier conversations: global id = ``offset_c`` + local id (dense, >= 0, the same
    whatever ``block_tokens``, ``subagents`` and ``limit``). Sub-agent requests use their conversation's
    namespace. ``block_tokens`` (a multiple of 64) coarsens k = block_tokens / 64 native blocks into one,
    giving ceil(n / k) ids for n native ones: ``coarsen="first"`` (the default) keeps every k-th chained id
    from position 0 (``ids[::k]``: a coarse block is named by its first native block, the final partial
    group included); ``"last"`` names it by its last native block (positions k-1, 2k-1, ..., and a final
    partial group by the last native id). At 512 tokens, with Poisson starts at 0.1/s (seed 0) and main
    requests only, ``"first"`` gives 11.75M references to 423,981 distinct blocks over 82.5 hours and an
    unlimited cache's prefix hit rate 0.964 (as an independent study of these traces), ``"last"`` 465,789
    distinct blocks and 0.960.
    ``shared_prefix``: the first floor((tool_tokens + system_tokens) / block_tokens) blocks of every request
    take ids shared by all conversations (and sub-agents) with the same (tool_tokens, system_tokens) pair
    (the common tools and system prompt), numbered above every conversation's namespace in order of first
    use.

    Arrivals. Conversation c starts at ``S_c = G_0 + ... + G_c`` with ``G = numpy.random.default_rng(seed)
    .exponential(1 / arrival_rate, N)`` (Poisson starts at ``arrival_rate`` per second); its requests
    arrive at ``S_c + t``. ``subagents``: add sub-agent requests, at ``S_c + start + t`` where the nested
    ``t`` counts from the sub-agent's start and ``start`` = the entry's ``t`` (when the run completed) -
    ``duration_ms`` / 1000 (just after the main request that launched it), or the entry's ``t`` when
    ``duration_ms`` is missing (runs launched asynchronously). The result is sorted by ``arrival_s``
    (stable: ties keep conversation, then file order); ``request_id`` = position; every request's
    ``meta["arrival"]`` says this in words.

    Records: ``input_length`` = ``in``, ``output_length`` = ``out``, ``hash_ids``, ``block_tokens``,
    ``session_id`` = c, ``turn`` (0-based among the conversation's main requests, or within the sub-agent
    run), ``stop_reason`` (``tool_use``, ``end_turn``..., None when empty or missing), ``parent_id`` (sub-agent
    requests: the ``request_id`` of the main request that launched the run, the last one before its entry)
    and ``meta`` (``conversation`` file id, ``type`` n/s, ``think_time``, ``api_time``, ``model``, ``agent_id``
    (None for main requests), ``subagent_type``, ``arrival``). The traces hash whole 64-token blocks only: every
    request of the published archive has floor(in / 64) native ids, one fewer than ceil(in / 64) when ``in``
    is not a multiple of 64 (98.6% of them). Any count up to ceil(in / 64) is accepted and replayed as given
    (``input_length`` stays ``in``); more ids than that, or none for a prompt of 64 tokens or more, is
    refused. Structural faults (a non-list ``requests``; a missing, negative or non-integer
    ``in``/``out``/``hash_ids`` entry; a non-finite, negative or decreasing ``t``; an unknown ``type``; a
    non-string ``stop``; more ids than tokens) raise ValueError naming the file (``archive:member``), the
    entry (``requests[i]``, ``requests[i].requests[j]`` inside a sub-agent) and the field.
    """
    rate, seed, block_tokens, limit = _check_args(arrival_rate, seed, block_tokens, coarsen, limit)
    path = _resolve(path)
    k = block_tokens // NATIVE_BLOCK_TOKENS
    bar = _bar() if progress else None

    def handle(label, raw):
        strict = b"true" in raw or b"false" in raw   # JSON booleans anywhere: scan the ids for them
        conv = _compact(_conversation(_parse(raw, label), label, shared_prefix, strict), k, coarsen)
        if bar is not None:
            bar.update(1)
        return conv

    convs = _read_sources(path, limit, handle)
    if bar is not None:
        bar.close()
    builder = _Builder(block_tokens, shared_prefix, subagents, arrival_description(rate, seed))
    if shared_prefix:
        builder.allocate_prompts(convs)
    for ci, start in enumerate(conversation_starts(len(convs), rate, seed)):
        builder.add(convs[ci], ci, start)
        convs[ci] = None
    if not builder.requests:
        raise ValueError(f"{path}: the traces hold no requests")
    return builder.finish()


def _bar():
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the project's dependencies
        return None
    return tqdm(desc="agentic traces", unit="conv")
