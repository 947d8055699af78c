"""Replay engines.

- ``simulate`` / ``miss_ratio_curve`` (``fast``): prefix-cache hit rates and miss-ratio curves of the
  eviction policies on a request trace on the CPU (no tensors), through the Python policies or their
  compiled numba kernels (``compiled``; ``flat_trace`` holds the trace as flat arrays).
- ``replay_device`` (``device``): a serving loop over the memory manager and the kernels; its knobs and
  result in ``device_config``, its loop in ``engine``, its counters in ``metrics``.
"""

from .fast import ENGINES, ORDERS, miss_ratio_curve, simulate
from .flat_trace import FlatTrace, prepare_trace
from .device import DeviceReplayConfig, DeviceReplayResult, replay_device  # noqa: E402,F401

__all__ = ["miss_ratio_curve", "simulate", "ORDERS", "ENGINES", "FlatTrace", "prepare_trace",
           "DeviceReplayConfig", "DeviceReplayResult", "replay_device"]
