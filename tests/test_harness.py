"""The experiment harness: config groups, validation, the results store, sweeps, W&B and telemetry."""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
from hydra import compose
from omegaconf import OmegaConf

from kvtriton import harness
from kvtriton.harness import adapters, store
from kvtriton.harness.config import CONF_DIR, ConfigError, validate
from kvtriton.harness.runner import execute

RUN = [sys.executable, str(ROOT / "experiments" / "run.py")]
# Small and fast on a CPU: multi-turn conversations in the fast simulator, no W&B.
FAST = ["workload=multiturn", "workload.params.num_sessions=12", "replay=fast", "logger=none",
        "replay.progress=false"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _env(**extra):
    env = dict(os.environ)
    env.update({"WANDB_SILENT": "true", "MPLBACKEND": "Agg", "HYDRA_FULL_ERROR": "0"})
    env.pop("TRITON_INTERPRET", None)  # the harness's CPU path: the reference ops
    env.update(extra)
    return env


def _run(args, cwd, timeout=120, **env):
    return subprocess.run(RUN + list(args), cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)


# ------------------------------------------------------------------------------------- composition

GROUPS = ["model", "pool", "policy", "workload", "replay", "logger", "telemetry", "experiment"]


@pytest.mark.parametrize("group", GROUPS)
def test_compose_every_option(group, hydra_conf, fake_traces):
    options = _options(group)
    assert options, f"conf/{group} is empty"
    needs = {("model", "per_request"): ["pool=budget", "workload=design_mix"], ("policy", "belady"): ["replay=fast"]}
    for opt in options:
        cfg = compose(config_name="config", overrides=[f"{group}={opt}"] + needs.get((group, opt), []))
        validate(cfg)
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        if group == "policy":
            assert adapters.canonical_policy(cfg.policy.name) is not None
        if group == "workload":
            assert cfg.workload.name == opt


def test_compose_launchers(hydra_conf):
    targets = {}
    for opt in ["basic", "joblib", "submitit_local", "submitit_slurm"] + _options("hydra/launcher"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={opt}"], return_hydra_config=True)
        targets[opt] = cfg.hydra.launcher._target_
    assert "JoblibLauncher" in targets["gpus"] and "SlurmLauncher" in targets["slurm"]
    assert "LocalLauncher" in targets["submitit_local"]


def test_every_registered_name_has_a_config():
    from kvtriton.policies import available_policies
    from kvtriton.spec import PRESETS

    assert set(available_policies()) <= set(_options("policy")), "a registered policy has no conf/policy file"
    assert set(adapters.workload_names()) <= set(_options("workload"))
    assert set(PRESETS) <= set(_options("model"))


def test_default_config_is_small_synthetic_device_replay(hydra_conf):
    cfg = compose(config_name="config")
    validate(cfg)
    assert cfg.workload.name == "zipf" and cfg.replay.mode.value == "device"
    assert cfg.replay.device == "auto" and cfg.logger.kind.value == "wandb" and cfg.logger.mode.value == "auto"
    assert adapters.resolve_device("auto") == ("cuda:0" if __import__("torch").cuda.is_available() else "cpu")


def test_auto_device_maps_job_number_to_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [adapters.resolve_device("auto", n) for n in range(6)] == [
        "cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
    assert adapters.resolve_device("auto") == "cuda:0" and adapters.resolve_device("cuda") == "cuda:0"
    assert adapters.resolve_device("cuda:3", 1) == "cuda:3" and adapters.resolve_device("cpu", 2) == "cpu"
    with pytest.raises(ValueError, match="cuda:4.*valid values: auto, cpu, cuda:0, cuda:1, cuda:2, cuda:3"):
        adapters.resolve_device("cuda:4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert adapters.resolve_device("auto", 3) == "cpu"


def test_trace_path_is_absolute_and_independent_of_cwd(hydra_conf, monkeypatch, tmp_path):
    monkeypatch.delenv("KVTRITON_TRACES", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = compose(config_name="config", overrides=["workload=mooncake_conversation"])
    expected = (ROOT.parent / "shared" / "traces" / "mooncake" / "conversation_trace.jsonl").resolve()
    assert Path(cfg.workload.trace_path).resolve() == expected
    assert cfg.replay.mode.value == "fast"  # trace workloads default to the fast simulator
    cfg = compose(config_name="config", overrides=["workload=mooncake_conversation", "replay=device"])
    assert cfg.replay.mode.value == "device"


def test_experiment_presets_set_their_sweep(hydra_conf, fake_traces):
    cfg = compose(config_name="config", overrides=["experiment=policy_sweep"], return_hydra_config=True)
    assert cfg.workload.name == "mooncake_conversation" and cfg.replay.mode.value == "fast"
    params = cfg.hydra.sweeper.params
    assert "belady" in params["policy"] and "10000" in params["pool.capacity_blocks"]
    assert compose(config_name="config", overrides=["experiment=bench_kernels"]).task.value == "bench_kernels"
    assert compose(config_name="config", overrides=["experiment=bench_memory"]).task.value == "bench_memory"
    assert compose(config_name="config", overrides=["experiment=bench_suite"]).task.value == "bench_suite"


# ------------------------------------------------------------------------------------ bad values

BAD = [
    # (override, text the message must contain)
    ("policy.name=nosuch", ["policy.name", "lru", "s3fifo", "belady"]),
    ("pool.capacity_blocks=-5", ["pool.capacity_blocks", "positive integer"]),
    ("pool.capacity_blocks=0", ["pool.capacity_blocks", "positive integer"]),
    ("replay.device=gpu0", ["replay.device", "auto, cpu, cuda, cuda:N"]),
    ("workload.name=nosuch", ["workload.name", "zipf", "multiturn"]),
    ("model.preset=nosuch", ["model.preset", "llama-3-8b", "tiny"]),
    ("replay.compaction_threshold=1.5", ["replay.compaction_threshold", "[0, 1)"]),
    # the device knobs, by DeviceReplayConfig's own checks, named as replay.<field>
    ("replay.max_batch=0", ["replay.max_batch=0", "positive int"]),
    ("replay.dtype=int8", ["replay.dtype='int8'", "bfloat16"]),
    ("replay.record_every=0", ["replay.record_every", "positive int"]),
    ("replay.repeats=0", ["replay.repeats", "positive integer"]),
    ("policy=belady", ["policy.name='belady'", "replay=fast", "s3fifo"]),  # device replay: no oracle
    ("model=per_request", ["pool.budget_mb", "pool=budget"]),
    # unknown keys: a typo must not run with the default
    ("+pool.capacity_block=100", ["pool.capacity_block", "capacity_blocks"]),
    ("+replay.max_request=5", ["replay.max_request", "max_requests"]),
    ("+polcy=lru", ["polcy", "policy"]),
    (["replay=fast", "+replay.params.ordr=forward"], ["replay.params.ordr", "order"]),
    ("+replay.params.nosuch=1", ["replay.params.nosuch", "step_time_s"]),  # device replay
    ("+replay.params.max_batch=4", ["replay.params.max_batch", "replay.max_batch"]),
    ("+workload.params.num_request=5", ["workload.params.num_request", "num_requests", "zipf_alpha"]),
    (["workload=mooncake_conversation", "+workload.params.limit=5"], ["workload.params.limit", "replay.max_requests"]),
    ("+workload.params.seed=3", ["workload.params.seed", "workload.seed"]),
    (["policy=s3fifo", "+policy.params.small_ratoi=0.2"], ["policy.params.small_ratoi", "small_ratio"]),
    (["policy=lru", "+policy.params.capacity=5"], ["policy.params.capacity", "pool.capacity_blocks"]),
    # values the library would refuse only once the run has started
    ("workload.params.num_requests=-5", ["workload.params.num_requests", "-5", ">= 1"]),
    ("workload.params.zipf_alpha=-1", ["workload.params.zipf_alpha", "-1"]),
    (["replay=fast", "+replay.params.order=sideways"], ["replay.params.order", "sideways", "prefix", "forward"]),
    ("replay.step_time_s=-1", ["replay.step_time_s", "-1"]),
    ("+replay.params.step_time_s=0.1", ["replay.params.step_time_s", "replay.step_time_s"]),
    (["replay=fast", "+replay.params.sample_every=0"], ["replay.params.sample_every", "positive integer"]),
    (["policy=s3fifo", "policy.params.small_ratio=7"], ["policy.params.small_ratio", "(0, 1)"]),
    (["model=per_request", "pool=budget"], ["model.preset", "workload=design_mix"]),
    (["replay=fast", "pool.capacity_blocks=1"], ["pool.capacity_blocks=1", "at least"]),
    ("pool.capacity_blocks=2", ["pool.capacity_blocks=2", "at least", "replay.max_input_tokens"]),
    (["pool=budget", "pool.budget_mb=0.001"], ["pool.budget_mb", "at least"]),
    # the model mode needs the served model's blocks (SmolLM2: 720 KiB each), not the preset's (32 KiB)
    (["replay.compute=model", "replay.hf_model=smollm2", "pool=budget", "pool.budget_mb=4"],
     ["pool.budget_mb", "at least 27", "smollm2"]),
]
if not __import__("torch").cuda.is_available():
    BAD += [("replay.device=cuda:0", ["replay.device='cuda:0'", "auto, cpu"]),
            ("replay.device=cuda", ["replay.device='cuda'", "auto, cpu"]),
            (["experiment=bench_kernels", "bench.device=cuda:1"], ["bench.device='cuda:1'", "auto, cpu"])]


@pytest.mark.parametrize("override,needles", BAD)
def test_bad_values_rejected_naming_key_and_choices(override, needles, hydra_conf):
    cfg = compose(config_name="config", overrides=[override] if isinstance(override, str) else override)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    for n in needles:
        assert n in str(e.value)


def _message(e) -> str:
    """An exception's message with its causes (Hydra wraps OmegaConf's validation errors)."""
    parts = []
    while e is not None:
        parts.append(str(e))
        e = e.__cause__
    return "\n".join(parts)


@pytest.mark.parametrize("override,pattern", [
    ("replay.mode=bad", r"expected one of \[fast, device\].*full_key: replay.mode"),
    ("pool.capacity_blocks=many", r"could not be converted to Integer.*full_key: pool.capacity_blocks"),
    ("policy=nosuch", r"Could not find 'policy/nosuch'.*s3fifo"),
    ("replay.progress=maybe", r"replay.progress"),
])
def test_type_errors_rejected_while_composing(override, pattern, hydra_conf):
    with pytest.raises(Exception) as e:
        compose(config_name="config", overrides=[override])
    assert re.search(pattern, _message(e.value), re.S), _message(e.value)


CLI_BAD = [
    (["policy=nosuch"], ["policy/nosuch", "s3fifo", "sieve"]),
    (["pool.capacity_blocks=-5"], ["pool.capacity_blocks=-5", "positive integer"]),
    (["replay.mode=bad"], ["replay.mode", "fast, device"]),
    # in a sweep the bad job is the last one: nothing may run before it is found
    (["-m", "policy.name=lru,nosuch"], ["policy.name='nosuch'", "lru", "belady"]),
    (["+pool.capacity_block=100"], ["pool.capacity_block", "capacity_blocks"]),
    (["+replay.params.ordr=forward"], ["replay.params.ordr", "order"]),
    (["-m", "workload.params.turn_gap_s=5,-1"], ["workload.params.turn_gap_s", "-1"]),
    (["-m", "pool.capacity_blocks=64,1"], ["pool.capacity_blocks=1", "at least"]),
    (["-m", "policy=s3fifo,lru", "++policy.params.small_ratio=0.2"], ["policy.params.small_ratio", "lru"]),
]


@pytest.mark.parametrize("args,needles", CLI_BAD)
def test_cli_rejects_bad_values_before_writing_anything(args, needles, tmp_path):
    r = _run(args + FAST, cwd=tmp_path, timeout=60)
    assert r.returncode != 0
    for n in needles:
        assert n in r.stderr, r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a rejected run wrote files"


@pytest.mark.skipif(__import__("torch").cuda.device_count() > 7, reason="cuda:7 exists here")
def test_cli_sweep_checks_every_job_device_first(tmp_path):
    r = _run(["-m", "replay.device=cpu,cuda:7", "replay=device", "workload.params.num_requests=2", "logger=none",
              "replay.progress=false"], cwd=tmp_path, timeout=60)
    assert r.returncode != 0
    for n in ["replay.device='cuda:7'", "auto, cpu"]:
        assert n in r.stderr, r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a rejected sweep wrote files"


# ---------------------------------------------------------------------------------- results store

def test_store_is_atomic_and_killed_runs_do_not_look_complete(tmp_path, monkeypatch):
    rs = store.RunStore(tmp_path / "run")
    rs.begin({"a": 1}, "h1")
    assert not store.is_complete(tmp_path / "run")

    real_replace = os.replace

    def crash(src, dst):  # the process dies while renaming result.json into place
        if str(dst).endswith(store.RESULT_FILE):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        rs.finish({"hit_rate": 0.5}, [{"step": 0, "hit_rate": 0.5}])
    monkeypatch.setattr(store.os, "replace", real_replace)
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert store.MARKER not in names and store.RESULT_FILE not in names
    assert not any(n.endswith(".tmp") for n in names), names
    assert store.find_runs(tmp_path) == []

    rs.finish({"hit_rate": 0.5}, [{"step": 0, "hit_rate": 0.5}])
    assert store.is_complete(tmp_path / "run", "h1")
    assert store.find_runs(tmp_path) == [(tmp_path / "run").resolve()]
    # a rerun in the same directory drops the marker before anything else
    rs.begin({"a": 1}, "h1")
    assert not store.is_complete(tmp_path / "run")


def test_config_hash_ignores_logging_but_not_semantics():
    base = {"policy": {"name": "lru"}, "pool": {"capacity_blocks": 10}, "logger": {"kind": "wandb"},
            "replay": {"mode": "fast", "progress": True}}
    h = store.config_hash(base)
    assert h == store.config_hash(dict(base, logger={"kind": "none"}))
    assert h == store.config_hash(dict(base, replay={"mode": "fast", "progress": False}))
    assert h != store.config_hash(dict(base, pool={"capacity_blocks": 11}))
    assert h != store.config_hash(dict(base, replay={"mode": "device", "progress": True}))


def test_execute_in_process_writes_results_then_skips(hydra_conf, tmp_path):
    cfg = compose(config_name="config", overrides=FAST + [f"results.index_dir={tmp_path / 'index'}"])
    first = execute(cfg, tmp_path / "a", run_name="a")
    assert store.is_complete(tmp_path / "a") and 0 < first["metrics"]["hit_rate"] < 1
    second = execute(cfg, tmp_path / "b", run_name="b")
    assert second["reused_from"] == str((tmp_path / "a").resolve())
    assert second["metrics"] == first["metrics"]
    df = harness.load_results([tmp_path / "a", tmp_path / "b"])
    assert len(df) == 1 and not df["reused"].iloc[0]  # one row per configuration, the original
    assert len(harness.load_results(tmp_path, dedupe=False)) == 2

    cfg = compose(config_name="config", overrides=FAST + [f"results.index_dir={tmp_path / 'index'}",
                                                           "results.format=parquet", "results.skip_completed=false"])
    third = execute(cfg, tmp_path / "c")
    assert "reused_from" not in third and (tmp_path / "c" / store.SERIES_PARQUET).is_file()
    assert list(store.load_series(tmp_path / "c")["hit_rate"]) == list(store.load_series(tmp_path / "a")["hit_rate"])


def test_trace_run_on_the_first_requests(hydra_conf, traces_dir, tmp_path):
    cfg = compose(config_name="config", overrides=[
        "workload=mooncake_conversation", f"workload.traces_dir={traces_dir}", "replay.max_requests=300",
        "pool.capacity_blocks=1000", "policy=belady", "logger=none", "replay.progress=false",
        f"results.index_dir={tmp_path / 'index'}"])
    assert cfg.replay.mode.value == "fast"
    res = execute(cfg, tmp_path / "run")
    assert res["metrics"]["requests"] == 300 and 0 < res["metrics"]["hit_rate"] < 1
    assert Path(res["config"]["workload"]["trace_path"]) == traces_dir / "conversation_trace.jsonl"


# ------------------------------------------------------------------------------ sweeps (subprocess)

def test_multirun_writes_four_complete_results_and_rerun_skips(tmp_path):
    sweep = ["-m", "policy=lru,sieve", "pool.capacity_blocks=16,64"] + FAST + [
        f"results.index_dir={tmp_path / 'index'}"]
    r = _run(sweep + [f"hydra.sweep.dir={tmp_path / 'sweep1'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    markers = sorted((tmp_path / "sweep1").rglob(store.MARKER))
    assert len(markers) == 4
    df = harness.load_results(tmp_path / "sweep1")
    assert sorted(zip(df["policy"], df["capacity_blocks"])) == [("lru", 16), ("lru", 64), ("sieve", 16),
                                                                ("sieve", 64)]
    assert df["hit_rate"].between(0, 1).all() and df.groupby("policy")["hit_rate"].apply(
        lambda s: s.is_monotonic_increasing).all()
    series = harness.load_timeseries(tmp_path / "sweep1")
    assert len(series) and {"hit_rate", "policy", "capacity_blocks"} <= set(series.columns)
    before = {m: m.stat().st_mtime_ns for m in markers}

    # the same sweep again, in a fresh directory: every job is found complete and copied
    r = _run(sweep + [f"hydra.sweep.dir={tmp_path / 'sweep2'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("[kvtriton] skipped") == 4, r.stderr[-3000:]
    again = harness.load_results(tmp_path / "sweep2")
    assert len(again) == 4 and again["reused"].all()
    assert {m: m.stat().st_mtime_ns for m in markers} == before
    assert len(harness.load_results([tmp_path / "sweep1", tmp_path / "sweep2"])) == 4

    # a job killed half-way (no marker) runs again; the complete ones are skipped
    victim = markers[0].parent
    (victim / store.MARKER).unlink()
    (tmp_path / "index").joinpath(json.loads((victim / store.RESULT_FILE).read_text())["config_hash"]
                                  + ".json").unlink()
    r = _run(sweep + [f"hydra.sweep.dir={tmp_path / 'sweep1'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("[kvtriton] skipped") == 0  # same dirs: complete ones are skipped silently
    assert store.is_complete(victim) and len(sorted((tmp_path / "sweep1").rglob(store.MARKER))) == 4
    assert {m: m.stat().st_mtime_ns for m in markers if m.parent != victim} == \
        {m: t for m, t in before.items() if m.parent != victim}


def test_wandb_offline_run_logs_series_summary_and_artifact(tmp_path):
    args = FAST[:-2] + ["logger=wandb", "logger.mode=offline", "+replay.params.sample_every=5", "telemetry=console",
                        f"hydra.run.dir={tmp_path / 'run'}", f"results.index_dir={tmp_path / 'index'}"]
    r = _run(args, cwd=tmp_path, WANDB_MODE="online")  # logger.mode wins over the environment
    assert r.returncode == 0, r.stderr[-3000:]
    assert '"name": "kvtriton.harness.run"' in r.stderr  # the console span exporter
    run_dir = tmp_path / "run"
    result = store.read_result(run_dir)
    info = json.loads((run_dir / "wandb.json").read_text())
    assert info["mode"] == "offline"

    from kvtriton.harness.wandb_log import read_offline_run

    logged = read_offline_run(run_dir / "wandb")
    assert logged["run_id"] == info["run_id"]
    local = store.load_series(run_dir)
    steps = [h for h in logged["history"] if "hit_rate" in h]
    assert [h["hit_rate"] for h in steps] == pytest.approx(list(local["hit_rate"]))
    assert logged["summary"]["hit_rate"] == pytest.approx(result["metrics"]["hit_rate"])
    assert logged["summary"]["evictions"] == result["metrics"]["evictions"]
    assert logged["config"]["policy"]["name"] == "lru"
    assert logged["config"]["_config_hash"] == result["config_hash"]
    assert any(a.startswith("results-") for a in logged["artifacts"])


def test_wandb_mode_resolution(monkeypatch, tmp_path):
    from kvtriton.harness.wandb_log import resolve_mode

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_mode("auto") == "offline"
    with pytest.warns(UserWarning, match="offline"):
        assert resolve_mode("online") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled" and resolve_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online" and resolve_mode("offline") == "offline"


class _Collector(http.server.BaseHTTPRequestHandler):
    paths: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).paths.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_otlp_telemetry_reaches_a_collector(tmp_path):
    srv = http.server.HTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        _Collector.paths = []
        endpoint = f"http://127.0.0.1:{srv.server_address[1]}"
        r = _run(FAST + ["telemetry=otlp", f"telemetry.endpoint={endpoint}", f"hydra.run.dir={tmp_path / 'run'}",
                         f"results.index_dir={tmp_path / 'index'}"], cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "/v1/traces" in _Collector.paths and "/v1/metrics" in _Collector.paths
    finally:
        srv.shutdown()


def test_submitit_local_launcher(tmp_path):
    r = _run(["-m", "hydra/launcher=submitit_local", "policy=lru,fifo", "pool.capacity_blocks=32",
              f"hydra.sweep.dir={tmp_path / 'sweep'}", f"results.index_dir={tmp_path / 'index'}"] + FAST,
             cwd=tmp_path, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    df = harness.load_results(tmp_path / "sweep")
    assert sorted(df["policy"]) == ["fifo", "lru"]
    assert (tmp_path / "sweep" / ".submitit").is_dir()


def test_design_suite_preset_stores_its_sections(hydra_conf, tmp_path):
    cfg = compose(config_name="config", overrides=[
        "experiment=bench_suite", "bench.device=cpu", "bench.smoke=true", "bench.args=[--only,6]",
        "logger=none", f"results.index_dir={tmp_path / 'index'}"])
    res = execute(cfg, tmp_path / "suite")
    assert store.is_complete(tmp_path / "suite")
    data = json.loads((tmp_path / "suite" / "bench_suite.json").read_text())
    rec = data["results"]["6_error_recovery"]
    assert rec["exhausted"]["raised"] and rec["exhausted"]["unchanged_by_failed_request"]
    assert res["metrics"]["bench_rows"] == 1


# ------------------------------------------------------------------- names, units, repeats, the CLI

def test_results_carry_the_registered_policy_name(hydra_conf, tmp_path):
    """``policy.name=adaptive`` runs, stores, hashes and loads as ``arc`` (the overrides keep what was
    typed), so a later ``policy=arc`` run of the same config is the same result."""
    index = f"results.index_dir={tmp_path / 'index'}"
    a = execute(compose(config_name="config", overrides=FAST + ["policy.name=adaptive", index]), tmp_path / "a",
                overrides=["policy.name=adaptive"])
    assert a["config"]["policy"]["name"] == "arc" and a["overrides"] == ["policy.name=adaptive"]
    b = execute(compose(config_name="config", overrides=FAST + ["policy=arc", index]), tmp_path / "b")
    assert b["reused_from"] == str((tmp_path / "a").resolve()) and b["config_hash"] == a["config_hash"]
    c = execute(compose(config_name="config", overrides=FAST + ["policy.name=size_aware_lru", index]), tmp_path / "c")
    df = harness.load_results(tmp_path)
    assert sorted(df["policy"]) == ["arc", "gdsf"]
    assert c["config"]["policy"]["name"] == "gdsf"


def test_fast_results_carry_the_capacity_unit_and_timing_spread(hydra_conf, tmp_path):
    cfg = compose(config_name="config", overrides=FAST + ["replay.repeats=3", "pool.capacity_blocks=48",
                                                           f"results.index_dir={tmp_path / 'index'}"])
    m = execute(cfg, tmp_path / "run")["metrics"]
    assert m["repeats"] == 3
    for k in ("seconds", "sim_block_refs_per_s"):  # timings: median with min, max and std beside
        assert m[f"{k}_min"] <= m[k] <= m[f"{k}_max"] and m[f"{k}_std"] >= 0
    assert "hit_rate_min" not in m  # the simulator's counts do not vary between repeats
    assert m["block_tokens"] == 512 and m["capacity_tokens"] == 48 * 512  # multiturn: 512-token blocks
    row = harness.load_results(tmp_path / "run").iloc[0]
    assert (row["capacity_blocks"], row["block_tokens"], row["capacity_tokens"], row["repeats"]) == (48, 512, 48 * 512, 3)


def test_combine_repeats_gives_every_varying_number_its_spread():
    runs = [({"hit_rate": h, "ttft_s_p50": t, "evictions": 5, "device": "cpu"}, [{"step": i}])
            for i, (h, t) in enumerate([(0.5, 1.0), (0.7, 3.0), (0.6, 2.0)])]
    m, series = adapters.combine_repeats(runs)
    assert series == [{"step": 0}] and m["repeats"] == 3 and m["device"] == "cpu"
    assert (m["ttft_s_p50"], m["ttft_s_p50_min"], m["ttft_s_p50_max"]) == (2.0, 1.0, 3.0)
    assert m["hit_rate"] == 0.6 and m["hit_rate_min"] == 0.5 and m["hit_rate_max"] == 0.7  # varied: spread too
    assert m["evictions"] == 5 and "evictions_min" not in m
    assert m["ttft_s_p50_std"] == pytest.approx(1.0)


def test_console_script_commands(tmp_path):
    from kvtriton.replay import DeviceReplayConfig

    cli = [sys.executable, "-m", "kvtriton.harness"]
    r = subprocess.run(cli + ["knobs"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0
    for name in DeviceReplayConfig.docs():
        assert f"replay.{name} " in r.stdout, name
    r = subprocess.run(cli + ["run", "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0 and "kvtriton run" in r.stdout and "kvtriton knobs" in r.stdout
    assert "policy: adaptive, arc" in r.stdout, r.stdout[-2000:]
    r = subprocess.run(cli + ["nosuch"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and "unknown command" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
