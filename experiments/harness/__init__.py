"""The experiment harness: structured configs, the local results store, W&B logging, telemetry set-up.

Imported by ``experiments/run.py`` and the notebooks; the library (``kvtriton``) never imports it.
"""

from .config import CONF_DIR, PROJECT_ROOT, ConfigError, RunConfig, register_configs, validate
from .store import find_runs, load_results, load_series, load_tables, load_timeseries

register_configs()

__all__ = ["CONF_DIR", "PROJECT_ROOT", "ConfigError", "RunConfig", "register_configs", "validate",
           "find_runs", "load_results", "load_series", "load_tables", "load_timeseries"]
