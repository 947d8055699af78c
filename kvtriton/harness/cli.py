"""The ``kvtriton`` command (a console script of the package; ``python -m kvtriton.harness`` is the same).

    kvtriton run                                   # the default: a small synthetic device replay
    kvtriton run -m policy=lru,arc,s3fifo pool.capacity_blocks=1000,10000 workload=mooncake_conversation
    kvtriton run -m experiment=policy_sweep        # a preset sweep (conf/experiment/)
    kvtriton run --help                            # the config groups; --cfg job prints the composed config
    kvtriton knobs                                 # the device replay's knobs (replay.<field>)

``kvtriton run`` takes exactly the overrides and Hydra flags of ``experiments/run.py`` (a thin wrapper
of it), from any directory: the configs ship inside the package (``kvtriton/harness/conf``, found as
``pkg://kvtriton.harness/conf``), and outputs go under the working directory (``outputs/``,
``multirun/``, ``results/index``).
"""

from __future__ import annotations

import sys

USAGE = """\
usage: kvtriton <command> [arguments]

commands:
  run [OVERRIDES...]  run one experiment, or a sweep of them with -m (Hydra: `kvtriton run --help` lists
                      the config groups, `--cfg job` prints the composed config, `--info` the search path)
  knobs               the device replay's knobs: every replay.<field> with its type, default and meaning
  conf                the folder of the configs that ship with the package

examples:
  kvtriton run
  kvtriton run -m policy=lru,arc,s3fifo,sieve,belady pool.capacity_blocks=1000,10000,30000 \\
      workload=mooncake_conversation
  kvtriton run -m experiment=device_sweep
"""

_NEEDS_EXTRA = ("kvtriton {cmd} needs the harness extra (Hydra, W&B, pandas): "
                "pip install \"kvtriton[harness]\" ({error})")


def _task(cfg):
    """Hydra's task function: one run (a launcher calls it once per job of a sweep, maybe in another
    process, which imports it from here)."""
    from .runner import run_from_hydra

    return run_from_hydra(cfg)


def run(args: list[str]) -> int:
    """``kvtriton run ARGS``: Hydra's command line (overrides, ``-m``, ``--cfg``, ``--help``, ...)."""
    try:
        import hydra

        from . import config  # noqa: F401 - registers the schema and the resolvers
    except ImportError as e:
        print(_NEEDS_EXTRA.format(cmd="run", error=e), file=sys.stderr)
        return 2
    app = hydra.main(version_base="1.3", config_path="conf", config_name="config")(_task)
    saved = sys.argv
    sys.argv = ["kvtriton run", *args]
    try:
        app()
    finally:
        sys.argv = saved
    return 0


def knobs() -> int:
    """Print the device replay's knobs (``DeviceReplayConfig``'s fields) and the harness's own replay keys."""
    import dataclasses
    import typing

    from kvtriton.replay import DeviceReplayConfig

    hints = typing.get_type_hints(DeviceReplayConfig)
    print("replay.<field>: the device replay's knobs (kvtriton.replay.DeviceReplayConfig), set as "
          "replay.<field>=VALUE:")
    for f in dataclasses.fields(DeviceReplayConfig):
        kind = str(hints[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
        print(f"  replay.{f.name:<24} {kind:<14} default {f.default!r:<8}  {f.metadata.get('doc', '')}")
    print("the harness's own keys: replay.mode (fast | device; replay=auto picks the workload's), "
          "replay.repeats (timings as median and spread over N runs), replay.progress, replay.params "
          "(the fast replay's order and sample_every)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        return run(rest)
    if cmd == "knobs":
        return knobs()
    if cmd == "conf":
        from pathlib import Path

        print(Path(__file__).resolve().parent / "conf")
        return 0
    print(f"kvtriton: unknown command {cmd!r}\n\n{USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
