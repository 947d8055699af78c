"""Device strings: the one place that turns ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` into a
``torch.device``.

- :func:`parse_device` takes an explicit device (a string or a ``torch.device``), as the arena and the
  allocator do: ``"cuda"`` means the current CUDA device, ``"cuda:N"`` must exist.
- :func:`resolve_device` also takes ``"auto"`` (or None), as the replay and the Hydra harness do: the GPU
  when there is one, else the CPU; under a multi-process launcher, job ``N`` takes ``cuda:<N mod #GPUs>``
  so the jobs spread over the GPUs.

Both raise ValueError naming the argument, what it was, and the valid values on this machine.

- :func:`device_name` and :func:`cpu_name` name the hardware, for result files and logs.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

__all__ = ["parse_device", "resolve_device", "device_name", "cpu_name"]


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _current_cuda_index() -> int:
    # Reading the current device initialises CUDA; before that it is device 0 (a ``torch.cuda.device``
    # block or ``set_device`` initialises it), so 0 is the answer without touching the driver.
    return torch.cuda.current_device() if torch.cuda.is_initialized() else 0


def _valid_values(auto: bool, n: int) -> str:
    return ", ".join((["auto"] if auto else []) + ["cpu"] + [f"cuda:{i}" for i in range(n)])


def _parse(spec, name: str, auto: bool) -> torch.device:
    forms = "'auto', 'cpu', 'cuda' or 'cuda:N'" if auto else "'cpu', 'cuda' or 'cuda:N'"
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must be {forms}, got {spec!r}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"{name} must be {forms}, got {spec!r}")
    n = _cuda_count()
    if not n:
        raise ValueError(f"{name}={spec!r} requested but no CUDA device is available; valid values: "
                         f"{_valid_values(auto, 0)}")
    idx = _current_cuda_index() if dev.index is None else dev.index
    if not 0 <= idx < n:
        raise ValueError(f"{name}={spec!r} but {n} CUDA device(s) are visible (device index must be in "
                         f"[0, {n})); valid values: {_valid_values(auto, n)}")
    return torch.device("cuda", idx)


def parse_device(spec, *, name: str = "device") -> torch.device:
    """``"cpu"``, ``"cuda"`` (the current CUDA device), ``"cuda:N"`` or a ``torch.device`` -> a
    ``torch.device`` with its index set for CUDA. ValueError (naming ``name``) for another form, for CUDA
    on a machine without it, or for an index past the visible devices."""
    return _parse(spec, name, auto=False)


def resolve_device(spec="auto", job_num: int | None = None, *, name: str = "device") -> torch.device:
    """:func:`parse_device`, plus ``"auto"`` (or None): the GPU when CUDA is there, else the CPU.

    ``job_num`` (the job's number under a multi-process launcher, e.g. Hydra's ``hydra.job.num``) spreads
    ``"auto"`` jobs over the GPUs: job ``N`` takes ``cuda:<N mod #GPUs>``. Without it, ``"auto"`` takes the
    current CUDA device (``cuda:0`` unless a ``torch.cuda.device`` block chose another). An explicit
    device ignores ``job_num``.
    """
    if spec is None or (isinstance(spec, str) and spec == "auto"):
        n = _cuda_count()
        if not n:
            return torch.device("cpu")
        return torch.device("cuda", job_num % n if job_num is not None else _current_cuda_index())
    return _parse(spec, name, auto=True)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device) -> str:
    """The CUDA device's name (``torch.cuda.get_device_name``), or ``cpu (<model>, <N> threads)`` with
    torch's intra-op thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)"
