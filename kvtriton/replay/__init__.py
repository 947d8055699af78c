"""Replay engines.

- ``simulate`` / ``miss_ratio_curve`` (``fast``): prefix-cache hit rates and miss-ratio curves of the
  eviction policies on a request trace, in plain Python on the CPU (no tensors).
- ``replay_device`` (``device``): a serving loop over the memory manager and the kernels; its knobs and
  result in ``device_config``, its loop in ``engine``, its counters in ``metrics``.
"""

from .fast import ORDERS, miss_ratio_curve, simulate
from .device import DeviceReplayConfig, DeviceReplayResult, replay_device  # noqa: E402,F401

__all__ = ["miss_ratio_curve", "simulate", "ORDERS", "DeviceReplayConfig", "DeviceReplayResult",
           "replay_device"]
