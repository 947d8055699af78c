"""The experiment harness: structured configs and their Hydra config groups (``conf/``, shipped with the
package), the local results store, W&B logging, telemetry set-up, and the ``kvtriton`` command.

Needs the ``harness`` extra (``pip install "kvtriton[harness]"``); ``import kvtriton`` never imports it.
Reading results needs pandas only: ``from kvtriton.harness import load_results`` does not import Hydra.

    kvtriton run -m policy=lru,arc pool.capacity_blocks=1000,10000 workload=mooncake_conversation
    python -c "from kvtriton.harness import load_results; print(load_results('multirun'))"
"""

from .store import find_runs, load_results, load_series, load_tables, load_timeseries

# Imported on first use: they need Hydra/OmegaConf, which reading results does not.
_LAZY = {"CONF_DIR": "config", "PROJECT_ROOT": "config", "ConfigError": "config", "RunConfig": "config",
         "register_configs": "config", "validate": "config", "execute": "runner"}

__all__ = ["CONF_DIR", "PROJECT_ROOT", "ConfigError", "RunConfig", "register_configs", "validate", "execute",
           "find_runs", "load_results", "load_series", "load_tables", "load_timeseries"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
