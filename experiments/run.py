#!/usr/bin/env python
"""Run one kvtriton experiment, or a sweep of them with ``-m``: the same as ``kvtriton run``.

    python experiments/run.py                          # the embedded default: small synthetic workload
    python experiments/run.py -m policy=lru,arc,s3fifo,sieve,belady \
        pool.capacity_blocks=1000,10000,30000 workload=mooncake_conversation replay=fast

The harness lives in the package (``kvtriton.harness``) with its configs (``kvtriton/harness/conf``;
``--help`` lists the groups); results go to Hydra's output directory (``outputs/...`` or
``multirun/...``) under the working directory.
"""

import sys

from kvtriton.harness.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
