"""``python -m kvtriton.harness run ...``: the ``kvtriton`` command without its console script."""

import sys

from .cli import main

sys.exit(main())
