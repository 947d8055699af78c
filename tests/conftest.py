import os

# The kernels run in Triton's interpreter on CPU; this must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

from pathlib import Path  # noqa: E402

from kvtriton.workloads.paths import mooncake_trace_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRACES = mooncake_trace_path("mooncake_conversation").parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def traces_dir():
    if not (TRACES / "conversation_trace.jsonl").exists():
        pytest.skip(f"Mooncake traces not found at {TRACES} (set KVTRITON_TRACES)")
    return TRACES
