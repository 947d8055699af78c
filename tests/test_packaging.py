"""Packaging: the library imports none of the harness's dependencies, and the harness ships in the package.

The installed-package test builds and installs the project (not editable) into a temporary folder and
uses it from another directory, as a user without a clone does: a sweep through the ``kvtriton``
console script, then ``kvtriton.harness.load_results`` on its results.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS_DEPS = ("hydra", "omegaconf", "wandb", "pandas", "matplotlib")


def _loaded_by(code: str, env: dict | None = None) -> list[str]:
    probe = (f"import sys, json\n{code}\n"
             f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HARNESS_DEPS)!r}))))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                       env=env or dict(os.environ))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_library_imports_none_of_the_harness_dependencies():
    assert _loaded_by("import kvtriton, kvtriton.ops, kvtriton.memory, kvtriton.replay") == []
    assert _loaded_by("import kvtriton.policies, kvtriton.workloads, kvtriton.devices, kvtriton.telemetry") == []


def test_reading_results_needs_no_hydra():
    assert _loaded_by("from kvtriton.harness import load_results, load_timeseries") == []


def _env(site: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "KVTRITON_", "HYDRA_"))}
    env.pop("TRITON_INTERPRET", None)
    env.update(PYTHONPATH=str(site), MPLBACKEND="Agg", WANDB_MODE="disabled")
    return env


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The project installed (a wheel built from a copy of this checkout, not editable) into a folder."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, src / name)
    shutil.copytree(ROOT / "kvtriton", src / "kvtriton", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    site = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(site), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return site


def test_the_wheel_ships_the_harness_and_its_configs(site):
    conf = site / "kvtriton" / "harness" / "conf"
    shipped = sorted(str(p.relative_to(conf)) for p in conf.rglob("*.yaml"))
    source = sorted(str(p.relative_to(ROOT / "kvtriton" / "harness" / "conf"))
                    for p in (ROOT / "kvtriton" / "harness" / "conf").rglob("*.yaml"))
    assert shipped == source and "config.yaml" in shipped
    assert (site / "kvtriton" / "harness" / "store.py").is_file()
    assert (site / "bin" / "kvtriton").is_file(), "no kvtriton console script"
    assert not (site / "experiments").exists() and not (site / "conf").exists()


def test_a_sweep_and_load_results_without_a_clone(site, tmp_path):
    """From a directory outside the clone, with only the installed package: ``kvtriton run -m`` runs a
    sweep, and ``kvtriton.harness.load_results`` (as a notebook calls it) reads it back."""
    env = _env(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([sys.executable, "-c", "import kvtriton, kvtriton.harness.cli as c; "
                            "print(kvtriton.__file__); print(c.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-2000:]
    for line in where.stdout.split():
        assert Path(line).resolve().is_relative_to(site.resolve()), f"imported {line}, not the installed package"

    kvt = [str(site / "bin" / "kvtriton")]
    r = subprocess.run(kvt + ["run", "-m", "policy=lru,fifo", "pool.capacity_blocks=16,64", "workload=multiturn",
                              "workload.params.num_sessions=8", "replay=fast", "logger=none",
                              "replay.progress=false", "hydra.sweep.dir=sweep"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("[kvtriton] ") >= 4, r.stderr[-3000:]

    read = ("import json, kvtriton.harness as h\n"
            "df = h.load_results('sweep')\n"
            "print(json.dumps({'rows': len(df), 'policies': sorted(set(df['policy'])),\n"
            "                  'caps': sorted(set(int(c) for c in df['capacity_blocks'])),\n"
            "                  'block_tokens': sorted(set(int(b) for b in df['block_tokens'])),\n"
            "                  'hit_rate_ok': bool(df['hit_rate'].between(0, 1).all()),\n"
            "                  'module': h.__file__}))")
    r = subprocess.run([sys.executable, "-c", read], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["rows"] == 4 and out["policies"] == ["fifo", "lru"] and out["caps"] == [16, 64]
    assert out["block_tokens"] == [512] and out["hit_rate_ok"]
    assert Path(out["module"]).resolve().is_relative_to(site.resolve())
    assert sorted(p.name for p in work.iterdir()) == ["results", "sweep"]  # outputs under the working directory

    # Hydra's help comes from the shipped configs; a benchmark task explains that it needs a clone
    r = subprocess.run(kvt + ["run", "--help"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "kvtriton run" in r.stdout and "policy:" in r.stdout, r.stdout[-2000:]
    r = subprocess.run(kvt + ["run", "experiment=bench_kernels", "bench.device=cpu", "logger=none"], cwd=work,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "experiments/" in r.stderr and "clone" in r.stderr, r.stderr[-2000:]
