"""Structured configs of the experiment harness, registered in Hydra's ConfigStore, and their checks.

The dataclasses give every key its type (OmegaConf rejects ``pool.capacity_blocks=abc`` and
``replay.mode=bad`` while composing, naming the key and, for enums, the valid values). The device
replay's knobs are not repeated here: ``ReplayConf`` is built from the fields of the library's
``kvtriton.replay.DeviceReplayConfig`` (type, default, description), so every field is a
``replay.<field>`` key and a new field needs no change here; the yaml files in ``conf/`` hold only
what differs from these schemas. ``validate`` adds the checks a type cannot express (keys added with
``+`` that the schema does not have, registered policy and workload names, positive sizes, devices this
machine has, the device knobs by ``DeviceReplayConfig.validate``, the ``*.params`` against the library's
signatures and checks, the workload against the pool) and raises ``ConfigError`` naming the key and the
valid values; the harness calls it before any output is written.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from kvtriton.checks import is_int, is_number
from kvtriton.quality.config import QualityConfig
from kvtriton.quality.config import knob_fields as quality_knobs
from kvtriton.replay import DeviceReplayConfig

CONF_DIR = Path(__file__).resolve().parent / "conf"


def plain(node) -> Any:
    """A config node as plain Python (lists become tuples where the library expects ranges)."""
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, dict):
        return {k: plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return tuple(plain(v) for v in node)
    return node


def project_root() -> Path | None:
    """The clone this package runs from (``pyproject.toml`` and ``experiments/`` beside ``kvtriton/``), or
    None for an installed package."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "experiments").is_dir() and (root / "kvtriton").is_dir():
        return root
    return None


# The project root in a clone (an editable install); None where the package is installed.
PROJECT_ROOT = project_root()


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the valid values."""

    def __init__(self, key: str, value: Any, expected: str, message: str | None = None):
        self.key, self.value, self.expected = key, value, expected
        super().__init__(message or f"invalid config value {key}={value!r}: expected {expected}")


class Task(str, enum.Enum):
    replay = "replay"
    bench_kernels = "bench_kernels"
    bench_memory = "bench_memory"
    bench_suite = "bench_suite"
    token_eviction = "token_eviction"   # one quality evaluation under token eviction (kvtriton.quality)


class ReplayMode(str, enum.Enum):
    fast = "fast"
    device = "device"


class LoggerKind(str, enum.Enum):
    none = "none"
    wandb = "wandb"


class WandbMode(str, enum.Enum):
    auto = "auto"          # WANDB_MODE if set, else online with credentials, else offline
    online = "online"
    offline = "offline"
    disabled = "disabled"


class Exporter(str, enum.Enum):
    none = "none"
    console = "console"
    otlp = "otlp"


class ResultFormat(str, enum.Enum):
    json = "json"
    parquet = "parquet"


@dataclass
class ModelConf:
    """A model KV shape: a preset of ``kvtriton.spec.PRESETS`` (``replay.num_layers``, ``replay.dtype`` and
    ``replay.block_size`` override its shape in the device replay)."""

    preset: str = "tiny"


@dataclass
class PoolConf:
    """The KV pool's size: ``capacity_blocks`` blocks of the replay's unit (``block_tokens`` in every
    result: the workload's blocks in fast mode, the model's ``block_size`` in device mode), or a byte
    budget for the device replay's arena."""

    capacity_blocks: Optional[int] = 2048
    budget_mb: Optional[float] = None     # instead of capacity_blocks (device mode)


@dataclass
class PolicyConf:
    """An eviction policy by registered name (or alias) and its constructor's keyword arguments."""

    name: str = "lru"
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class WorkloadConf:
    """A request stream by ``kvtriton.workloads.make_workload`` name and its keyword arguments."""

    name: str = "zipf"
    params: Dict[str, Any] = field(default_factory=dict)
    traces_dir: Optional[str] = None   # Mooncake traces only
    trace_path: Optional[str] = None   # Mooncake traces only; a file, overrides traces_dir
    seed: int = 0                      # synthetic workloads only
    replay_mode: ReplayMode = ReplayMode.device  # the mode replay=auto runs


# ---------------------------------------------------------------------------------------- replay

# The harness's own replay keys; every other key of ``replay`` is a field of DeviceReplayConfig.
_REPLAY_OWN = (
    ("mode", ReplayMode, field(default=ReplayMode.device, metadata={
        "doc": "fast (the tensor-free simulator) or device (the serving loop on the kernels)"})),
    ("repeats", int, field(default=1, metadata={
        "doc": "run the replay this many times: timings are the median, with _min, _max and _std beside"})),
    ("progress", bool, field(default=True, metadata={"doc": "a progress bar"})),
    ("params", Dict[str, Any], field(default_factory=dict, metadata={
        "doc": "the fast replay's keyword arguments (kvtriton.replay.simulate): order, sample_every"})),
)
_SCALARS = (int, float, bool, str)


def _schema_type(hint):
    """The OmegaConf type of a dataclass annotation (``int | None`` -> ``Optional[int]``; others: Any)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and rest[0] in _SCALARS:
            return Optional[rest[0]] if len(rest) < len(args) else rest[0]
        return Any
    return hint if hint in _SCALARS else Any


def device_knobs() -> list[dataclasses.Field]:
    """The device replay's knobs: the fields of ``DeviceReplayConfig``, each a ``replay.<field>`` key."""
    return list(dataclasses.fields(DeviceReplayConfig))


def _replay_schema() -> type:
    hints = typing.get_type_hints(DeviceReplayConfig)
    own = {name for name, _, _ in _REPLAY_OWN}
    clash = own & {f.name for f in device_knobs()}
    if clash:  # pragma: no cover - a new DeviceReplayConfig field named like a harness key
        raise TypeError(f"DeviceReplayConfig fields {sorted(clash)} clash with the harness's replay keys")
    knobs = [(f.name, _schema_type(hints[f.name]), field(default=f.default, metadata=dict(f.metadata)))
             for f in device_knobs()]
    cls = dataclasses.make_dataclass("ReplayConf", list(_REPLAY_OWN[:3]) + knobs + [_REPLAY_OWN[3]])
    cls.__module__ = __name__
    cls.__doc__ = ("How the workload is replayed: the fast CPU simulator or the device serving loop. Besides "
                   "mode, repeats, progress and params, every key is a field of "
                   "kvtriton.replay.DeviceReplayConfig, with its type and default.")
    return cls


ReplayConf = _replay_schema()


def _quality_schema() -> type:
    """``quality.<field>``: the fields of ``kvtriton.quality.QualityConfig`` (type, default, doc)."""
    hints = typing.get_type_hints(QualityConfig)
    knobs = []
    for f in quality_knobs():
        default = {"default_factory": f.default_factory} if f.default is dataclasses.MISSING else {"default": f.default}
        hint = hints[f.name] if typing.get_origin(hints[f.name]) is dict else _schema_type(hints[f.name])
        knobs.append((f.name, hint, field(**default, metadata=dict(f.metadata))))
    cls = dataclasses.make_dataclass("QualityConf", knobs)
    cls.__module__ = __name__
    cls.__doc__ = ("task=token_eviction: one quality evaluation (kvtriton.quality.evaluate); every key is a "
                   "field of kvtriton.quality.QualityConfig, with its type and default.")
    return cls


QualityConf = _quality_schema()


@dataclass
class LoggerConf:
    kind: LoggerKind = LoggerKind.none
    project: str = "kvtriton"
    entity: Optional[str] = None
    mode: WandbMode = WandbMode.auto
    tags: List[str] = field(default_factory=list)
    log_artifacts: bool = True
    dir: Optional[str] = None  # W&B's files (runs, cache, artifact staging); null: $WANDB_DIR, else the run dir


@dataclass
class TelemetryConf:
    exporter: Exporter = Exporter.none
    endpoint: str = "http://localhost:4318"  # OTLP over HTTP; /v1/traces and /v1/metrics are appended
    service_name: str = "kvtriton"
    export_interval_ms: int = 5000
    headers: Dict[str, str] = field(default_factory=dict)


@dataclass
class BenchConf:
    """The benchmark scripts' command-line arguments (task bench_kernels / bench_memory)."""

    device: str = "auto"
    smoke: bool = False
    args: List[str] = field(default_factory=list)
    timeout_s: Optional[int] = None


@dataclass
class ResultsConf:
    format: ResultFormat = ResultFormat.json   # the time series: json (always available) or parquet
    skip_completed: bool = True
    index_dir: str = "results/index"           # relative to the directory the run starts in


@dataclass
class RunConfig:
    """The primary config (``conf/config.yaml`` composes onto this schema)."""

    name: str = "replay"
    task: Task = Task.replay
    seed: int = 0
    model: ModelConf = field(default_factory=ModelConf)
    pool: PoolConf = field(default_factory=PoolConf)
    policy: PolicyConf = field(default_factory=PolicyConf)
    workload: WorkloadConf = field(default_factory=WorkloadConf)
    replay: ReplayConf = field(default_factory=ReplayConf)  # built from DeviceReplayConfig's fields
    logger: LoggerConf = field(default_factory=LoggerConf)
    telemetry: TelemetryConf = field(default_factory=TelemetryConf)
    bench: BenchConf = field(default_factory=BenchConf)
    quality: QualityConf = field(default_factory=QualityConf)  # built from QualityConfig's fields
    results: ResultsConf = field(default_factory=ResultsConf)


_REGISTERED = False


def register_configs() -> None:
    """Register the schema (``base_config``) and OmegaConf resolvers; idempotent."""
    global _REGISTERED
    if _REGISTERED:
        return
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
    register_resolvers()
    _REGISTERED = True


def _project_path(rel: str = "") -> str:
    base = PROJECT_ROOT if PROJECT_ROOT is not None else Path.cwd()
    return os.path.normpath(str(base / rel)) if rel else str(base)


def _run_id() -> str:
    import secrets

    return secrets.token_hex(3)


def _num_gpus() -> int:
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:  # pragma: no cover - torch is a hard dependency
        return 1


def register_resolvers() -> None:
    # ${kvt.path:REL}: REL relative to the project root as an absolute path, independent of the working
    # directory, in a clone; relative to the working directory where the package is installed.
    if not OmegaConf.has_resolver("kvt.path"):
        OmegaConf.register_new_resolver("kvt.path", _project_path)
    if not OmegaConf.has_resolver("kvt.num_gpus"):
        OmegaConf.register_new_resolver("kvt.num_gpus", _num_gpus)
    # ${kvt.run_id:}: random hex, fixed per config (cached in its root like ${now:...}; Hydra copies the
    # cache into every job of a sweep, so a sweep's jobs agree on it, in other processes too).
    if not OmegaConf.has_resolver("kvt.run_id"):
        OmegaConf.register_new_resolver("kvt.run_id", _run_id, use_cache=True)


register_configs()  # the schema is "base_config" in conf/config.yaml's defaults: registered on import


# ------------------------------------------------------------------------------------------- checks

PER_REQUEST = "per_request"  # model.preset: each request's ``model`` field names its preset
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def _positive_int(key: str, v, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if not is_int(v) or v < 1:
        raise ConfigError(key, v, "a positive integer" + (" or null" if allow_none else ""))


def _positive_float(key: str, v) -> None:
    if not is_number(v) or not v > 0 or not math.isfinite(v):
        raise ConfigError(key, v, "a positive finite number")


def _check_keys(node: DictConfig, schema: type, prefix: str = "") -> None:
    """ConfigError for a key the schema does not have (``+pool.capacity_block=100``, a typo, would
    otherwise run with the default). Mappings typed ``Dict[str, Any]`` (the ``params``) are checked
    against the library's signatures instead (``adapters.check_params``)."""
    hints = typing.get_type_hints(schema)
    fields = [f.name for f in dataclasses.fields(schema)]
    for k in node.keys():
        if not prefix and k == "hydra":
            continue
        key = f"{prefix}{k}"
        if k not in hints:
            try:
                value = node[k]
            except Exception:
                value = "?"
            close = difflib.get_close_matches(str(k), fields, n=1)
            where = prefix.rstrip(".") or "the config"
            raise ConfigError(key, value, "", message=(
                f"unknown config key {key}={value!r}: {where} has the keys {', '.join(fields)}"
                + (f" (did you mean {prefix}{close[0]}?)" if close else "")))
        if dataclasses.is_dataclass(hints[k]):
            sub = node._get_node(k)
            if isinstance(sub, DictConfig) and not sub._is_none() and not sub._is_missing():
                _check_keys(sub, hints[k], f"{key}.")


def _check_device(key: str, spec: str) -> None:
    """ConfigError where ``spec`` names a CUDA device this machine does not have."""
    if not spec.startswith("cuda"):
        return
    from . import adapters

    try:
        adapters.resolve_device(spec, name=key)
    except ValueError:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        valid = "auto, cpu" + "".join(f", cuda:{i}" for i in range(n))
        raise ConfigError(key, spec, valid + ("" if n else " (no CUDA device is visible here)")) from None


def check_knobs(knobs: dict) -> None:
    """``DeviceReplayConfig(**knobs).validate()`` (the device itself not resolved: ``_check_device`` does
    that where the job runs), as ``ConfigError`` naming ``replay.<field>``."""
    try:
        DeviceReplayConfig(**dict(knobs, device="cpu")).validate()
    except ValueError as e:
        msg = str(e)
        m = re.match(r"config\.(\w+) must be (.*), got .*$", msg, re.S)
        name = m.group(1) if m else next((f.name for f in device_knobs() if f"config.{f.name}" in msg), None)
        if name is None:  # pragma: no cover - a check whose message names no field
            raise ConfigError("replay", knobs, "", message=f"invalid device replay knobs: {msg}") from None
        if m:
            raise ConfigError(f"replay.{name}", knobs.get(name), m.group(2)) from None
        raise ConfigError(f"replay.{name}", knobs.get(name), "", message=msg.replace("config.", "replay.")) from None


def validate(cfg: DictConfig, *, check_devices: bool = True, check_workload: bool = True) -> None:
    """Check ``cfg`` (a composed ``RunConfig``) beyond its types; raise ``ConfigError`` on the first bad key.

    Unknown keys, names against the registries, sizes and ranges, the ``*.params`` against the library's
    signatures and checks, CUDA devices against this machine (``check_devices``; a launcher that runs jobs
    on other machines checks them there), and, with ``check_workload``, the workload itself: it is
    built (``workload.params`` values) and the pool must hold its largest request. Nothing is written.
    """
    from . import adapters

    _check_keys(cfg, RunConfig)
    _check_model(cfg)
    _check_pool(cfg)
    _check_policy(cfg)
    _check_workload(cfg)
    _check_replay(cfg)
    _check_telemetry(cfg)
    _check_bench(cfg)
    _check_quality(cfg)
    if check_devices:
        _check_devices_present(cfg)
    # the library's arguments, then the workload itself
    adapters.check_params(cfg)
    if check_workload and _get(cfg, "task") is Task.replay:
        adapters.check_capacity(cfg, adapters.build_workload(cfg))


def _get(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, throw_on_missing=True)


def _is_device_replay(cfg: DictConfig) -> bool:
    return _get(cfg, "task") is Task.replay and _get(cfg, "replay.mode") is ReplayMode.device


def _check_model(cfg: DictConfig) -> None:
    """``model.preset``: a registered preset, or per_request."""
    from . import adapters

    presets = sorted(adapters.model_presets()) + [PER_REQUEST]
    if _get(cfg, "model.preset") not in presets:
        raise ConfigError("model.preset", _get(cfg, "model.preset"), f"one of {', '.join(presets)}")


def _check_pool(cfg: DictConfig) -> None:
    """``pool.capacity_blocks`` and ``pool.budget_mb``: at least one set, each positive."""
    cap, budget = _get(cfg, "pool.capacity_blocks"), _get(cfg, "pool.budget_mb")
    if cap is None and budget is None:
        raise ConfigError("pool.capacity_blocks", cap, "a positive integer (or set pool.budget_mb)")
    _positive_int("pool.capacity_blocks", cap, allow_none=budget is not None)
    if budget is not None:
        _positive_float("pool.budget_mb", budget)


def _check_policy(cfg: DictConfig) -> None:
    """``policy.name``: registered; on the device replay, an online policy, and with per-request models
    the shared arena sized by ``pool.budget_mb``."""
    from . import adapters

    name = _get(cfg, "policy.name")
    policies = adapters.policy_names()
    if policies is not None and adapters.canonical_policy(name) is None:
        raise ConfigError("policy.name", name, f"one of {', '.join(policies)}")
    if not _is_device_replay(cfg):
        return
    offline = adapters.offline_policies()
    if adapters.canonical_policy(name) in offline:
        online = [p for p in adapters.policy_names() if adapters.canonical_policy(p) not in offline]
        raise ConfigError("policy.name", name,
                          f"a policy the device replay can run ({', '.join(online)}), or replay=fast "
                          f"(an offline policy needs the trace's future)")
    budget = _get(cfg, "pool.budget_mb")
    if _get(cfg, "model.preset") == PER_REQUEST and budget is None:
        raise ConfigError("pool.budget_mb", budget, f"a positive number with model.preset={PER_REQUEST} "
                          "(the shared arena's size; e.g. pool=budget)")


def _check_workload(cfg: DictConfig) -> None:
    """``workload.name``: registered; a Mooncake workload's trace file exists."""
    from . import adapters

    workloads = adapters.workload_names()
    wname = str(_get(cfg, "workload.name")).lower().replace("-", "_")
    if wname not in workloads:
        raise ConfigError("workload.name", _get(cfg, "workload.name"), f"one of {', '.join(workloads)}")
    if wname.startswith("mooncake"):
        path = adapters.trace_file(cfg.workload)
        if path is not None and not Path(path).is_file():
            raise ConfigError("workload.trace_path", str(path),
                              "an existing Mooncake JSONL file (set workload.traces_dir, workload.trace_path "
                              "or $KVTRITON_TRACES; the traces come from github.com/kvcache-ai/Mooncake, "
                              "FAST25-release/traces)")


def _check_replay(cfg: DictConfig) -> None:
    """The device knobs by ``DeviceReplayConfig``'s own checks (the device's form here, its presence in
    ``_check_devices_present``), ``replay.repeats``, and the fast replay's capacity."""
    from . import adapters

    dev = str(_get(cfg, "replay.device"))
    if not _DEVICE_RE.match(dev):
        raise ConfigError("replay.device", dev, "one of auto, cpu, cuda, cuda:N")
    check_knobs(adapters.replay_knobs(cfg))
    _positive_int("replay.repeats", _get(cfg, "replay.repeats"))
    cap = _get(cfg, "pool.capacity_blocks")
    if _get(cfg, "task") is Task.replay and _get(cfg, "replay.mode") is ReplayMode.fast and cap is None:
        raise ConfigError("pool.capacity_blocks", cap, "a positive integer with replay.mode=fast (pool.budget_mb "
                          "sizes the device replay's arena only)")


def _check_telemetry(cfg: DictConfig) -> None:
    """The OTLP endpoint's form and the export interval."""
    if _get(cfg, "telemetry.exporter") == Exporter.otlp:
        ep = str(_get(cfg, "telemetry.endpoint"))
        if not re.match(r"^https?://", ep):
            raise ConfigError("telemetry.endpoint", ep, "an http:// or https:// URL")
    _positive_int("telemetry.export_interval_ms", _get(cfg, "telemetry.export_interval_ms"))


def _check_bench(cfg: DictConfig) -> None:
    """``bench.*``, and for a benchmark task its script (and ``--smoke`` where ``bench.smoke`` asks for it)."""
    from . import adapters

    bdev = str(_get(cfg, "bench.device"))
    if not _DEVICE_RE.match(bdev):
        raise ConfigError("bench.device", bdev, "one of auto, cpu, cuda, cuda:N")
    _positive_int("bench.timeout_s", _get(cfg, "bench.timeout_s"), allow_none=True)
    task = _get(cfg, "task")
    if task in (Task.replay, Task.token_eviction):
        return
    script = adapters.bench_script(task.value)
    if not script.is_file():
        raise ConfigError("task", task.value, "", message=(
            f"task={task.value} runs the benchmark script {script}, which is not there: the benchmark "
            f"scripts live in a clone of the project (experiments/); run from one, or set "
            f"$KVTRITON_EXPERIMENTS to its experiments folder"))
    if _get(cfg, "bench.smoke") and not adapters.script_has_flag(script, "--smoke"):
        raise ConfigError("bench.smoke", True, f"false for task={task.value} ({script.name} has no --smoke; "
                          "pass smaller sizes in bench.args)")


def _check_devices_present(cfg: DictConfig) -> None:
    """The CUDA devices the run will use exist on this machine."""
    if _is_device_replay(cfg):
        _check_device("replay.device", str(_get(cfg, "replay.device")))
    if _get(cfg, "task") is Task.token_eviction:
        _check_device("quality.device", str(_get(cfg, "quality.device")))
    elif _get(cfg, "task") is not Task.replay:
        _check_device("bench.device", str(_get(cfg, "bench.device")))


def _check_quality(cfg: DictConfig) -> None:
    """``quality.*`` by ``QualityConfig.validate`` (as ``ConfigError`` naming ``quality.<field>``), the device's
    form, the model path, and, for task=token_eviction with a strategy other than full, token eviction in
    the engine."""
    knobs = plain(_get(cfg, "quality"))
    knobs["strategy_kwargs"] = dict(knobs.get("strategy_kwargs") or {})
    try:
        qc = QualityConfig(**knobs).validate()
    except ValueError as e:
        msg = str(e)
        m = re.match(r"config\.(\w+) must be (.*), got .*$", msg, re.S)
        if m:
            raise ConfigError(f"quality.{m.group(1)}", knobs.get(m.group(1)), m.group(2)) from None
        raise ConfigError("quality", knobs, "", message=msg.replace("config.", "quality.")) from None
    if not _DEVICE_RE.match(str(qc.device)):
        raise ConfigError("quality.device", qc.device, "one of auto, cpu, cuda, cuda:N")
    if qc.model != "smollm2" and not Path(qc.model).expanduser().exists():
        raise ConfigError("quality.model", qc.model, "smollm2 or an existing local model directory or .gguf file")
    if _get(cfg, "task") is Task.token_eviction and qc.strategy != "full":
        from kvtriton.quality.evaluate import engine_supports_eviction

        if not engine_supports_eviction():
            raise ConfigError("quality.strategy", qc.strategy, "full: this kvtriton.hf.PagedEngine has no token "
                              "eviction (token_eviction=...) yet")
