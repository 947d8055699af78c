"""The knobs and the result of the device replay (``kvtriton.replay.replay_device``).

``DeviceReplayConfig`` is the one schema of the device replay's knobs: every field has a type, a
default, a one-line description (``field.metadata["doc"]``, also ``DeviceReplayConfig.docs()``) and a
check (``field.metadata["check"]``) that ``validate`` runs in field order, raising ValueError that names
the field (``config.<field>``) and its allowed values.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields

from ..devices import resolve_device
from ..spec import parse_dtype

__all__ = ["DeviceReplayConfig", "DeviceReplayResult", "COMPUTE_MODES"]

# "cost_model": synthetic K/V and the measured attention kernels, projections and MLP a cost model (fast policy
# studies); "model": a transformers model's forward passes through kvtriton.hf.PagedEngine (kvtriton.replay.model_replay)
COMPUTE_MODES = ("cost_model", "model")


# ------------------------------------------------------------------------------------ field checks
# Each returns None when ``v`` is allowed, else the allowed values in words (or, for the device, the
# resolver's ValueError, whose message names the valid devices of this machine).

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(v):
    return None if _is_int(v) and v >= 1 else "a positive int"


def _positive_int_or_none(v):
    return None if v is None or (_is_int(v) and v >= 1) else "None or a positive int"


def _any_int(v):
    return None if _is_int(v) else "an int"


def _positive_real(v):
    return None if _is_real(v) and v > 0 else "a positive finite number"


def _nonnegative_real(v):
    return None if _is_real(v) and v >= 0 else "a finite number >= 0"


def _nonnegative_real_or_none(v):
    return None if v is None or (_is_real(v) and v >= 0) else "None or a finite number >= 0"


def _fraction_or_none(v):
    return None if v is None or (_is_real(v) and 0.0 <= v < 1.0) else "None or a number in [0, 1)"


def _flag(v):
    return None if isinstance(v, bool) else "True or False"


def _flag_or_none(v):
    return None if v is None or isinstance(v, bool) else "None, True or False"


def _dtype_or_none(v):
    if v is not None:
        try:
            parse_dtype(v)
        except ValueError:
            return "None, a dtype name (float32/fp32, float16/fp16/half, bfloat16/bf16) or a torch dtype"
    return None


def _device(v):
    try:
        resolve_device(v, name="config.device")
    except ValueError as e:
        return e  # its own message names the field, the value and the valid values on this machine
    return None


def _compute(v):
    return None if v in COMPUTE_MODES else " or ".join(repr(m) for m in COMPUTE_MODES)


def _hf_model(v):
    from pathlib import Path

    from ..spec import PRESETS

    allowed = (f"'smollm2', 'random:<preset>' ({', '.join(sorted(PRESETS))}) or an existing local model "
               "directory or .gguf file")
    if not isinstance(v, str) or not v:
        return allowed
    if v == "smollm2" or (v.startswith("random:") and v[len("random:"):] in PRESETS):
        return None
    return None if Path(v).expanduser().exists() else allowed


def _knob(default, check, doc: str):
    """A config field: its default, its check and its one-line description."""
    return field(default=default, metadata={"check": check, "doc": doc})


# ------------------------------------------------------------------------------------------ config

@dataclass
class DeviceReplayConfig:
    """Knobs of ``replay_device``. Scale-down knobs first; sizes are positive, or None for no limit."""

    device: str = _knob("auto", _device, "'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'")
    compute: str = _knob("cost_model", _compute,
                         "'cost_model': synthetic K/V, measured attention, modelled projections and MLP; 'model': "
                         "the hf_model's forward passes (measured TTFT and step times)")
    hf_model: str = _knob("smollm2", _hf_model,
                          "compute=model: 'smollm2', 'random:<preset>' (random weights of that shape, no download) "
                          "or a local model path")
    max_requests: int | None = _knob(None, _positive_int_or_none, "replay only the first N requests")
    time_compression: float = _knob(1.0, _positive_real, "requests arrive at arrival_s / time_compression")
    ignore_arrivals: bool = _knob(False, _flag, "every request arrives at time 0")
    num_layers: int | None = _knob(None, _positive_int_or_none, "override the model shape's layer count")
    block_size: int | None = _knob(None, _positive_int_or_none, "override the model shape's tokens per block")
    dtype: str | None = _knob(None, _dtype_or_none, "override the model shape's dtype (float32/float16/bfloat16)")
    max_input_tokens: int | None = _knob(None, _positive_int_or_none,
                                         "truncate prompts (their hash ids stay prefix-consistent)")
    max_output_tokens: int | None = _knob(None, _positive_int_or_none, "cap generated tokens per request")
    max_batch: int = _knob(64, _positive_int, "running sequences at most, per model")
    prefill_s_per_token: float = _knob(1e-4, _nonnegative_real,
                                       "prefill cost model: seconds of projections and MLP per missed prompt "
                                       "token (the attention runs and is measured)")
    step_time_s: float | None = _knob(None, _nonnegative_real_or_none,
                                      "clock: every step lasts this long (None: its measured wall time)")
    compaction_threshold: float | None = _knob(0.5, _fraction_or_none,
                                               "external fragmentation that triggers compaction (None: never)")
    compaction_check_every: int = _knob(16, _positive_int, "steps between fragmentation checks")
    chunk_bytes: int | None = _knob(None, _positive_int_or_none, "arena chunk size (None: about 2 MiB, whole blocks)")
    preallocate: bool = _knob(True, _flag, "claim every arena chunk up front (else grow on demand)")
    record_every: int = _knob(1, _positive_int, "a time-series row every N steps")
    check_invariants: bool = _knob(False, _flag, "validate the pools after every step (slow; for tests)")
    warmup: bool | None = _knob(None, _flag_or_none, "compile the kernels before the loop (None: on CUDA only)")
    seed: int = _knob(0, _any_int, "seed of the synthetic K/V/Q values")

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (``config.<field>``) and its allowed values."""
        for f in fields(self):
            v = getattr(self, f.name)
            allowed = f.metadata["check"](v)
            if isinstance(allowed, Exception):
                raise ValueError(str(allowed)) from None
            if allowed is not None:
                raise ValueError(f"config.{f.name} must be {allowed}, got {v!r}")

    @classmethod
    def docs(cls) -> dict[str, str]:
        """``{field: one-line description}``, in field order."""
        return {f.name: f.metadata["doc"] for f in fields(cls)}

    @classmethod
    def defaults(cls) -> dict:
        """``{field: default}``, in field order."""
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


# ------------------------------------------------------------------------------------------ result

@dataclass
class DeviceReplayResult:
    """What ``replay_device`` measured. Keys and columns: ``kvtriton.replay.metrics``."""

    summary: dict = field(default_factory=dict)          # plain numbers: SUMMARY_KEYS (+ <model>.<key> per model)
    timeseries: list[dict] = field(default_factory=list)  # a row every record_every steps: TIMESERIES_KEYS
    requests: list[dict] = field(default_factory=list)    # a row per request, in trace order: REQUEST_KEYS
    config: dict = field(default_factory=dict)           # the DeviceReplayConfig that ran, as a dict
