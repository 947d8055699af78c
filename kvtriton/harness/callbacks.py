"""Hydra callbacks: ``PreflightCallback`` checks every configuration of a run or sweep before anything is
written; ``SweepSummaryCallback`` sums a finished sweep up (one line, and one W&B run for the sweep).

Hydra creates a sweep's directory and each job's output directory before the task function runs, so
checks inside the task would leave directories behind for a bad value. ``on_run_start`` and
``on_multirun_start`` run first: the multirun hook expands the sweep (command line and
``hydra.sweeper.params``) with the basic sweeper's own expansion and composes and validates each job
completely (``harness.config.validate``: unknown keys, values, the ``*.params`` against the library,
CUDA devices, and each distinct workload built once and checked against the pool), so that no job runs
before every job is known to be valid. Each run's directory is checked too: one in use by a live run,
or holding the complete results of another configuration, stops the run before Hydra writes into it.

CUDA devices are checked here unless the launcher runs the jobs on other machines (SLURM); the job
checks them again where it runs, before it writes anything.

Hydra turns exceptions raised in callbacks into warnings and carries on, so a failed check prints its
message and ends the process with ``SystemExit(2)`` instead.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from .config import ConfigError, validate


def _local_launcher(config: DictConfig) -> bool:
    """Whether the jobs run on this machine (its CUDA devices are theirs)."""
    target = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
    return "slurm" not in target.lower()


def _guarded(hook):
    """Hydra would turn an unexpected exception in a callback into a warning and run unchecked."""
    def run(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            hook(self, config, **kwargs)
        except SystemExit:
            raise
        except Exception:
            _fail("Error: the harness's checks failed unexpectedly:\n" + traceback.format_exc())
    return run


class PreflightCallback(Callback):
    @_guarded
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check(config, check_devices=True)
        _check_dir(Path(str(config.hydra.run.dir)), config)

    @_guarded
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra import compose
        from hydra.core.override_parser.overrides_parser import OverridesParser

        config_name = kwargs.get("config_name") or "config"
        local = _local_launcher(config)
        # The jobs exactly as the basic sweeper makes them, in its order (hydra.sweeper.params first,
        # then the command line, a later key replacing an earlier one), so job i is hydra.job.num i.
        cli = list(config.hydra.overrides.task)
        params = OmegaConf.select(config, "hydra.sweeper.params") or {}
        sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
        if not sweeper.endswith("BasicSweeper"):
            print(f"[kvtriton] {sweeper.rsplit('.', 1)[-1]} picks its jobs as it goes: each job is checked when "
                  f"it starts", file=sys.stderr)
            return
        parser = OverridesParser.create()
        jobs = BasicSweeper.split_arguments(parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + cli),
                                            None)[0]
        # The sweep directory as the jobs will see it: resolving it here fixes the run's timestamp and
        # unique id in this config, whose resolver cache Hydra copies into every job's config.
        sweep_dir = Path(str(config.hydra.sweep.dir))
        subdir = config.hydra.sweep._get_node("subdir")._value()
        if len(jobs) > 50:
            print(f"[kvtriton] checking the {len(jobs)} jobs of the sweep before running any", file=sys.stderr)
        for i, combo in enumerate(jobs):
            job = " ".join(combo)
            try:
                cfg = compose(config_name=config_name, overrides=list(combo))
            except Exception as e:  # composition errors (unknown option, wrong type) name the key
                cause = f"\n{e.__cause__}" if e.__cause__ is not None else ""
                _fail(f"Error in sweep job with overrides {job}:\n{e}{cause}")
            _check(cfg, check_devices=local, job=job)
            if sweep_dir.exists():  # a job's directory can only hold results if the sweep's exists
                if subdir == "${hydra.job.num}":
                    job_dir = sweep_dir / str(i)
                else:
                    job_dir = _job_dir(compose(config_name=config_name, overrides=list(combo),
                                               return_hydra_config=True), sweep_dir, i)
                _check_dir(job_dir, cfg, job=job)


def _job_dir(cfg: DictConfig, sweep_dir: Path, num: int) -> Path | None:
    """Job ``num``'s output directory (None where its ``hydra.sweep.subdir`` cannot be resolved here)."""
    try:
        with open_dict(cfg):
            cfg.hydra.job.num = num
        return sweep_dir / str(cfg.hydra.sweep.subdir)
    except Exception:
        return None


def _fail(message: str) -> None:
    print(message, file=sys.stderr)
    print("Nothing was run.", file=sys.stderr)
    raise SystemExit(2)


def _check(config: DictConfig, *, check_devices: bool, job: str | None = None) -> None:
    try:
        validate(config, check_devices=check_devices)
    except ConfigError as e:
        _fail((f"Error in sweep job with overrides {job}:\n" if job else "Error: ") + str(e))


def _check_dir(run_dir: Path | None, config: DictConfig, job: str | None = None) -> None:
    from . import store
    from .runner import resolved_config

    if run_dir is None or not run_dir.exists():
        return
    why = store.conflict(run_dir, resolved_config(config))
    if why:
        _fail((f"Error in sweep job with overrides {job}:\n" if job else "Error: ") + why)


class SweepSummaryCallback(Callback):
    """After a sweep: one line naming its directory and how many jobs completed, and, with
    ``logger=wandb``, one W&B run for the whole sweep (``wandb_log.log_sweep_summary``: a table of every
    job's results and line plots across them, in the jobs' group); its ids go to
    ``<sweep dir>/sweep_summary.json``. Trouble here never fails the sweep: the jobs' results are on disk."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
            if not sweep_dir.is_dir():
                return
            from . import store

            results = store.load_results(sweep_dir)
            print(f"[kvtriton] sweep {sweep_dir}: {len(results)} complete runs "
                  f"(kvtriton.harness.load_results({str(sweep_dir)!r}))", file=sys.stderr)
            kind = OmegaConf.select(config, "logger.kind")
            if getattr(kind, "value", kind) != "wandb" or not len(results):
                return
            from .wandb_log import log_sweep_summary

            info = log_sweep_summary(config.logger, sweep_dir=sweep_dir, results=results)
            if info.get("run_id"):
                store.atomic_write_json(sweep_dir / "sweep_summary.json", info)
                print(f"[kvtriton] sweep summary logged to W&B ({info['mode']}): run {info['run_id']}, "
                      f"plots {', '.join(info['plots']) or 'none'}", file=sys.stderr)
        except Exception:
            logging.getLogger("kvtriton.harness").warning(
                "the sweep summary failed (the jobs' results are on disk):\n%s", traceback.format_exc())
