"""Structured configs of the experiment harness, registered in Hydra's ConfigStore, and their checks.

The dataclasses give every key its type (OmegaConf rejects ``pool.capacity_blocks=abc`` and
``replay.mode=bad`` while composing, naming the key and, for enums, the valid values). ``validate``
adds the checks a type cannot express (keys added with ``+`` that the schema does not have, registered
policy and workload names, positive sizes, devices this machine has, the ``*.params`` against the
library's signatures and checks, the workload against the pool) and raises ``ConfigError`` naming the
key and the valid values; the harness calls it before any output is written.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = PROJECT_ROOT / "conf"


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
    """A model KV shape: a preset of ``kvtriton.spec.PRESETS``, optionally with fewer layers."""

    preset: str = "tiny"
    num_layers: Optional[int] = None  # None: the preset's; fewer layers scale device replay down
    dtype: Optional[str] = None       # None: the preset's


@dataclass
class PoolConf:
    """The KV pool: its capacity (blocks, or a byte budget), block size, chunking and compaction."""

    capacity_blocks: Optional[int] = 2048
    budget_mb: Optional[float] = None     # alternative to capacity_blocks (device mode)
    block_size: Optional[int] = None      # tokens per block; None: the model preset's
    chunk_mb: float = 2.0                 # arena growth unit
    compaction_threshold: Optional[float] = 0.3  # external fragmentation that triggers compaction; null: never


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


@dataclass
class ReplayConf:
    """How the workload is replayed: the fast CPU simulator or the device serving loop.

    The device-mode fields mirror ``kvtriton.replay.device.DeviceReplayConfig``."""

    mode: ReplayMode = ReplayMode.device
    device: str = "auto"                        # auto | cpu | cuda | cuda:N
    max_requests: Optional[int] = None          # first N requests
    time_compression: float = 1.0               # device: arrivals at arrival_s / time_compression
    ignore_arrivals: bool = False               # device: every request arrives at time 0
    max_input_tokens: Optional[int] = None      # device: truncate prompts
    max_output_tokens: Optional[int] = None     # device: cap generated tokens
    max_batch: int = 64                         # device: running sequences at most
    prefill_s_per_token: float = 1e-4           # device: prefill cost model
    compaction_check_every: int = 16            # device: steps between fragmentation checks
    series_every: Optional[int] = None          # a time-series point every N steps (device) / requests
                                                # (fast); None: every step / about 200 points
    progress: bool = True
    seed: int = 0
    # the replay's arguments that have no key of their own, checked against its signature:
    # fast: order (prefix | forward); device: DeviceReplayConfig's step_time_s, preallocate,
    # check_invariants, warmup
    params: Dict[str, Any] = field(default_factory=dict)


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
    replay: ReplayConf = field(default_factory=ReplayConf)
    logger: LoggerConf = field(default_factory=LoggerConf)
    telemetry: TelemetryConf = field(default_factory=TelemetryConf)
    bench: BenchConf = field(default_factory=BenchConf)
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
    return os.path.normpath(str(PROJECT_ROOT / rel)) if rel else str(PROJECT_ROOT)


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
    # ${kvt.path:REL}: REL relative to the project root, absolute, independent of the working directory.
    if not OmegaConf.has_resolver("kvt.path"):
        OmegaConf.register_new_resolver("kvt.path", _project_path)
    if not OmegaConf.has_resolver("kvt.num_gpus"):
        OmegaConf.register_new_resolver("kvt.num_gpus", _num_gpus)
    # ${kvt.run_id:}: random hex, fixed per config (cached in its root like ${now:...}; Hydra copies the
    # cache into every job of a sweep, so a sweep's jobs agree on it, in other processes too).
    if not OmegaConf.has_resolver("kvt.run_id"):
        OmegaConf.register_new_resolver("kvt.run_id", _run_id, use_cache=True)


# ------------------------------------------------------------------------------------------- checks

PER_REQUEST = "per_request"  # model.preset: each request's ``model`` field names its preset
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def _positive_int(key: str, v, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(key, v, "a positive integer" + (" or null" if allow_none else ""))


def _positive_float(key: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v != v or v == float("inf"):
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
        adapters.resolve_device(spec)
    except ValueError:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        valid = "auto, cpu" + "".join(f", cuda:{i}" for i in range(n))
        raise ConfigError(key, spec, valid + ("" if n else " (no CUDA device is visible here)")) from None


def validate(cfg: DictConfig, *, check_devices: bool = True, check_workload: bool = True) -> None:
    """Check ``cfg`` (a composed ``RunConfig``) beyond its types; raise ``ConfigError`` on the first bad key.

    Unknown keys, names against the registries, sizes and ranges, the ``*.params`` against the library's
    signatures and checks, CUDA devices against this machine (``check_devices``; a launcher that runs jobs
    on other machines checks them there), and, with ``check_workload``, the workload itself: it is
    built (``workload.params`` values) and the pool must hold its largest request. Nothing is written.
    """
    from . import adapters

    _check_keys(cfg, RunConfig)

    def get(key):
        return OmegaConf.select(cfg, key, throw_on_missing=True)

    # model
    presets = sorted(adapters.model_presets()) + [PER_REQUEST]
    if get("model.preset") not in presets:
        raise ConfigError("model.preset", get("model.preset"), f"one of {', '.join(presets)}")
    _positive_int("model.num_layers", get("model.num_layers"), allow_none=True)
    if get("model.dtype") is not None:
        dtypes = ("float32", "float16", "bfloat16", "fp32", "fp16", "bf16")
        if str(get("model.dtype")).lower() not in dtypes:
            raise ConfigError("model.dtype", get("model.dtype"), f"null or one of {', '.join(dtypes)}")

    # pool
    cap, budget = get("pool.capacity_blocks"), get("pool.budget_mb")
    if cap is None and budget is None:
        raise ConfigError("pool.capacity_blocks", cap, "a positive integer (or set pool.budget_mb)")
    _positive_int("pool.capacity_blocks", cap, allow_none=budget is not None)
    if budget is not None:
        _positive_float("pool.budget_mb", budget)
    _positive_int("pool.block_size", get("pool.block_size"), allow_none=True)
    _positive_float("pool.chunk_mb", get("pool.chunk_mb"))
    thr = get("pool.compaction_threshold")
    if thr is not None and not 0.0 <= thr < 1.0:
        raise ConfigError("pool.compaction_threshold", thr, "null (never) or a number in [0, 1)")

    # policy
    policies = adapters.policy_names()
    if policies is not None and adapters.canonical_policy(get("policy.name")) is None:
        raise ConfigError("policy.name", get("policy.name"), f"one of {', '.join(policies)}")
    device_mode = get("task") is Task.replay and get("replay.mode") is ReplayMode.device
    if device_mode:
        offline = adapters.offline_policies()
        if adapters.canonical_policy(get("policy.name")) in offline:
            online = [p for p in adapters.policy_names() if adapters.canonical_policy(p) not in offline]
            raise ConfigError("policy.name", get("policy.name"),
                              f"a policy the device replay can run ({', '.join(online)}), or replay=fast "
                              f"(an offline policy needs the trace's future)")
        if get("model.preset") == PER_REQUEST and budget is None:
            raise ConfigError("pool.budget_mb", budget, f"a positive number with model.preset={PER_REQUEST} "
                              "(the shared arena's size; e.g. pool=budget)")

    # workload
    workloads = adapters.workload_names()
    wname = str(get("workload.name")).lower().replace("-", "_")
    if wname not in workloads:
        raise ConfigError("workload.name", get("workload.name"), f"one of {', '.join(workloads)}")
    if wname.startswith("mooncake"):
        path = adapters.trace_file(cfg.workload)
        if path is not None and not Path(path).is_file():
            raise ConfigError("workload.trace_path", str(path),
                              "an existing Mooncake JSONL file (set workload.traces_dir, workload.trace_path "
                              "or $KVTRITON_TRACES; the traces come from github.com/kvcache-ai/Mooncake, "
                              "FAST25-release/traces)")

    # replay
    dev = str(get("replay.device"))
    if not _DEVICE_RE.match(dev):
        raise ConfigError("replay.device", dev, "one of auto, cpu, cuda, cuda:N")
    _positive_int("replay.max_requests", get("replay.max_requests"), allow_none=True)
    _positive_int("replay.max_input_tokens", get("replay.max_input_tokens"), allow_none=True)
    _positive_int("replay.max_output_tokens", get("replay.max_output_tokens"), allow_none=True)
    _positive_int("replay.max_batch", get("replay.max_batch"))
    _positive_float("replay.time_compression", get("replay.time_compression"))
    pst = get("replay.prefill_s_per_token")
    if not (pst >= 0 and pst != float("inf")):
        raise ConfigError("replay.prefill_s_per_token", pst, "a finite number >= 0")
    _positive_int("replay.compaction_check_every", get("replay.compaction_check_every"))
    _positive_int("replay.series_every", get("replay.series_every"), allow_none=True)

    if get("task") is Task.replay and get("replay.mode") is ReplayMode.fast and cap is None:
        raise ConfigError("pool.capacity_blocks", cap, "a positive integer with replay.mode=fast (pool.budget_mb "
                          "sizes the device replay's arena only)")

    # telemetry
    if get("telemetry.exporter") == Exporter.otlp:
        ep = str(get("telemetry.endpoint"))
        if not re.match(r"^https?://", ep):
            raise ConfigError("telemetry.endpoint", ep, "an http:// or https:// URL")
    _positive_int("telemetry.export_interval_ms", get("telemetry.export_interval_ms"))

    # bench
    bdev = str(get("bench.device"))
    if not _DEVICE_RE.match(bdev):
        raise ConfigError("bench.device", bdev, "one of auto, cpu, cuda, cuda:N")
    _positive_int("bench.timeout_s", get("bench.timeout_s"), allow_none=True)
    task = get("task")
    if task is not Task.replay and get("bench.smoke"):
        script = adapters.bench_script(task.value)
        if not adapters.script_has_flag(script, "--smoke"):
            raise ConfigError("bench.smoke", True, f"false for task={task.value} ({script.name} has no --smoke; "
                              "pass smaller sizes in bench.args)")

    # devices this machine must have
    if check_devices:
        if device_mode:
            _check_device("replay.device", dev)
        if task is not Task.replay:
            _check_device("bench.device", bdev)

    # the library's arguments, then the workload itself
    adapters.check_params(cfg)
    if check_workload and task is Task.replay:
        adapters.check_capacity(cfg, adapters.build_workload(cfg))
