"""One schema per knob: the device replay's knobs are the fields of ``DeviceReplayConfig``, the yaml files
hold only what differs from the schemas, and every config of every group (and every job of every preset
sweep) composes, validates and builds the library's objects."""

from __future__ import annotations

import dataclasses
import enum
import subprocess
import sys
import typing
from dataclasses import MISSING
from pathlib import Path

import pytest
import yaml
from hydra import compose
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from kvtriton.harness import adapters, config
from kvtriton.harness.config import CONF_DIR, RunConfig, validate
from kvtriton.policies import make_policy
from kvtriton.replay import DeviceReplayConfig

ROOT = Path(__file__).resolve().parents[1]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# ------------------------------------------------------------------------------- the device knobs

def _scalar_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0]


def _other_value(f: dataclasses.Field, hint):
    """A valid value of knob ``f`` other than its default, chosen by its type alone (so a new knob needs
    nothing here)."""
    kind, d = _scalar_type(hint), f.default
    if kind is bool:
        return True if d is None else not d
    if kind is int:
        return (d or 1) * 2 + 1
    if kind is float:
        return d / 2 if d else 0.25
    if kind is str:
        for cand in ("cpu", "bfloat16", "model", "random:tiny", "x"):
            try:
                DeviceReplayConfig(**{f.name: cand}).validate()
            except ValueError:
                continue
            if cand != d:
                return cand
    raise AssertionError(f"DeviceReplayConfig.{f.name}: no test value for type {hint}")


def _knob_overrides() -> dict:
    hints = typing.get_type_hints(DeviceReplayConfig)
    return {f.name: _other_value(f, hints[f.name]) for f in dataclasses.fields(DeviceReplayConfig)}


def _override(name, value) -> str:
    return f"replay.{name}={str(value).lower() if isinstance(value, bool) else value}"


def test_every_device_knob_is_a_replay_key_with_the_dataclass_default(hydra_conf):
    cfg = compose(config_name="config", overrides=["replay=device"])
    for f in dataclasses.fields(DeviceReplayConfig):
        assert f.name in cfg.replay, f"DeviceReplayConfig.{f.name} has no replay.{f.name} key"
        assert cfg.replay[f.name] == f.default, f"replay.{f.name}={cfg.replay[f.name]!r}, the dataclass says {f.default!r}"
    assert adapters.device_replay_config(cfg, "cpu") == DeviceReplayConfig(device="cpu")


def test_every_device_knob_is_settable_and_reaches_the_dataclass(hydra_conf, monkeypatch):
    """``replay.<field>=VALUE`` for every field of DeviceReplayConfig, all at once, reaches the config that
    ``replay_device`` is called with."""
    values = _knob_overrides()
    cfg = compose(config_name="config",
                  overrides=["replay=device"] + [_override(k, v) for k, v in values.items()])
    config.check_knobs(adapters.replay_knobs(cfg))
    seen = {}

    class Result:
        summary, timeseries = {}, []

    def fake_replay(requests, model, policy, *, config, **kw):
        seen["config"] = config
        return Result()

    import kvtriton.replay

    monkeypatch.setattr(kvtriton.replay, "replay_device", fake_replay)
    adapters.run_device(cfg, [], "cpu", progress=False)
    got = seen["config"]
    assert isinstance(got, DeviceReplayConfig)
    for name, value in values.items():
        assert getattr(got, name) == value, f"replay.{name}={value!r} reached the replay as {getattr(got, name)!r}"
        assert getattr(got, name) != getattr(DeviceReplayConfig(), name)


def test_device_knobs_from_the_command_line(tmp_path):
    """The same through the real command line (``--cfg job`` prints the composed config)."""
    values = _knob_overrides()
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), "--cfg", "job", "replay=device"]
                       + [_override(k, v) for k, v in values.items()],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    replay = yaml.safe_load(r.stdout)["replay"]
    for name, value in values.items():
        assert replay[name] == value, (name, replay[name], value)


def test_a_new_knob_needs_only_the_dataclass(monkeypatch):
    """The replay schema is built from DeviceReplayConfig's fields: a field added there is a replay key."""
    extended = dataclasses.make_dataclass(
        "Extended", [("new_knob", "int | None", dataclasses.field(default=7, metadata={"doc": "x"}))],
        bases=(DeviceReplayConfig,))
    extended.__module__ = DeviceReplayConfig.__module__
    monkeypatch.setattr(config, "DeviceReplayConfig", extended)
    schema = config._replay_schema()
    node = OmegaConf.structured(schema)
    assert node.new_knob == 7 and "new_knob" in [f.name for f in dataclasses.fields(schema)]
    node.new_knob = 3
    with pytest.raises(Exception):
        node.new_knob = "many"  # typed from the dataclass's annotation


# ------------------------------------------------------------------------- the yaml files are lean

_GROUP_SCHEMA = {"model": config.ModelConf, "pool": config.PoolConf, "policy": config.PolicyConf,
                 "workload": config.WorkloadConf, "replay": config.ReplayConf, "logger": config.LoggerConf,
                 "telemetry": config.TelemetryConf}


# The key that names a group's option (model/tiny.yaml says preset: tiny, even where that is the default).
_IDENTITY = {"model": "preset", "policy": "name", "workload": "name", "replay": "mode", "logger": "kind",
             "telemetry": "exporter"}


def _default(f: dataclasses.Field):
    return f.default if f.default is not MISSING else f.default_factory()


def _same(value, default) -> bool:
    if isinstance(default, enum.Enum):
        default = default.value
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(default, (list, tuple)):
        default = tuple(default)
    return type(value) is type(default) and value == default or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(default, (int, float))
        and not isinstance(default, bool) and value == default)


def _repeated(node: dict, schema: type, where: str) -> list[str]:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema, vars(config))
    out = []
    for key, value in node.items():
        if key in ("defaults", "hydra") or key not in fields:
            continue
        if dataclasses.is_dataclass(hints[key]):
            if isinstance(value, dict):
                out += _repeated(value, hints[key], f"{where}.{key}")
            continue
        if isinstance(value, str) and "${" in value:
            continue
        if _same(value, _default(fields[key])):
            out.append(f"{where}.{key}: {value!r}")
    return out


def test_no_yaml_repeats_a_schema_default():
    """Every key in conf/ differs from its schema's default: DeviceReplayConfig's for replay.<field>, the
    harness's dataclasses for the rest (the policies' and workloads' params are the library's keyword
    arguments, listed so that they can be overridden without '+')."""
    repeated = []
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        rel = path.relative_to(CONF_DIR)
        if rel.parts[0] == "hydra":
            continue
        node = yaml.safe_load(path.read_text()) or {}
        if rel.parts[0] in _GROUP_SCHEMA:
            node = {k: v for k, v in node.items() if k != _IDENTITY.get(rel.parts[0])}
            repeated += _repeated(node, _GROUP_SCHEMA[rel.parts[0]], str(rel))
        else:  # the primary config and the experiment presets (global)
            repeated += _repeated(node, RunConfig, str(rel))
    assert not repeated, "yaml keys that repeat their schema's default:\n" + "\n".join(repeated)


def test_replay_group_files_only_choose_the_mode():
    for opt in _options("replay"):
        node = yaml.safe_load((CONF_DIR / "replay" / f"{opt}.yaml").read_text())
        assert set(node) == {"mode"}, (opt, node)


# ------------------------------------------------------------------ every config composes and builds

def _builds(cfg) -> None:
    """Validate ``cfg`` and build what a run would: the policy, the workload, the device replay's config."""
    validate(cfg)
    OmegaConf.to_container(cfg, resolve=True)
    task = getattr(cfg.task, "value", cfg.task)
    if task == "token_eviction":
        adapters.quality_config(cfg).validate()
        return
    if task != "replay":
        assert adapters.bench_script(task).is_file()
        return
    make_policy(adapters.canonical_policy(cfg.policy.name), **(adapters.plain(cfg.policy.params) or {}))
    assert adapters.build_workload(cfg)
    dcfg = adapters.device_replay_config(cfg, "cpu")
    dcfg.validate()


@pytest.mark.parametrize("group", ["model", "pool", "policy", "workload", "replay", "logger", "telemetry",
                                   "experiment"])
def test_every_config_of_every_group_composes_and_builds(group, hydra_conf, fake_traces):
    needs = {("model", "per_request"): ["pool=budget", "workload=design_mix"], ("policy", "belady"): ["replay=fast"]}
    for opt in _options(group):
        _builds(compose(config_name="config", overrides=[f"{group}={opt}"] + needs.get((group, opt), [])))


@pytest.mark.parametrize("preset", _options("experiment"))
def test_every_job_of_every_preset_sweep_composes_and_builds(preset, hydra_conf, fake_traces):
    cfg = compose(config_name="config", overrides=[f"experiment={preset}"], return_hydra_config=True)
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    parser = OverridesParser.create()
    jobs = BasicSweeper.split_arguments(parser.parse_overrides([f"{k}={v}" for k, v in params.items()]), None)[0] \
        if params else [[]]
    assert jobs
    for job in jobs:
        _builds(compose(config_name="config", overrides=[f"experiment={preset}", *job]))
