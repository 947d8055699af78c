"""What the benchmark scripts share: percentiles, the device and the machine, and JSON output.

The scripts stay outside the package (they are run from a clone: ``python experiments/<script>.py``,
which puts this folder on ``sys.path``) and import these helpers instead of keeping copies. What the
library also needs has its home there (``kvtriton.percentiles``, ``kvtriton.devices``) and is imported
when first called, so that a script can put another ``kvtriton`` on ``sys.path`` before it imports one:

- ``percentiles(values, unit="us", scale=1e-3)``: ``n``, ``mean``, ``min``, ``p50``, ``p95``, ``p99``,
  ``max`` (and ``std``) of a sample, with the unit in each key;
- ``resolve_device(spec)`` (``kvtriton.devices``: ``auto``, ``cpu``, ``cuda``, ``cuda:N``),
  ``device_name(device)`` (the GPU's name, or the CPU's model and thread count) and ``cpu_name()``;
- ``run_header(device)``: date, device, machine and versions, the head of every result file;
- ``write_json(path, obj)``: numpy/torch scalars, dtypes and non-finite floats made JSON-safe, written
  through a temporary file and a rename, so that a killed run never leaves a truncated file.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from pathlib import Path
from typing import Iterable

__all__ = ["percentiles", "resolve_device", "device_name", "cpu_name", "run_header", "utc_now", "jsonable",
           "write_json"]


def percentiles(values: Iterable[float], *, unit: str = "", scale: float = 1.0,
                qs: tuple[int, ...] = (50, 95, 99)) -> dict:
    """Summary of a sample (e.g. latencies in ns with ``unit="us", scale=1e-3``): ``n``, ``mean<u>``,
    ``std<u>`` (sample standard deviation; 0 for one value), ``min<u>``, ``p<q><u>`` for each of ``qs``
    (linear interpolation), ``max<u>``, where ``<u>`` is ``_<unit>`` (nothing without a unit). All 0.0
    (``n`` 0) when empty. The library's :func:`kvtriton.percentiles.percentile_summary` with ``spread``."""
    from kvtriton.percentiles import percentile_summary

    return percentile_summary(values, qs, unit=unit, scale=scale, spread=True)


def resolve_device(spec="auto"):
    """``torch.device`` of ``auto`` (the GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``; ValueError
    naming ``--device`` and the valid values otherwise."""
    from kvtriton.devices import resolve_device as _resolve

    return _resolve(spec, name="--device")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows (``kvtriton.devices``)."""
    from kvtriton.devices import cpu_name as _cpu_name

    return _cpu_name()


def device_name(device) -> str:
    """The CUDA device's name, or ``cpu (<model>, <N> threads)`` (``kvtriton.devices``)."""
    from kvtriton.devices import device_name as _device_name

    return _device_name(device)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def run_header(device=None) -> dict:
    """Date, device (and its name), CPU, CPU count, Python, torch and triton versions."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover - triton is Linux-only
        triton_version = None
    head = {"date": utc_now()}
    if device is not None:
        head.update(device=str(device), device_name=device_name(device))
    head.update(cpu=cpu_name(), cpus=os.cpu_count(), platform=platform.platform(),
                python=platform.python_version(), torch=torch.__version__, triton=triton_version)
    return head


def jsonable(x):
    """``x`` with numpy/torch scalars as Python numbers, dtypes and devices as strings, tuples as lists,
    and NaN/inf as None (strict JSON has neither)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 0) == 0:
        try:
            x = x.item()
        except Exception:
            pass
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def write_json(path, obj, *, indent: int = 2) -> Path:
    """Write ``jsonable(obj)`` to ``path`` (parents created) through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(jsonable(obj), indent=indent) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
