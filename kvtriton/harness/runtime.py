"""Where a run runs: the device a config's ``auto``/``cuda``/``cuda:N`` resolves to, and what the run
resolved to on this machine (device name, ops backend), which decides whether earlier results carry over."""

from __future__ import annotations

import os
from typing import Mapping

from omegaconf import DictConfig

from kvtriton.devices import cpu_name


def resolve_device(spec: str, job_num: int | None = None, name: str = "replay.device") -> str:
    """``auto``: ``cuda:<job_num mod #GPUs>`` when CUDA is there (one job per GPU under a multi-process
    launcher), else ``cpu``; ``cuda`` alone means the current CUDA device. Explicit CUDA devices must exist
    (ValueError naming ``name`` and the valid values). ``kvtriton.devices.resolve_device`` decides."""
    from kvtriton.devices import resolve_device as _resolve

    return str(_resolve(str(spec), job_num, name=name))


def ops_backend(device: str) -> str:
    """What kvtriton's ops run on ``device`` in this thread: ``triton``, ``triton-interpreter`` (Triton's
    interpreter, ``TRITON_INTERPRET=1``) or ``reference`` (the plain-PyTorch references); see
    ``kvtriton/ops/_backend.py``."""
    import torch
    from kvtriton import ops

    if not ops.use_triton(torch.empty(0, device=device)):
        return "reference"
    from kvtriton.ops import _backend  # the interpreter flag as triton saw it when it was imported

    interpret = getattr(_backend, "INTERPRET", os.environ.get("TRITON_INTERPRET", "0") == "1")
    return "triton-interpreter" if interpret else "triton"


def runtime_info(cfg: DictConfig, device: str | None) -> dict:
    """What the run's config resolved to on this machine: the device (``host`` for the fast replay), its
    name, and the ops backend. Recorded in config.json / result.json; ``runtime_key`` of it is part of the
    skip-completed key, so that a run on another device or backend is not handed these results."""
    import torch

    task = getattr(cfg.task, "value", cfg.task)
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    info: dict = {"task": str(task), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # pragma: no cover - triton is a Linux-only dependency
        info["triton"] = None
    if device is None:  # the fast replay: no tensors, no kernels
        info.update(device="host", device_type="host", device_name=cpu_name(), backend="none")
        return info
    dtype = torch.device(device).type
    name = torch.cuda.get_device_name(torch.device(device)) if dtype == "cuda" else cpu_name()
    if task == "replay":
        backend = ops_backend(device)
    else:  # the benchmark scripts run in a subprocess that inherits TRITON_INTERPRET
        backend = "triton-interpreter" if interpret else ("triton" if dtype == "cuda" else "reference")
    info.update(device=device, device_type=dtype, device_name=name, backend=backend, triton_interpret=interpret)
    return info


def runtime_key(info: Mapping) -> dict | None:
    """The part of ``runtime_info`` that decides whether results carry over: device type and model and
    the ops backend (not the device index: identical GPUs give interchangeable results). None for the fast
    replay, whose results depend on the config alone."""
    if info.get("device") == "host":
        return None
    return {k: info.get(k) for k in ("device_type", "device_name", "backend")}
