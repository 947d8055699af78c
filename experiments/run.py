#!/usr/bin/env python
"""Run one kvtriton experiment, or a sweep of them with ``-m``.

    python experiments/run.py                          # the embedded default: small synthetic workload
    python experiments/run.py -m policy=lru,arc,s3fifo,sieve,belady \
        pool.capacity_blocks=1000,10000,30000 workload=mooncake_conversation replay.mode=fast

Configs live in ``conf/`` (``--help`` lists the groups); results go to Hydra's output directory
(``outputs/...`` or ``multirun/...``); see ``experiments/harness`` for the results store.
"""

import os
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))
# Launchers that run jobs in other processes (joblib, submitit) unpickle the task and the callbacks
# there; they import ``harness`` through this path.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(_HERE)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(_HERE)])

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from harness.config import register_configs  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig):
    from harness.runner import run_from_hydra

    return run_from_hydra(cfg)


if __name__ == "__main__":
    main()
