"""Replay engines: the fast prefix-cache replay (hit rates, miss-ratio curves)."""

from .fast import miss_ratio_curve, simulate

__all__ = ["miss_ratio_curve", "simulate"]
from .device import DeviceReplayConfig, DeviceReplayResult, replay_device  # noqa: E402,F401
