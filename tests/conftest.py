import json
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


@pytest.fixture
def fake_traces(tmp_path, monkeypatch):
    """Tiny valid trace folders for the workload configs (the real traces may be absent): the two Mooncake
    files under ``$KVTRITON_TRACES`` and one agentic conversation under ``$KVTRITON_AGENTIC_TRACES``."""
    d = tmp_path / "traces"
    d.mkdir()
    lines = [{"timestamp": 0, "input_length": 1000, "output_length": 10, "hash_ids": [0, 1]},
             {"timestamp": 5, "input_length": 1500, "output_length": 10, "hash_ids": [0, 1, 2]}]
    for name in ("conversation_trace.jsonl", "synthetic_trace.jsonl"):
        (d / name).write_text("".join(json.dumps(x) + "\n" for x in lines))
    monkeypatch.setenv("KVTRITON_TRACES", str(d))
    agentic = tmp_path / "agentic" / "traces"
    agentic.mkdir(parents=True)
    conv = {"block_size": 64, "tool_tokens": 600, "system_tokens": 424,
            "requests": [{"t": 0, "type": "n", "in": 1000, "out": 10, "hash_ids": list(range(1, 16)),
                          "stop": "tool_use"}]}
    (agentic / "trace_0001.json").write_text(json.dumps(conv))
    monkeypatch.setenv("KVTRITON_AGENTIC_TRACES", str(tmp_path / "agentic"))
    return d


@pytest.fixture
def hydra_conf():
    """Hydra initialised on the harness's config directory for the test (``compose`` works inside)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from kvtriton.harness.config import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module: small CPU matmuls with two OpenMP threads on a shared 2-core
    machine spin against each other and other processes (a 10-20x slowdown measured); one thread is as
    fast when the machine is idle."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
