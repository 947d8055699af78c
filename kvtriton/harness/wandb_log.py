"""Weights & Biases logging of one run, and a reader for offline runs' local files.

Mode: ``logger.mode`` when it is online/offline/disabled; with ``auto``, ``$WANDB_MODE`` when set, else
online when credentials exist (``$WANDB_API_KEY`` or a netrc entry for the W&B host), else offline.
W&B's files stay under one directory, ``logger.dir``, else ``$WANDB_DIR``, else the run's Hydra output
directory: the run (``<dir>/wandb/offline-run-*``), and, unless the user set their variables, W&B's cache
and its service's logs (``WANDB_CACHE_DIR``: ``<dir>/wandb/cache``), artifact staging
(``WANDB_DATA_DIR``: ``<dir>/wandb/data``) and downloads (``WANDB_ARTIFACT_DIR``:
``<dir>/wandb/artifacts``); W&B's defaults put them under the home directory. ``WANDB_CONFIG_DIR`` (the
user's W&B settings, which a run only reads) is left alone. The W&B service is torn down after each run:
it keeps the environment it started with, so a second run in the same process (a joblib worker) would
otherwise write its logs into the first run's directory.

W&B prints nothing of its own (``silent``) and does not capture the console (``console="off"``), so the
harness's one-line ``[kvtriton]`` summary of each job stays visible; set ``WANDB_SILENT=false`` to see
W&B's messages. ``log_sweep_summary`` logs one more run per sweep (``job_type="sweep_summary"``, in the
sweep's group): every job's results as a table and line plots across the sweep.
"""

from __future__ import annotations

import contextlib
import json
import netrc
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Mapping

from kvtriton.checks import is_number

# W&B's variables for its directories, and where a run puts them under <dir>/wandb/ unless they are set.
DIR_VARS = {"WANDB_CACHE_DIR": "cache", "WANDB_DATA_DIR": "data", "WANDB_ARTIFACT_DIR": "artifacts"}


def wandb_dir(lcfg, run_dir) -> Path:
    """The directory a run's W&B files go under: ``logger.dir``, else ``$WANDB_DIR``, else ``run_dir``."""
    return Path(getattr(lcfg, "dir", None) or os.environ.get("WANDB_DIR") or run_dir).absolute()


@contextlib.contextmanager
def wandb_environment(base: Path):
    """Point W&B's directories under ``base`` for the duration (variables the user set are kept);
    the environment is restored afterwards."""
    names = ["WANDB_DIR", *DIR_VARS]
    saved = {k: os.environ.get(k) for k in names}
    try:
        os.environ["WANDB_DIR"] = str(base)
        for var, sub in DIR_VARS.items():
            if not saved[var]:
                os.environ[var] = str(base / "wandb" / sub)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def resolve_mode(mode: str) -> str:
    """online / offline / disabled for ``logger.mode`` (see the module docstring); online without
    credentials falls back to offline, so a run never stops at a login prompt."""
    mode = getattr(mode, "value", mode)
    if mode == "auto":
        env = os.environ.get("WANDB_MODE")
        if not env:
            return "online" if has_credentials() else "offline"
        mode = {"dryrun": "offline", "run": "online"}.get(env, env)
    if mode == "online" and not has_credentials():
        import warnings

        warnings.warn("W&B: no credentials (WANDB_API_KEY or `wandb login`); logging offline instead")
        return "offline"
    return mode


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def log_run(lcfg, *, run_dir: Path, resolved: Mapping, name: str, group: str | None,
            metrics: Mapping, series: list[dict] | None, tables: Mapping | None,
            result_files: Iterable[Path] = (), job_type: str = "replay") -> dict:
    """Create a W&B run, log the series (one ``wandb.log`` per point, ``step`` as W&B's step), the summary
    metrics and the results as an artifact; return ``{"mode", "run_id", "dir"}``."""
    mode = resolve_mode(lcfg.mode)
    if mode == "disabled":
        return {"mode": mode, "run_id": None, "dir": None}
    base = wandb_dir(lcfg, run_dir)
    base.mkdir(parents=True, exist_ok=True)
    with wandb_environment(base):
        import wandb

        try:
            return _log_run(wandb, lcfg, mode, base, resolved=resolved, name=name, group=group, metrics=metrics,
                            series=series, tables=tables, result_files=result_files, job_type=job_type)
        finally:
            wandb.teardown()  # the service keeps the environment it started with; the next run starts its own


def _settings(wandb):
    """W&B quiet (``WANDB_SILENT=false`` brings its messages back) and off the console."""
    silent = os.environ.get("WANDB_SILENT", "true").lower() not in ("false", "0", "no")
    return wandb.Settings(silent=silent, console="off")


def _log_run(wandb, lcfg, mode, base: Path, *, resolved, name, group, metrics, series, tables, result_files,
             job_type) -> dict:
    run = wandb.init(project=lcfg.project, entity=lcfg.entity, group=group, name=name, job_type=job_type,
                     config=dict(resolved), tags=list(lcfg.tags or []), dir=str(base), mode=mode,
                     reinit="finish_previous", settings=_settings(wandb))
    try:
        if series:
            for i, point in enumerate(series):
                row = {k: v for k, v in point.items() if is_number(v)}
                last = int(point.get("step", i))
                run.log(row, step=last)
            # W&B holds the last step's row until a later step or finish() and then copies it into the
            # summary; commit it now so that the summary below is final.
            run.log({}, step=last, commit=True)
        run.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))})
        if lcfg.log_artifacts:
            art = wandb.Artifact(name=f"results-{run.id}", type="results",
                                 metadata={"config_hash": resolved.get("_config_hash")})
            for f in result_files:
                if Path(f).is_file():
                    art.add_file(str(f))
            summary_cols = sorted(k for k, v in metrics.items() if isinstance(v, (int, float, str, bool)))
            art.add(wandb.Table(columns=summary_cols, data=[[metrics[c] for c in summary_cols]]), "summary")
            for tname, rows in (tables or {}).items():
                if rows:
                    cols = sorted({k for r in rows for k in r})
                    data = [[_cell(r.get(c)) for c in cols] for r in rows]
                    art.add(wandb.Table(columns=cols, data=data), tname)
            run.log_artifact(art)
        info = {"mode": mode, "run_id": run.id, "dir": str(Path(run.dir).parent)}
    finally:
        run.finish()
    return info


def _cell(v):
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    if isinstance(v, float) and v != v:  # NaN: a metric this run does not have
        return None
    return v


# The sweep summary's line plots: (metric, title), where the results have the metric.
SWEEP_PLOTS = (("hit_rate", "hit rate"), ("token_hit_rate", "token hit rate"),
               ("decode_tokens_per_s", "decode tokens/s"), ("ttft_s_p50", "TTFT p50 (s)"))


def log_sweep_summary(lcfg, *, sweep_dir: Path, results, name: str = "sweep-summary") -> dict:
    """One W&B run for a whole sweep (``job_type="sweep_summary"``, ``group`` the sweep directory, as its
    jobs): ``results`` (``load_results`` of the sweep) as the table ``sweep_results``, and a line plot per
    metric of ``SWEEP_PLOTS`` against the capacity in tokens (else blocks), one line per policy. Returns
    ``{"mode", "run_id", "dir", "plots"}``."""
    mode = resolve_mode(lcfg.mode)
    if mode == "disabled" or results is None or not len(results):
        return {"mode": mode, "run_id": None, "dir": None, "plots": []}
    base = wandb_dir(lcfg, sweep_dir)
    base.mkdir(parents=True, exist_ok=True)
    cols = [c for c in results.columns if not c.startswith("config.") and c not in ("run_dir", "finished")]
    rows = [[_cell(v) for v in r] for r in results[cols].itertuples(index=False, name=None)]
    with wandb_environment(base):
        import wandb

        try:
            run = wandb.init(project=lcfg.project, entity=lcfg.entity, group=str(sweep_dir), name=name,
                             job_type="sweep_summary", dir=str(base), mode=mode, tags=list(lcfg.tags or []),
                             config={"sweep_dir": str(sweep_dir), "jobs": len(results)},
                             reinit="finish_previous", settings=_settings(wandb))
            try:
                table = wandb.Table(columns=cols, data=rows, allow_mixed_types=True)
                logged = {"sweep_results": table}
                x = next((c for c in ("capacity_tokens", "capacity_blocks")
                          if c in results.columns and results[c].notna().all()), None)
                plots = []
                for metric, title in SWEEP_PLOTS:
                    if x and metric in results.columns and results[metric].notna().any():
                        unit = "tokens" if x == "capacity_tokens" else "blocks"
                        logged[f"{metric}_vs_capacity"] = wandb.plot.line(
                            table, x, metric, stroke="policy", title=f"{title} against capacity ({unit})")
                        plots.append(f"{metric}_vs_capacity")
                run.log(logged)
                run.summary.update({"jobs": len(results), "sweep_dir": str(sweep_dir)})
                info = {"mode": mode, "run_id": run.id, "dir": str(Path(run.dir).parent), "plots": plots}
            finally:
                run.finish()
        finally:
            wandb.teardown()
    return info


# ---------------------------------------------------------------------------------- offline reader

_BLOCK = 32768
_HEADER = 7  # checksum u32, length u16, type u8


def _records(path: Path):
    data = Path(path).read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a W&B transaction log")
    pos, buf = 7, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # the rest of a block too short for a header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        pos += _HEADER
        if kind == 0 and n == 0:
            pos += left - _HEADER
            continue
        chunk = data[pos:pos + n]
        pos += n
        if kind == 1:
            yield chunk
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk
            buf = b""


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(path) -> dict[str, Any]:
    """The history, summary and config of a run from its local transaction log.

    ``path``: a ``.wandb`` file, an ``offline-run-*`` directory, or a directory holding ``wandb/``.
    Returns ``{"run_id", "job_type", "group", "history": [dict per step], "summary": dict, "config": dict,
    "artifacts": [names]}``.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.wandb"))
        if not files:
            raise FileNotFoundError(f"no .wandb transaction log under {path}")
        path = files[-1]
    out = {"run_id": None, "job_type": None, "group": None, "history": [], "summary": {}, "config": {},
           "artifacts": []}
    for raw in _records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = rec.run.run_id
            out["job_type"], out["group"] = rec.run.job_type or None, rec.run.run_group or None
            for item in rec.run.config.update:
                out["config"][_item_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            out["history"].append({_item_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            for item in rec.summary.update:
                out["summary"][_item_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                out["config"][_item_key(item)] = json.loads(item.value_json)
        elif kind == "artifact":
            out["artifacts"].append(rec.artifact.name)
    # W&B keeps each config entry as {"value": ..., "desc": ...}
    out["config"] = {k: v["value"] if isinstance(v, dict) and "value" in v else v
                     for k, v in out["config"].items()}
    return out
