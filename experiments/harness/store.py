"""The local results store: one directory per run, written atomically, and a loader over many runs.

A run directory (Hydra's output directory) holds, in the order they are written:

- ``config.json``: the resolved config, its hash and the overrides, written when the run starts;
- ``result.json``: config, hash and metrics (and ``tables``: small result tables such as a benchmark's
  rows), written when the run has finished;
- ``timeseries.json`` or ``timeseries.parquet``: the per-step time series, where the run has one;
- ``COMPLETE``: the marker, written last, holding the config hash.

Every file is written to a temporary name and renamed into place, so a run killed at any point leaves
no ``COMPLETE`` (the loader ignores such directories) and no truncated file under a final name.

Skipping completed runs: a completed run also writes ``<index_dir>/<config hash>.json`` pointing at its
directory. A later run with the same hash finds it there, checks that directory's ``COMPLETE`` still
holds the hash, and copies its results instead of running again (``result.json`` then names the source
in ``reused_from``).
"""

from __future__ import annotations

import datetime as _dt
import enum
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

SCHEMA_VERSION = 1
MARKER = "COMPLETE"
CONFIG_FILE = "config.json"
RESULT_FILE = "result.json"
SERIES_JSON = "timeseries.json"
SERIES_PARQUET = "timeseries.parquet"

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


def config_hash(resolved: Mapping[str, Any]) -> str:
    """SHA-256 (first 16 hex digits) of the resolved config without ``NON_SEMANTIC_KEYS``."""
    cfg = json.loads(json.dumps(_jsonable(resolved)))
    for key in NON_SEMANTIC_KEYS:
        node, *rest = key.split(".")
        if not rest:
            cfg.pop(node, None)
        elif isinstance(cfg.get(node), dict):
            cfg[node].pop(rest[0], None)
    blob = json.dumps(cfg, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=1, sort_keys=False) + "\n")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def is_complete(run_dir: Path, expected_hash: str | None = None) -> bool:
    marker = Path(run_dir) / MARKER
    if not marker.is_file() or not (Path(run_dir) / RESULT_FILE).is_file():
        return False
    return expected_hash is None or marker.read_text().strip() == expected_hash


class RunStore:
    """The results of one run in ``run_dir``; see the module docstring for the files and their order."""

    def __init__(self, run_dir, series_format: str = "json"):
        if series_format not in ("json", "parquet"):
            raise ValueError(f"series_format must be 'json' or 'parquet', got {series_format!r}")
        self.run_dir = Path(run_dir)
        self.series_format = series_format
        self.header: dict = {}

    def begin(self, resolved: Mapping, cfg_hash: str, overrides: Iterable[str] = (), job: Mapping | None = None):
        """Record the resolved config; drop any earlier ``COMPLETE`` in this directory first."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / MARKER).unlink(missing_ok=True)
        self.header = {"schema": SCHEMA_VERSION, "config_hash": cfg_hash, "overrides": list(overrides),
                       "job": dict(job or {}), "run_dir": str(self.run_dir.resolve()),
                       "started": _now(), "config": _jsonable(resolved)}
        atomic_write_json(self.run_dir / CONFIG_FILE, self.header)

    def finish(self, metrics: Mapping, series: list[dict] | None = None, tables: Mapping | None = None,
               extra: Mapping | None = None) -> dict:
        """Write the series, then ``result.json``, then the marker (in that order) and return the result."""
        if series:
            self._write_series(series)
        result = dict(self.header)
        result.update({"finished": _now(), "metrics": _jsonable(dict(metrics)),
                       "tables": _jsonable(dict(tables or {})),
                       "series_file": self._series_name() if series else None})
        result.update(_jsonable(dict(extra or {})))
        atomic_write_json(self.run_dir / RESULT_FILE, result)
        atomic_write_text(self.run_dir / MARKER, self.header["config_hash"] + "\n")
        return result

    def adopt(self, source_dir: Path) -> dict:
        """Complete this run with a copy of an earlier complete run's results (same config hash)."""
        source_dir = Path(source_dir)
        src = json.loads((source_dir / RESULT_FILE).read_text())
        series_name = src.get("series_file")
        if series_name and (source_dir / series_name).is_file():
            tmp = self.run_dir / f".{series_name}.tmp"
            shutil.copyfile(source_dir / series_name, tmp)
            os.replace(tmp, self.run_dir / series_name)
        result = dict(src)
        result.update({k: self.header[k] for k in ("overrides", "job", "run_dir", "started")})
        result["finished"] = _now()
        result["reused_from"] = str(source_dir.resolve())
        atomic_write_json(self.run_dir / RESULT_FILE, result)
        atomic_write_text(self.run_dir / MARKER, self.header["config_hash"] + "\n")
        return result

    def _series_name(self) -> str:
        return SERIES_PARQUET if self.series_format == "parquet" else SERIES_JSON

    def _write_series(self, series: list[dict]) -> None:
        path = self.run_dir / self._series_name()
        if self.series_format == "parquet":
            import pandas as pd

            tmp = self.run_dir / f".{path.name}.tmp"
            pd.DataFrame(series).to_parquet(tmp, index=False)
            os.replace(tmp, path)
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


def load_results(paths, dedupe: bool = True):
    """One row per complete run under ``paths`` (see ``find_runs``), as a pandas DataFrame.

    Columns: ``run_dir``, ``config_hash``, ``overrides``, the flattened config (``config.policy.name``,
    ...), the metrics (``hit_rate``, ...) and the shortcuts ``policy``, ``capacity_blocks``, ``workload``,
    ``mode``, ``task``. ``dedupe`` keeps one row per config hash (the latest finished), so overlapping
    sweeps and reruns count each configuration once.
    """
    import pandas as pd

    rows = []
    for run_dir in find_runs(paths):
        res = read_result(run_dir)
        cfg = res.get("config", {})
        row = {"run_dir": str(run_dir), "config_hash": res.get("config_hash"),
               "overrides": " ".join(res.get("overrides", [])), "finished": res.get("finished"),
               "reused": bool(res.get("reused_from")),
               "task": cfg.get("task"), "policy": (cfg.get("policy") or {}).get("name"),
               "capacity_blocks": (cfg.get("pool") or {}).get("capacity_blocks"),
               "workload": (cfg.get("workload") or {}).get("name"),
               "mode": (cfg.get("replay") or {}).get("mode"),
               "model": (cfg.get("model") or {}).get("preset")}
        row.update(_flatten(cfg, "config."))
        for k, v in (res.get("metrics") or {}).items():
            # the configured names stay in the shortcut columns (``arc``, not the registry's ``adaptive``)
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
    ``run_dir``, ``config_hash``, ``policy``, ``capacity_blocks`` and ``workload`` on each row."""
    import pandas as pd

    runs = load_results(paths, dedupe=dedupe)
    frames = []
    for _, r in runs.iterrows():
        s = load_series(r["run_dir"])
        if len(s):
            for col in ("run_dir", "config_hash", "policy", "capacity_blocks", "workload", "mode"):
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
