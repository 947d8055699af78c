"""A Hydra callback that checks every configuration of a run or sweep before anything is written.

Hydra creates a sweep's directory and each job's output directory before the task function runs, so
checks inside the task would leave directories behind for a bad value. ``on_run_start`` and
``on_multirun_start`` run first: the multirun hook expands the sweep (command line and
``hydra.sweeper.params``) the way the basic sweeper does and composes and validates each combination.

Hydra turns exceptions raised in callbacks into warnings and carries on, so a failed check prints its
message and ends the process with ``SystemExit(2)`` instead.
"""

from __future__ import annotations

import itertools
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, validate

MAX_CHECKED = 2000


class PreflightCallback(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra import compose
        from hydra.core.override_parser.overrides_parser import OverridesParser

        config_name = kwargs.get("config_name") or "config"
        cli = list(config.hydra.overrides.task)
        params = OmegaConf.select(config, "hydra.sweeper.params") or {}
        parser = OverridesParser.create()
        parsed = parser.parse_overrides(cli)
        keys = {o.get_key_element() for o in parsed}
        extra = [f"{k}={v}" for k, v in params.items() if k not in keys]
        axes = []
        for o in parser.parse_overrides(cli + extra):
            if o.is_sweep_override():
                axes.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
            else:
                axes.append([o.input_line])
        combos = itertools.product(*axes)
        for i, combo in enumerate(combos):
            if i >= MAX_CHECKED:
                break
            try:
                cfg = compose(config_name=config_name, overrides=list(combo))
            except Exception as e:  # composition errors (unknown option, wrong type) name the key
                cause = f"\n{e.__cause__}" if e.__cause__ is not None else ""
                _fail(f"Error in sweep job with overrides {' '.join(combo)}:\n{e}{cause}")
            _check(cfg)


def _fail(message: str) -> None:
    print(message, file=sys.stderr)
    print("Nothing was run.", file=sys.stderr)
    raise SystemExit(2)


def _check(config: DictConfig) -> None:
    try:
        validate(config)
    except ConfigError as e:
        _fail(f"Error: {e}")
