"""The harness's run directories: one run per directory, files others can read, W&B kept inside, and a
skip-completed key that knows the device and the ops backend.

Most checks go through the real entry point (``experiments/run.py``, the README's command, a thin wrapper
of the ``kvtriton run`` console script) in a subprocess, as a user runs it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
from hydra import compose
from omegaconf import OmegaConf

from kvtriton.harness import store

RUN = [sys.executable, str(ROOT / "experiments" / "run.py")]
FAST = ["workload=multiturn", "workload.params.num_sessions=12", "replay=fast", "logger=none",
        "replay.progress=false"]
# The smallest device replay: two short requests on the tiny model, on the CPU.
DEVICE = ["workload=zipf", "workload.params.num_requests=2", "replay=device", "replay.device=cpu",
          "replay.max_input_tokens=32", "replay.max_output_tokens=1", "logger=none", "replay.progress=false"]


def _env(**extra):
    env = dict(os.environ)
    env.update({"WANDB_SILENT": "true", "MPLBACKEND": "Agg", "HYDRA_FULL_ERROR": "0"})
    env.pop("TRITON_INTERPRET", None)
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


def _run(args, cwd, timeout=120, **env):
    return subprocess.run(RUN + list(args), cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def _files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


# --------------------------------------------------------------------------------- run directories

def test_default_directories_differ_between_runs_started_together(hydra_conf):
    """Hydra's default ``outputs/<date>/<H-M-S>`` is shared by two runs started in the same second."""
    a = compose(config_name="config", return_hydra_config=True)
    b = compose(config_name="config", return_hydra_config=True)
    for key in ("hydra.run.dir", "hydra.sweep.dir"):
        da, db = OmegaConf.select(a, key), OmegaConf.select(b, key)
        assert da != db, f"two runs started together share {key}={da}"
        assert OmegaConf.select(a, key) == da  # resolved once per run: stable within it


def test_default_directories_hold_one_run_each(tmp_path):
    """A run and a sweep in their default directories: every file of a run is in its own directory."""
    r = _run(FAST + ["results.skip_completed=false", f"results.index_dir={tmp_path / 'index'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(["-m", "policy=lru,fifo"] + FAST + ["results.skip_completed=false",
                                                  f"results.index_dir={tmp_path / 'index'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = store.find_runs(tmp_path)
    assert len(runs) == 3
    assert len({d.parent for d in runs if "multirun" in str(d)}) == 1  # one sweep directory for both jobs
    for d in runs:
        cfg, res = json.loads((d / store.CONFIG_FILE).read_text()), store.read_result(d)
        assert res["run_id"] == cfg["run_id"] == json.loads((d / store.OWNER_FILE).read_text())["run_id"]
        assert Path(res["run_dir"]) == d and (d / ".hydra" / "config.yaml").is_file()


def test_two_runs_given_one_directory_do_not_mix_their_results(tmp_path):
    """Two runs started together on the same explicit directory: one runs, the other stops with a message
    naming the directory, and the directory's config.json and result.json come from the same run."""
    common = FAST + [f"hydra.run.dir={tmp_path / 'run'}", f"results.index_dir={tmp_path / 'index'}"]
    procs = [subprocess.Popen(RUN + common + [f"policy={p}"], cwd=tmp_path, env=_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for p in ("lru", "fifo")]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) != [0, 0], "both runs finished into the same directory"
    assert 0 in codes, [o[1][-2000:] for o in outs]
    loser = outs[codes.index(0) ^ 1][1]
    assert str(tmp_path / "run") in loser and ("in use by run" in loser or "holds the complete results" in loser), \
        loser[-2000:]
    run = tmp_path / "run"
    cfg, res = json.loads((run / store.CONFIG_FILE).read_text()), store.read_result(run)
    assert cfg["run_id"] == res["run_id"] and cfg["config"] == res["config"]
    assert res["config"]["policy"]["name"] == ["lru", "fifo"][codes.index(0)]


def test_reruns_into_directories_of_other_results_stop_before_anything_is_written(tmp_path):
    """A sweep rerun into its directory with other jobs, or a run into a directory of another run's
    results, stops in the checks, before any job runs and before Hydra writes into the directory."""
    index = f"results.index_dir={tmp_path / 'index'}"
    sweep = tmp_path / "sweep"
    r = _run(["-m", "policy=lru,fifo", f"hydra.sweep.dir={sweep}", index] + FAST, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    before = {str(p): p.stat().st_mtime_ns for p in sweep.rglob("*")}
    # job 1 is now sieve: its directory holds fifo's results
    r = _run(["-m", "policy=lru,sieve", f"hydra.sweep.dir={sweep}", index] + FAST, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "policy=sieve" in r.stderr and "holds the complete results of run" in r.stderr, r.stderr[-3000:]
    assert {str(p): p.stat().st_mtime_ns for p in sweep.rglob("*")} == before  # not even multirun.yaml
    # a single run into job 0's directory with another policy
    r = _run(["policy=sieve", f"hydra.run.dir={sweep / '0'}", index] + FAST, cwd=tmp_path)
    assert r.returncode == 2 and "Nothing was run" in r.stderr, r.stderr[-3000:]
    assert {str(p): p.stat().st_mtime_ns for p in sweep.rglob("*")} == before  # .hydra/ untouched too


def test_store_claims_its_directory(tmp_path):
    d = tmp_path / "run"
    a = store.RunStore(d)
    a.begin({"x": 1}, "h1")
    b = store.RunStore(d)
    with pytest.raises(store.RunDirBusy, match=f"in use by run {a.run_id}"):
        b.begin({"x": 2}, "h2")
    assert json.loads((d / store.CONFIG_FILE).read_text())["config"] == {"x": 1}  # b wrote nothing
    res = a.finish({"m": 1})
    assert res["run_id"] == a.run_id and store.is_complete(d, "h1")

    # a directory holding another configuration's complete results is not taken over
    with pytest.raises(store.RunDirBusy, match="holds the complete results of run"):
        store.RunStore(d).begin({"x": 2}, "h2")
    assert store.is_complete(d, "h1") and store.read_result(d)["config"] == {"x": 1}
    # the same configuration may run again there (results.skip_completed=false)
    c = store.RunStore(d)
    c.begin({"x": 1}, "h1")
    assert c.finish({"m": 2})["run_id"] == c.run_id


def test_store_refuses_to_finish_into_a_directory_another_run_owns(tmp_path):
    """Where file locks do not reach (some network filesystems) a second run can replace OWNER; the first
    run then finds it is no longer the owner and writes no results."""
    d = tmp_path / "run"
    a = store.RunStore(d)
    a.begin({"x": 1}, "h1")
    tmp = d / "OWNER.other"
    tmp.write_text(json.dumps({"run_id": "someone-else", "state": "running"}))
    os.replace(tmp, d / store.OWNER_FILE)
    with pytest.raises(store.RunDirBusy, match="someone-else"):
        a.finish({"m": 1})
    assert not (d / store.RESULT_FILE).exists() and not (d / store.MARKER).exists()


# ------------------------------------------------------------------------------------- file modes

@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664)])
def test_result_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        rs = store.RunStore(tmp_path / "run")
        rs.begin({"x": 1}, "h1")
        rs.finish({"m": 1}, [{"step": 0, "m": 1}])
        store.index_add(tmp_path / "index", "h1", tmp_path / "run")
        rs2 = store.RunStore(tmp_path / "copy", "parquet")
        rs2.begin({"x": 1}, "h1")
        rs2.adopt(tmp_path / "run")
        rs3 = store.RunStore(tmp_path / "pq", "parquet")
        rs3.begin({"x": 1}, "h3")
        rs3.finish({"m": 1}, [{"step": 0, "m": 1}])
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 13
    bad = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
           if stat.S_IMODE(p.stat().st_mode) != mode}
    assert not bad, f"expected {oct(mode)}: {bad}"


# ------------------------------------------------------------------------------------------- W&B

def _wandb_args(tmp_path):
    return FAST[:-2] + ["logger=wandb", "logger.mode=offline", "replay.progress=false",
                        f"hydra.run.dir={tmp_path / 'run'}", f"results.index_dir={tmp_path / 'index'}"]


_WANDB_ENV = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR",
              "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME")


def test_wandb_leaves_nothing_in_home_or_tmp(tmp_path):
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    r = _run(_wandb_args(tmp_path), cwd=tmp_path, HOME=home, TMPDIR=tmp, **{k: None for k in _WANDB_ENV})
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((tmp_path / "run" / "wandb.json").read_text())
    assert info["mode"] == "offline" and Path(info["dir"]).is_relative_to(tmp_path / "run")
    assert _files(home) == [] and _files(tmp) == [], (_files(home), _files(tmp))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "index", "run", "tmp"]


def test_wandb_honours_wandb_dir(tmp_path):
    home, wdir = tmp_path / "home", tmp_path / "wandb_here"
    home.mkdir()
    r = _run(_wandb_args(tmp_path), cwd=tmp_path, HOME=home, WANDB_DIR=wdir,
             **{k: None for k in _WANDB_ENV if k != "WANDB_DIR"})
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((tmp_path / "run" / "wandb.json").read_text())
    assert Path(info["dir"]).is_relative_to(wdir), info
    assert list((wdir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert not (tmp_path / "run" / "wandb").exists()
    assert _files(home) == []


# ---------------------------------------------------------------------------------- skip key

def test_skip_completed_keys_on_the_ops_backend(tmp_path):
    """A run in Triton's interpreter is not handed the reference run's results, and vice versa."""
    index = f"results.index_dir={tmp_path / 'index'}"
    ref = _run(DEVICE + [index, f"hydra.run.dir={tmp_path / 'ref'}"], cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    interp = _run(DEVICE + [index, f"hydra.run.dir={tmp_path / 'interp'}"], cwd=tmp_path, TRITON_INTERPRET=1)
    assert interp.returncode == 0, interp.stderr[-3000:]
    assert "[kvtriton] skipped" not in interp.stderr, "the interpreter run was handed the reference results"
    a, b = store.read_result(tmp_path / "ref"), store.read_result(tmp_path / "interp")
    assert "reused_from" not in b and a["config_hash"] != b["config_hash"]
    assert a["runtime"]["backend"] == "reference" and b["runtime"]["backend"] == "triton-interpreter"
    assert a["runtime"]["device"] == b["runtime"]["device"] == "cpu"


def test_skip_completed_keys_on_the_device(hydra_conf, tmp_path, monkeypatch):
    from kvtriton.harness import adapters
    from kvtriton.harness.runner import execute
    from kvtriton.ops import backend

    cfg = compose(config_name="config", overrides=DEVICE + [f"results.index_dir={tmp_path / 'index'}"])
    with backend("reference"):
        first = execute(cfg, tmp_path / "a")
        assert first["runtime"]["device"] == "cpu"
        real = adapters.runtime_info

        def other_gpu(cfg, device):  # the same config on a machine whose device is another model
            return dict(real(cfg, device), device_name="Some GPU")

        monkeypatch.setattr(adapters, "runtime_info", other_gpu)
        second = execute(cfg, tmp_path / "b")
        monkeypatch.setattr(adapters, "runtime_info", real)
        third = execute(cfg, tmp_path / "c")  # the first one's device and backend again: reused
    assert "reused_from" not in second and second["config_hash"] != first["config_hash"]
    assert second["runtime"]["device_name"] == "Some GPU"
    assert third["reused_from"] == str((tmp_path / "a").resolve())
    assert third["runtime"] == first["runtime"] and third["config_hash"] == first["config_hash"]


def test_wandb_stays_quiet_and_the_summary_line_comes_last(tmp_path):
    """Without WANDB_SILENT in the environment W&B prints nothing of its own, and the run's one-line
    ``[kvtriton]`` summary is the last line."""
    r = _run(_wandb_args(tmp_path), cwd=tmp_path, WANDB_SILENT=None)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert not [ln for ln in lines if ln.lower().startswith("wandb")], lines[-20:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("[kvtriton] ") and "policy=lru" in last and "hit_rate=" in last, r.stderr[-2000:]


def test_sweep_logs_one_wandb_summary_run_with_every_job(tmp_path):
    from kvtriton.harness.wandb_log import read_offline_run

    sweep = tmp_path / "sweep"
    args = ["-m", "policy=lru,fifo", "pool.capacity_blocks=16,64"] + FAST[:-2] + [
        "logger=wandb", "logger.mode=offline", "replay.progress=false", f"hydra.sweep.dir={sweep}",
        f"results.index_dir={tmp_path / 'index'}"]
    r = _run(args, cwd=tmp_path, WANDB_SILENT=None, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not [ln for ln in (r.stdout + r.stderr).splitlines() if ln.lower().startswith("wandb")]
    assert r.stderr.count("[kvtriton] policy=") == 4, r.stderr[-3000:]
    assert f"[kvtriton] sweep {sweep}: 4 complete runs" in r.stderr
    info = json.loads((sweep / "sweep_summary.json").read_text())
    assert info["mode"] == "offline" and "hit_rate_vs_capacity" in info["plots"]
    logged = read_offline_run(sweep / "wandb")  # the jobs' own runs are under sweep/<job>/wandb
    assert logged["run_id"] == info["run_id"] and logged["job_type"] == "sweep_summary"
    assert logged["group"] == str(sweep)
    keys = {k for step in logged["history"] for k in step}
    assert any(k.startswith("sweep_results/") for k in keys), keys  # the table
    assert any(k.startswith("hit_rate_vs_capacity") for k in keys), keys  # the plot (its table)
    assert logged["summary"]["jobs"] == 4
    job = read_offline_run(sweep / "0" / "wandb")
    assert job["group"] == str(sweep) and job["job_type"] == "replay"
