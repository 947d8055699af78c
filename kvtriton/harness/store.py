"""The local results store: one directory per run, written atomically, and a loader over many runs.

A run directory (Hydra's output directory) holds, in the order they are written:

- ``config.json``: the resolved config, its hash and the overrides, written when the run starts;
- ``result.json``: config, hash and metrics (and ``tables``: small result tables such as a benchmark's
  rows), written when the run has finished;
- ``timeseries.json`` or ``timeseries.parquet``: the per-step time series, where the run has one;
- ``COMPLETE``: the marker, written last, holding the config hash.
- ``OWNER``: the run that owns the directory (``run_id``, host, pid, config hash, state), created first.

Every file is written to a temporary name and renamed into place, so a run killed at any point leaves
no ``COMPLETE`` (the loader ignores such directories) and no truncated file under a final name. Files
get the permissions of the process's umask (0644 under umask 022), as ``open`` would give them.

One run per directory: ``RunStore.begin`` claims the directory by creating ``OWNER`` exclusively and
holding an exclusive lock on it (``flock``) until the run ends; a second run that finds it locked (or,
where a filesystem has no locks, owned by a live process of a run that has not ended) stops with
``RunDirBusy`` before writing anything. A directory that holds the complete results of another
configuration is not taken over either. ``finish`` and ``adopt`` check that ``OWNER`` still names this
run before writing, so a run never finishes into a directory another run has claimed.

Skipping completed runs: a completed run also writes ``<index_dir>/<config hash>.json`` pointing at its
directory. A later run with the same hash finds it there, checks that directory's ``COMPLETE`` still
holds the hash, and copies its results instead of running again (``result.json`` then names the source
in ``reused_from``).
"""

from __future__ import annotations

import datetime as _dt
import enum
import errno
import hashlib
import json
import math
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any, Iterable, Mapping

SCHEMA_VERSION = 2  # 2: metrics carry block_tokens and capacity_tokens; the policy's registered name
MARKER = "COMPLETE"
CONFIG_FILE = "config.json"
RESULT_FILE = "result.json"
SERIES_JSON = "timeseries.json"
SERIES_PARQUET = "timeseries.parquet"
OWNER_FILE = "OWNER"

# Keys that do not change what a run computes: where it logs, how it reports, how results are kept.
NON_SEMANTIC_KEYS = ("logger", "telemetry", "results", "replay.progress", "bench.timeout_s")


def _jsonable(x):
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy / torch scalars
        try:
            return _jsonable(x.item())
        except Exception:
            pass
    if isinstance(x, enum.Enum):
        return _jsonable(x.value)
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None if math.isnan(x) else (1e308 if x > 0 else -1e308)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def config_hash(resolved: Mapping[str, Any], runtime: Mapping[str, Any] | None = None) -> str:
    """SHA-256 (first 16 hex digits) of the resolved config without ``NON_SEMANTIC_KEYS``, and of
    ``runtime`` (what the config resolved to on this machine: device, ops backend; see
    ``adapters.runtime_key``) where given, so that a run is only reused on the same device and backend."""
    cfg = json.loads(json.dumps(_jsonable(resolved)))
    for key in NON_SEMANTIC_KEYS:
        node, *rest = key.split(".")
        if not rest:
            cfg.pop(node, None)
        elif isinstance(cfg.get(node), dict):
            cfg[node].pop(rest[0], None)
    if runtime is not None:
        cfg = {"config": cfg, "runtime": _jsonable(dict(runtime))}
    blob = json.dumps(cfg, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _tmp_name(path: Path) -> Path:
    """A fresh hidden name beside ``path`` (unique per writer, so concurrent writers never share one)."""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _replace_via_tmp(path: Path, fill) -> None:
    """``fill(tmp)`` writes a fresh temporary file beside ``path``, which then replaces ``path`` in one
    rename; on any failure the temporary file is removed and ``path`` is untouched."""
    tmp = _tmp_name(path)
    try:
        fill(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename.

    The file is created with mode 0666 less the umask, like ``open(path, "w")`` (``tempfile.mkstemp``
    would make it 0600, unreadable to the rest of a team on a shared filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def fill(tmp):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    _replace_via_tmp(path, fill)


def _atomic_copy(src: Path, dst: Path) -> None:
    _replace_via_tmp(dst, lambda tmp: shutil.copyfile(src, tmp))  # a new file: 0666 less the umask


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=1, sort_keys=False) + "\n")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def is_complete(run_dir: Path, expected_hash: str | None = None) -> bool:
    marker = Path(run_dir) / MARKER
    if not marker.is_file() or not (Path(run_dir) / RESULT_FILE).is_file():
        return False
    return expected_hash is None or marker.read_text().strip() == expected_hash


# ------------------------------------------------------------------------------------- ownership

class RunDirBusy(RuntimeError):
    """The run directory belongs to another run: one that is running, or complete with another config."""


def new_run_id() -> str:
    """A run id unique across hosts and processes: time, host, pid and random bits."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


# flock errors that mean "this filesystem has no locks" (some NFS and Lustre mounts), not "locked"
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parse_owner(data: bytes) -> dict:
    try:
        rec = json.loads(data.decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return rec if isinstance(rec, dict) else {}


def _read_fd(fd: int) -> dict:
    # Read through the descriptor that holds the lock: where flock is emulated with POSIX locks (NFS),
    # closing any other descriptor of the file would drop this process's lock.
    return _parse_owner(os.pread(fd, max(os.fstat(fd).st_size, 1), 0))


def read_owner(run_dir) -> dict | None:
    """The ``OWNER`` record of ``run_dir`` (None where there is none)."""
    try:
        return _parse_owner((Path(run_dir) / OWNER_FILE).read_bytes())
    except FileNotFoundError:
        return None


def _describe(owner: Mapping | None) -> str:
    o = owner or {}
    return (f"run {o.get('run_id', '?')} (pid {o.get('pid', '?')} on {o.get('host', '?')}, started "
            f"{o.get('started', '?')}, {o.get('state', 'starting')})")


def _may_be_running(owner: Mapping) -> bool:
    """Without locks: whether the owner recorded in ``owner`` may still be running."""
    if owner.get("state") in ("finished", "failed"):
        return False
    if owner.get("host") == socket.gethostname():
        return _pid_alive(owner.get("pid"))
    return True  # an unfinished run on another host, or a record still being written


def conflict(run_dir, resolved: Mapping | None = None) -> str | None:
    """Why a new run of ``resolved`` must not start in ``run_dir`` (None: it may), without touching it.

    The run directory is in use by a live process on this host, or holds the complete results of a
    different configuration. (``RunStore.begin`` decides for good, under the lock; this is the early
    check that Hydra's callbacks make before Hydra writes into the directory.)"""
    run_dir = Path(run_dir)
    owner = read_owner(run_dir)
    if owner and owner.get("state") not in ("finished", "failed") and owner.get("host") == socket.gethostname() \
            and owner.get("pid") != os.getpid() and _pid_alive(owner.get("pid")):
        return f"run directory {run_dir} is in use by {_describe(owner)}; give each run its own directory"
    if resolved is not None and is_complete(run_dir):
        try:
            done = read_result(run_dir)
        except (OSError, ValueError):
            return None
        if config_hash(done.get("config", {})) != config_hash(resolved):
            return _complete_message(run_dir, done, resolved)
    return None


def _complete_message(run_dir: Path, done: Mapping, resolved: Mapping | None = None) -> str:
    rt = done.get("runtime") or {}
    same = resolved is not None and config_hash(done.get("config", {})) == config_hash(resolved)
    what = ("the same configuration run on " + (f"{rt.get('device', '?')} with the {rt.get('backend', '?')} ops"
                                                if rt else "an unrecorded device and ops backend (an older harness)")
            if same else "a different configuration")
    return (f"run directory {run_dir} holds the complete results of run {done.get('run_id', '?')} "
            f"(key {done.get('config_hash', '?')}, overrides {' '.join(done.get('overrides', [])) or 'none'}): "
            f"{what}; give this run its own directory, or remove {run_dir} to replace them")


class RunStore:
    """The results of one run in ``run_dir``; see the module docstring for the files and their order.

    ``begin`` claims the directory (``RunDirBusy`` if another run has it); ``finish`` / ``adopt``
    write the results and release it; ``release`` gives it up after a failure."""

    def __init__(self, run_dir, series_format: str = "json", run_id: str | None = None):
        if series_format not in ("json", "parquet"):
            raise ValueError(f"series_format must be 'json' or 'parquet', got {series_format!r}")
        self.run_dir = Path(run_dir)
        self.series_format = series_format
        self.run_id = run_id or new_run_id()
        self.header: dict = {}
        self._fd: int | None = None
        self._started = _now()

    # ---- ownership

    def claim(self, cfg_hash: str, resolved: Mapping | None = None) -> None:
        """Own ``run_dir``: create ``OWNER`` (exclusively) or take over a dead or finished owner's, under
        an exclusive lock held until the run ends. ``RunDirBusy`` where another run owns it or the
        directory holds another configuration's complete results; nothing is written then."""
        if self._fd is not None:
            self._verify()
            self._check_complete(cfg_hash, resolved)
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / OWNER_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            fresh = True
        except FileExistsError:
            fd = os.open(path, os.O_RDWR)
            fresh = False
        try:
            import fcntl

            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunDirBusy(f"run directory {self.run_dir} is in use by {_describe(_read_fd(fd))}; "
                                     f"give each run its own directory") from None
                if e.errno not in _NO_LOCKS:
                    raise
                locked = False
            if not fresh and not locked:
                prev = _read_fd(fd)
                if _may_be_running(prev):
                    raise RunDirBusy(f"run directory {self.run_dir} is in use by {_describe(prev)} (this "
                                     f"filesystem has no file locks; if that run is dead, remove {path})")
            self._check_complete(cfg_hash, resolved)
            self._fd = fd
            self._write_owner("running", cfg_hash)
        except BaseException:
            if self._fd != fd:
                os.close(fd)
            raise

    def _check_complete(self, cfg_hash: str, resolved: Mapping | None = None) -> None:
        if is_complete(self.run_dir) and not is_complete(self.run_dir, cfg_hash):
            try:
                done = read_result(self.run_dir)
            except (OSError, ValueError):
                done = {}
            raise RunDirBusy(_complete_message(self.run_dir, done, resolved))

    def _write_owner(self, state: str, cfg_hash: str | None = None) -> None:
        rec = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
               "config_hash": cfg_hash or self.header.get("config_hash"), "state": state,
               "started": self._started, "updated": _now()}
        data = (json.dumps(rec) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def _verify(self) -> None:
        """Raise ``RunDirBusy`` unless this run still owns ``run_dir``."""
        if self._fd is None:
            raise RunDirBusy(f"run {self.run_id} does not own {self.run_dir} (begin() claims it)")
        try:
            st = os.stat(self.run_dir / OWNER_FILE)
        except FileNotFoundError:
            st = None
        mine = os.fstat(self._fd)
        rec = _read_fd(self._fd) if st is not None and (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev) \
            else (read_owner(self.run_dir) or {})
        if rec.get("run_id") != self.run_id:
            raise RunDirBusy(f"run directory {self.run_dir} is now owned by {_describe(rec)}, not by this run "
                             f"({self.run_id}); this run's results were not written there")

    def release(self, state: str = "failed") -> None:
        """Give the directory up (after a failure: ``state="failed"``); a no-op where it is not held."""
        if self._fd is None:
            return
        try:
            try:
                self._verify()
                self._write_owner(state)
            except (RunDirBusy, OSError):
                pass
        finally:
            os.close(self._fd)  # drops the lock
            self._fd = None

    # ---- results

    def begin(self, resolved: Mapping, cfg_hash: str, overrides: Iterable[str] = (), job: Mapping | None = None,
              runtime: Mapping | None = None):
        """Claim the directory and record the resolved config; drop any earlier ``COMPLETE`` first."""
        self.claim(cfg_hash, resolved)
        (self.run_dir / MARKER).unlink(missing_ok=True)
        self.header = {"schema": SCHEMA_VERSION, "config_hash": cfg_hash, "run_id": self.run_id,
                       "overrides": list(overrides), "job": dict(job or {}), "run_dir": str(self.run_dir.resolve()),
                       "started": _now(), "runtime": _jsonable(dict(runtime or {})), "config": _jsonable(resolved)}
        atomic_write_json(self.run_dir / CONFIG_FILE, self.header)

    def finish(self, metrics: Mapping, series: list[dict] | None = None, tables: Mapping | None = None,
               extra: Mapping | None = None) -> dict:
        """Write the series, then ``result.json``, then the marker (in that order) and return the result.

        ``RunDirBusy`` (and nothing written) where another run has taken the directory over."""
        self._verify()
        if series:
            self._write_series(series)
        result = dict(self.header)
        result.update({"finished": _now(), "metrics": _jsonable(dict(metrics)),
                       "tables": _jsonable(dict(tables or {})),
                       "series_file": self._series_name() if series else None})
        result.update(_jsonable(dict(extra or {})))
        self._verify()
        atomic_write_json(self.run_dir / RESULT_FILE, result)
        atomic_write_text(self.run_dir / MARKER, self.header["config_hash"] + "\n")
        self.release("finished")
        return result

    def adopt(self, source_dir: Path) -> dict:
        """Complete this run with a copy of an earlier complete run's results (same config hash)."""
        self._verify()
        source_dir = Path(source_dir)
        src = json.loads((source_dir / RESULT_FILE).read_text())
        series_name = src.get("series_file")
        if series_name and (source_dir / series_name).is_file():
            _atomic_copy(source_dir / series_name, self.run_dir / series_name)
        result = dict(src)
        result.update({k: self.header[k] for k in ("run_id", "overrides", "job", "run_dir", "started")})
        result["finished"] = _now()
        result["reused_from"] = str(source_dir.resolve())
        self._verify()
        atomic_write_json(self.run_dir / RESULT_FILE, result)
        atomic_write_text(self.run_dir / MARKER, self.header["config_hash"] + "\n")
        self.release("finished")
        return result

    def _series_name(self) -> str:
        return SERIES_PARQUET if self.series_format == "parquet" else SERIES_JSON

    def _write_series(self, series: list[dict]) -> None:
        path = self.run_dir / self._series_name()
        if self.series_format == "parquet":
            import pandas as pd

            _replace_via_tmp(path, lambda tmp: pd.DataFrame(series).to_parquet(tmp, index=False))
        else:
            atomic_write_json(path, {"columns": sorted({k for row in series for k in row}),
                                     "rows": series})


# -------------------------------------------------------------------------------------- skip index

def index_lookup(index_dir, cfg_hash: str) -> Path | None:
    """The directory of a complete earlier run with ``cfg_hash``, or None."""
    entry = Path(index_dir) / f"{cfg_hash}.json"
    if not entry.is_file():
        return None
    try:
        run_dir = Path(json.loads(entry.read_text())["run_dir"])
    except (ValueError, KeyError):
        return None
    return run_dir if is_complete(run_dir, cfg_hash) else None


def index_add(index_dir, cfg_hash: str, run_dir) -> None:
    atomic_write_json(Path(index_dir) / f"{cfg_hash}.json",
                      {"config_hash": cfg_hash, "run_dir": str(Path(run_dir).resolve()), "written": _now()})


# ------------------------------------------------------------------------------------------ loader

def find_runs(paths) -> list[Path]:
    """Complete run directories under ``paths`` (run dirs, multirun dirs or any parent), sorted."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found = set()
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"results path {str(p)!r} does not exist")
        for marker in ([p / MARKER] if (p / MARKER).is_file() else p.rglob(MARKER)):
            if is_complete(marker.parent):
                found.add(marker.parent.resolve())
    return sorted(found)


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def read_result(run_dir) -> dict:
    return json.loads((Path(run_dir) / RESULT_FILE).read_text())


def _canonical_policy(name):
    """The registered name of a policy (results of older runs may carry an alias such as ``adaptive``)."""
    if not isinstance(name, str):
        return name
    try:
        from kvtriton.policies import canonical_name

        return canonical_name(name)
    except (ImportError, ValueError):
        return name


# Shortcut columns that the metrics fill (the configured value where the metrics have none).
_FROM_METRICS = ("block_tokens", "capacity_tokens", "repeats")


def load_results(paths, dedupe: bool = True):
    """One row per complete run under ``paths`` (see ``find_runs``), as a pandas DataFrame.

    Columns: ``run_dir``, ``config_hash``, ``overrides``, the flattened config (``config.policy.name``,
    ...), the metrics (``hit_rate``, ...; a metric named like a shortcut is ``result.<name>``) and the
    shortcuts:

    - ``policy``: the registered name (``arc`` for a run configured as ``adaptive``), ``task``,
      ``workload``, ``mode``, ``model``;
    - ``capacity_blocks`` (configured; for a budget-sized device run, the blocks the budget held),
      ``block_tokens`` (the unit: tokens per block, the workload's blocks in fast mode, the model's
      ``block_size`` in device mode) and ``capacity_tokens`` (their product), so that fast and device
      results compare;
    - ``repeats`` (timings are medians over them, with ``<metric>_min``/``_max``/``_std``);
    - ``backend`` (the ops backend: ``none`` for the fast replay), ``device_type`` (``host`` for the fast
      replay, ``cpu`` or ``cuda``) and ``device_name``; None for results of older harnesses.

    ``dedupe`` keeps one row per config hash (the latest finished), so overlapping sweeps and reruns count
    each configuration once.
    """
    import pandas as pd

    rows = []
    for run_dir in find_runs(paths):
        res = read_result(run_dir)
        cfg = res.get("config", {})
        metrics = res.get("metrics") or {}
        runtime = res.get("runtime") or {}
        row = {"run_dir": str(run_dir), "config_hash": res.get("config_hash"),
               "overrides": " ".join(res.get("overrides", [])), "finished": res.get("finished"),
               "reused": bool(res.get("reused_from")),
               "task": cfg.get("task"), "policy": _canonical_policy((cfg.get("policy") or {}).get("name")),
               "capacity_blocks": (cfg.get("pool") or {}).get("capacity_blocks"),
               "workload": (cfg.get("workload") or {}).get("name"),
               "mode": (cfg.get("replay") or {}).get("mode"),
               "model": (cfg.get("model") or {}).get("preset"),
               "backend": runtime.get("backend"), "device_type": runtime.get("device_type"),
               "device_name": runtime.get("device_name")}
        if row["capacity_blocks"] is None and isinstance(metrics.get("capacity_blocks"), int) \
                and metrics["capacity_blocks"] > 0:
            row["capacity_blocks"] = metrics["capacity_blocks"]
        for k in _FROM_METRICS:
            row[k] = metrics.get(k)
        row.update(_flatten(cfg, "config."))
        for k, v in metrics.items():
            if k in _FROM_METRICS:
                continue
            row[f"result.{k}" if k in row else k] = v
        rows.append(row)
    df = pd.DataFrame(rows)
    if dedupe and len(df):
        # Among runs of one configuration keep the original (not a reused copy), the latest finished.
        df = df.sort_values(["config_hash", "reused", "finished"], ascending=[True, False, True])
        df = df.drop_duplicates("config_hash", keep="last")
        df = df.sort_values(["task", "workload", "policy", "capacity_blocks"], na_position="last")
    return df.reset_index(drop=True)


def load_series(run_dir):
    """The time series of one run as a DataFrame (empty when the run has none)."""
    import pandas as pd

    run_dir = Path(run_dir)
    if (run_dir / SERIES_PARQUET).is_file():
        return pd.read_parquet(run_dir / SERIES_PARQUET)
    if (run_dir / SERIES_JSON).is_file():
        data = json.loads((run_dir / SERIES_JSON).read_text())
        return pd.DataFrame(data["rows"], columns=data["columns"])
    return pd.DataFrame()


def load_timeseries(paths, dedupe: bool = True):
    """The time series of every complete run under ``paths`` in one long DataFrame, with the run's
    ``run_dir``, ``config_hash``, ``policy``, ``capacity_blocks``, ``block_tokens``, ``capacity_tokens``,
    ``workload`` and ``mode`` on each row."""
    import pandas as pd

    runs = load_results(paths, dedupe=dedupe)
    frames = []
    for _, r in runs.iterrows():
        s = load_series(r["run_dir"])
        if len(s):
            for col in ("run_dir", "config_hash", "policy", "capacity_blocks", "block_tokens", "capacity_tokens",
                        "workload", "mode"):
                s[col] = r[col]
            frames.append(s)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_tables(paths, name: str, dedupe: bool = True):
    """The rows of result table ``name`` (e.g. a benchmark's ``results``) across runs, with ``run_dir``."""
    import pandas as pd

    runs = load_results(paths, dedupe=dedupe)
    rows = []
    for d in runs["run_dir"] if len(runs) else []:
        for row in (read_result(d).get("tables") or {}).get(name, []):
            rows.append(dict(row, run_dir=d))
    return pd.DataFrame(rows)
