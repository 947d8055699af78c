"""Device replay on the CPU: hit accounting, preemption, compaction, metrics, determinism, bad input.

Most tests run the ops' plain-PyTorch references (``ops.backend("reference")``) to stay fast; one tiny
replay runs the Triton kernels in the interpreter.
"""

import math

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtriton import ops
from kvtriton.replay.device import SUMMARY_KEYS, DeviceReplayConfig, replay_device
from kvtriton.spec import get_spec
from kvtriton.workloads import Request, multiturn_workload, zipf_prefix_workload

# tiny: 2 layers, 2 KV heads x 64, float32, blocks of 16 tokens; one layer keeps the references quick
TINY1 = get_spec("tiny").with_(num_layers=1)


def cfg(**kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("step_time_s", 0.01)
    kw.setdefault("compaction_threshold", None)
    return DeviceReplayConfig(**kw)


def req(i, ids, n_in, n_out, t=0.0, bt=16):
    return Request(request_id=i, arrival_s=t, input_length=n_in, output_length=n_out, hash_ids=tuple(ids),
                   block_tokens=bt)


@pytest.fixture(autouse=True)
def _reference_ops():
    with ops.backend("reference"):
        yield


def check_sane(res, reqs):
    s = res.summary
    assert set(SUMMARY_KEYS) <= set(s)
    assert s["completed"] == s["requests"] == len(reqs)
    assert 0.0 <= s["hit_rate"] <= 1.0 and 0.0 <= s["token_hit_rate"] <= 1.0
    assert s["prefill_tokens"] == sum(r.input_length for r in reqs)
    assert s["prefill_tokens_saved"] + s["prefill_tokens_computed"] - s["recompute_tokens"] == s["prefill_tokens"]
    # every decode step makes one token per running sequence; the prefill makes the first
    assert s["decode_tokens"] == sum(r.output_length - 1 for r in reqs)
    assert math.isclose(s["step_kernel_frac"] + s["step_memory_frac"] + s["step_other_frac"], 1.0, rel_tol=1e-9)
    assert s["step_kernel_s"] > 0 and s["step_memory_s"] > 0
    # the prefill attention ran exactly when some prompt token missed the cache, and is a prefill kernel
    assert (s["prefill_attention_s"] > 0) == (s["prefill_tokens_computed"] > 0)
    assert s["prefill_attention_s"] <= s["prefill_kernel_s"] <= s["step_kernel_s"]
    assert 0.0 <= s["utilization_mean"] <= s["utilization_max"] <= 1.0
    assert 0.0 <= s["external_fragmentation_mean"] <= 1.0
    for row in res.requests:
        assert 0.0 <= row["queueing_delay_s"] <= row["ttft_s"] <= row["finished_s"] - row["arrival_s"] + 1e-9
    assert len(res.timeseries) == s["steps"]
    for row in res.timeseries:
        assert row["used_blocks"] + row["cached_blocks"] + row["free_blocks"] <= s["capacity_blocks"]
        assert 0.0 <= row["utilization"] <= 1.0 and row["batch"] <= res.config["max_batch"]
    times = [row["time_s"] for row in res.timeseries]
    assert times == sorted(times)


def test_hit_accounting_hand_computed():
    reqs = [
        req(0, [0, 1, 2], 48, 3, t=0.0),          # 3 full blocks, all misses
        req(1, [0, 1, 3, 4], 64, 2, t=1.0),       # shares blocks 0-1: 2 hits of 4
        req(2, [5], 10, 2, t=2.0),                # a partial block only: nothing to look up
        req(3, [0, 1, 2, 6], 60, 2, t=3.0),       # 3 full blocks hit, the partial 4th is private
        # 512-token trace blocks: each becomes 32 pool blocks keyed by (id, end position)
        req(4, [10, 11], 520, 1, t=4.0, bt=512),  # 32 + 0 full blocks (520 // 16 = 32): misses
        req(5, [10, 12], 1000, 2, t=5.0, bt=512),  # 62 full blocks: the first 32 hit
    ]
    res = replay_device(reqs, TINY1, "lru", capacity_blocks=400, config=cfg())
    s = res.summary
    assert [r["lookup_blocks"] for r in res.requests] == [3, 4, 0, 3, 32, 62]
    assert [r["hit_blocks"] for r in res.requests] == [0, 2, 0, 3, 0, 32]
    assert s["lookup_blocks"] == 104 and s["hit_blocks"] == 37
    assert s["hit_rate"] == pytest.approx(37 / 104)
    assert s["prefill_tokens_saved"] == 37 * 16
    assert s["prefill_tokens_computed"] == 48 + 64 + 10 + 60 + 520 + 1000 - 37 * 16
    assert s["evictions"] == 0 and s["preemptions"] == 0
    check_sane(res, reqs)


def test_measured_clock_ttft_contains_each_request_prefill_attention():
    """On the measured clock (no step_time_s) a request's TTFT holds its share of the prefill attention;
    the summary reports the total and the per-request figures."""
    reqs = [req(0, [0, 1, 2], 48, 3), req(1, [0, 1, 5], 40, 3), req(2, [7], 30, 2, t=0.5)]
    res = replay_device(reqs, TINY1, "lru", capacity_blocks=32, config=cfg(step_time_s=None))
    s = res.summary
    check_sane(res, reqs)
    assert s["prefill_attention_s"] > 0 and s["prefill_attention_s_mean"] > 0
    for row in res.requests:
        assert 0 < row["prefill_attention_s"] <= row["ttft_s"] - row["queueing_delay_s"]
    assert sum(r["prefill_attention_s"] for r in res.requests) == pytest.approx(s["prefill_attention_s"])


def test_eviction_under_small_capacity_lowers_hits():
    # the same prompt three times, far apart, with a flood of unique prompts between them
    reqs = [req(0, [0, 1, 2, 3], 64, 2, t=0.0)]
    reqs += [req(i, [100 + 4 * i + k for k in range(4)], 64, 2, t=1.0 + i) for i in range(1, 9)]
    reqs += [req(9, [0, 1, 2, 3], 64, 2, t=20.0)]
    big = replay_device(reqs, TINY1, "lru", capacity_blocks=200, config=cfg()).summary
    small = replay_device(reqs, TINY1, "lru", capacity_blocks=12, config=cfg()).summary
    assert big["hit_blocks"] == 4 and big["evictions"] == 0
    assert small["hit_blocks"] == 0 and small["evictions"] > 0


def test_preemption_when_tight_and_all_complete():
    reqs = [req(i, [10 * i + k for k in range(2)], 32, 20) for i in range(3)]  # 51 tokens = 4 blocks each
    res = replay_device(reqs, TINY1, "lru", capacity_blocks=6, config=cfg(max_batch=3))
    s = res.summary
    assert s["preemptions"] > 0 and s["recompute_tokens"] > 0
    assert sum(r["preemptions"] for r in res.requests) == s["preemptions"]
    assert max(row["used_blocks"] for row in res.timeseries) <= 6
    check_sane(res, reqs)


def test_compaction_triggers_and_replay_completes():
    # 4 blocks a chunk; long and short sequences interleave so finished short ones leave holes
    reqs = [req(i, [20 * i + k for k in range(3)], 40 if i % 2 else 20, 30 if i % 2 else 4) for i in range(8)]
    spec = TINY1
    res = replay_device(reqs, spec, "lru", capacity_blocks=64,
                        config=cfg(compaction_threshold=0.2, compaction_check_every=1,
                                   chunk_bytes=4 * spec.bytes_per_block, max_batch=8))
    s = res.summary
    assert s["compactions"] >= 1 and s["chunks_returned"] >= 1 and s["compaction_s"] > 0
    assert any(row["compaction_s"] > 0 for row in res.timeseries)
    check_sane(res, reqs)


def test_generators_replay_deterministic_with_seed():
    reqs = multiturn_workload(4, turns=(2, 3), system_prompt_tokens=64, first_user_tokens=(16, 80),
                              user_tokens=(8, 40), output_tokens=(2, 8), block_tokens=32, seed=3)
    c = cfg(time_compression=500.0, max_batch=4, seed=7)
    a = replay_device(reqs, TINY1, "s3fifo", capacity_blocks=48, config=c)
    b = replay_device(reqs, TINY1, "s3fifo", capacity_blocks=48, config=c)
    keys = ["steps", "hit_blocks", "lookup_blocks", "evictions", "preemptions", "decode_tokens", "sim_time_s",
            "ttft_s_mean", "queueing_delay_s_mean"]
    assert {k: a.summary[k] for k in keys} == {k: b.summary[k] for k in keys}
    assert [r["batch"] for r in a.timeseries] == [r["batch"] for r in b.timeseries]
    assert a.summary["hit_blocks"] > 0  # later turns reuse earlier turns' blocks
    check_sane(a, reqs)


def test_scale_down_knobs_budget_and_callbacks():
    reqs = zipf_prefix_workload(12, num_prefixes=2, prefix_blocks=(1, 2), suffix_tokens=(10, 400),
                                output_tokens=(5, 50), block_tokens=64, seed=1)
    rows = []
    c = cfg(max_requests=5, max_input_tokens=100, max_output_tokens=3, ignore_arrivals=True, record_every=2)
    res = replay_device(reqs, "tiny", "lru", budget_bytes=40 * get_spec("tiny").bytes_per_block, config=c,
                        progress=True, on_step=rows.append)
    s = res.summary
    assert s["requests"] == s["completed"] == 5 and s["capacity_blocks"] == 40 and s["num_layers"] == 2
    assert s["prefill_tokens"] == sum(min(r.input_length, 100) for r in reqs[:5])
    assert s["decode_tokens"] == 5 * 2
    assert all(r["arrival_s"] == 0.0 for r in res.requests)
    assert rows == res.timeseries and len(rows) == s["steps"] // 2
    # the knobs override the shape
    s2 = replay_device(reqs, "tiny", "lru", capacity_blocks=64,
                       config=cfg(max_requests=2, num_layers=1, block_size=8, max_output_tokens=2)).summary
    assert s2["num_layers"] == 1 and s2["block_size"] == 8


@pytest.mark.parametrize("call, match", [
    (lambda r: replay_device(r, TINY1, "lru_k", capacity_blocks=50, config=cfg()), "valid policies: .*lru"),
    (lambda r: replay_device(r, TINY1, "belady", capacity_blocks=50, config=cfg()), "fast replay"),
    (lambda r: replay_device(r, "gpt-9", "lru", capacity_blocks=50, config=cfg()), "valid presets"),
    (lambda r: replay_device(r, TINY1, "lru", capacity_blocks=3, config=cfg()), "capacity of 3 blocks"),
    (lambda r: replay_device(r, TINY1, "lru", capacity_blocks=0, config=cfg()), "capacity_blocks"),
    (lambda r: replay_device(r, TINY1, "lru", capacity_blocks=-5, config=cfg()), "capacity_blocks"),
    (lambda r: replay_device(r, TINY1, "lru", budget_bytes=-1, config=cfg()), "budget_bytes"),
    (lambda r: replay_device(r, TINY1, "lru", budget_bytes=100, config=cfg()), "budget_bytes"),
    (lambda r: replay_device(r, TINY1, "lru", config=cfg()), "exactly one"),
    (lambda r: replay_device(r, TINY1, "lru", capacity_blocks=5, budget_bytes=1 << 20, config=cfg()),
     "exactly one"),
    (lambda r: replay_device([], TINY1, "lru", capacity_blocks=50, config=cfg()), "no requests"),
    (lambda r: replay_device(r, TINY1, "lru", capacity_blocks=50, config=cfg(max_requests=0)), "max_requests"),
    (lambda r: replay_device(r, TINY1, "lru", capacity_blocks=50, config=cfg(max_batch=0)), "max_batch"),
    (lambda r: replay_device(r, TINY1, "lru", capacity_blocks=50, config=cfg(time_compression=0)),
     "time_compression"),
    (lambda r: replay_device(r, TINY1, "lru", capacity_blocks=50, config=cfg(compaction_threshold=1.5)),
     "compaction_threshold"),
    (lambda r: replay_device(r, TINY1, "lru", capacity_blocks=50, config=cfg(prefill_s_per_token=-1)),
     "prefill_s_per_token"),
    (lambda r: replay_device(r, TINY1, "lru", capacity_blocks=50, config=cfg(device="tpu")), "device"),
    (lambda r: replay_device(r, TINY1, "lru", capacity_blocks=50, config=cfg(num_layers=0)), "num_layers"),
    (lambda r: replay_device([req(0, [1], 0, 3)], TINY1, "lru", capacity_blocks=50, config=cfg()),
     "input_length"),
    (lambda r: replay_device(r, TINY1, "lru", capacity_blocks=50, config={"device": "cpu"}), "config"),
])
def test_bad_input_raises_before_work(call, match):
    reqs = [req(0, [0, 1, 2], 48, 20), req(1, [0, 3], 20, 4)]
    with pytest.raises(ValueError, match=match):
        call(reqs)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_device_without_cuda():
    with pytest.raises(ValueError, match="no CUDA device"):
        replay_device([req(0, [0], 16, 2)], TINY1, "lru", capacity_blocks=8, config=cfg(device="cuda:0"))


def test_tiny_replay_through_triton_kernels():
    """The same tiny replay with the Triton kernels (the interpreter on CPU) and with the references
    schedules identically."""
    spec = get_spec("tiny").with_(num_layers=1, head_dim=16, num_kv_heads=1, num_q_heads=2)
    reqs = [req(0, [0, 1], 20, 3), req(1, [0, 2], 24, 2)]
    c = cfg(max_batch=2)
    import torch
    with ops.backend("triton"):
        assert ops.use_triton(torch.empty(0))  # the interpreter, set up by conftest
        tri = replay_device(reqs, spec, "lru", capacity_blocks=8, config=c)
    ref = replay_device(reqs, spec, "lru", capacity_blocks=8, config=c)
    for k in ("steps", "hit_blocks", "decode_tokens", "completed"):
        assert tri.summary[k] == ref.summary[k]
    assert tri.summary["hit_blocks"] == 1 and tri.summary["completed"] == 2
    assert tri.summary["prefill_attention_s"] > 0  # paged_prefill_attention ran in the interpreter
    check_sane(tri, reqs)


def test_decode_writes_go_to_the_sequence_own_last_block(monkeypatch):
    """Every decode step's new K/V lands in the slot after each sequence's last token, in a block no
    other running sequence holds (shared prefix blocks are never written)."""
    import kvtriton.ops as kops
    seen = {"appends": [], "checked": 0}
    real_append, real_attn = kops.append_kv, kops.paged_decode_attention

    def append(key, value, kc, vc, slot_mapping):
        seen["appends"].append(slot_mapping.clone())
        return real_append(key, value, kc, vc, slot_mapping)

    def attn(q, kc, vc, block_tables, seq_lens, **kw):
        slots = seen["appends"][-1]
        bs = kc.shape[1]
        assert slots.shape[0] == q.shape[0] == block_tables.shape[0]
        for b in range(q.shape[0]):
            n = int(seq_lens[b])
            own = int(block_tables[b, (n - 1) // bs])
            assert int(slots[b]) == own * bs + (n - 1) % bs
            others = {int(x) for r in range(q.shape[0]) if r != b
                      for x in block_tables[r, : -(-int(seq_lens[r]) // bs)]}
            assert own not in others
            seen["checked"] += 1
        return real_attn(q, kc, vc, block_tables, seq_lens, **kw)

    monkeypatch.setattr(kops, "append_kv", append)
    monkeypatch.setattr(kops, "paged_decode_attention", attn)
    # four prompts share two full blocks; the shared blocks are read by every step and never written
    reqs = [req(i, [0, 1, 10 + i], 40 + i, 20) for i in range(4)]
    res = replay_device(reqs, TINY1, "lru", capacity_blocks=40, config=cfg(max_batch=4))
    assert res.summary["hit_blocks"] == 6 and seen["checked"] == res.summary["decode_tokens"]


def test_design_mix_replays_per_model():
    from kvtriton.workloads import design_mix_workload
    reqs = design_mix_workload(6, vista_fraction=0.5, output_tokens=3, block_tokens=16, seed=2)
    for model in ("vista", "deepseek-ocr"):
        mine = [r for r in reqs if r.model == model]
        if not mine:
            continue
        res = replay_device(mine, model, "lru", budget_bytes=64 << 20,
                            config=cfg(num_layers=1, max_batch=4))
        s = res.summary
        assert s["completed"] == len(mine) and s["model"] == model
        # 80 / 85 tokens in blocks of 16: 5 / 6 blocks per finished request
        assert s["decode_tokens"] == 2 * len(mine)


def test_mooncake_trace_scaled_down(traces_dir):
    from kvtriton.workloads import load_mooncake
    reqs = load_mooncake(traces_dir / "conversation_trace.jsonl", limit=12)
    c = cfg(num_layers=1, max_input_tokens=1024, max_output_tokens=2, ignore_arrivals=True, max_batch=12)
    res = replay_device(reqs, "tiny", "lru", capacity_blocks=1024, config=c)
    s = res.summary
    assert s["completed"] == 12
    assert s["lookup_blocks"] == sum(min(r.input_length, 1024) // 16 for r in reqs)
    assert s["hit_blocks"] >= 11 * 32  # every prompt starts with the trace's shared block 0


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_workloads_keep_invariants(data):
    """Random prompts sharing random prefixes, random capacities and batch limits: every step leaves the
    pool valid and the replay's block tables equal to the caches'; everything completes."""
    n = data.draw(st.integers(1, 7), label="requests")
    reqs = []
    for i in range(n):
        shared = data.draw(st.integers(0, 3), label="shared blocks")
        own = data.draw(st.integers(0, 3), label="own blocks")
        ids = list(range(shared)) + [100 * (i + 1) + k for k in range(own)]
        n_in = max(1, len(ids) * 16 - data.draw(st.integers(0, 15), label="short by"))
        ids = ids[: -(-n_in // 16)] or [1000 + i]
        reqs.append(req(i, ids, n_in, data.draw(st.integers(1, 24), label="output"),
                        t=data.draw(st.floats(0, 0.05), label="arrival")))
    reqs.sort(key=lambda r: r.arrival_s)
    need = max(-(-(r.input_length + r.output_length - 1) // 16) for r in reqs)
    cap = need + data.draw(st.integers(0, 12), label="extra capacity")
    c = cfg(max_batch=data.draw(st.integers(1, 4), label="max_batch"), check_invariants=True,
            compaction_threshold=data.draw(st.sampled_from([None, 0.1])), compaction_check_every=2,
            chunk_bytes=2 * TINY1.bytes_per_block)
    policy = data.draw(st.sampled_from(["lru", "fifo", "s3fifo", "sieve", "arc"]), label="policy")
    res = replay_device(reqs, TINY1, policy, capacity_blocks=cap, config=c)
    check_sane(res, reqs)


def mreq(i, model, ids, n_in, n_out, t=0.0):
    return Request(request_id=i, arrival_s=t, input_length=n_in, output_length=n_out, hash_ids=tuple(ids),
                   block_tokens=16, model=model)


def test_several_models_share_one_arena():
    """VISTA and DeepSeek-OCR pools in one arena: the VISTA pool's cached blocks fill it, so the first
    DeepSeek-OCR request gets its chunks back by a compaction that evicts them."""
    specs = {"vista": get_spec("vista").with_(num_layers=1), "deepseek-ocr": get_spec("deepseek-ocr").with_(num_layers=1)}
    # 64 KiB and 80 KiB blocks; the arena is two chunks of 2 MiB: 64 VISTA blocks
    reqs = [mreq(i, "vista", [10 * i + k for k in range(5)], 76, 4, t=0.1 * i) for i in range(12)]
    reqs += [mreq(12 + i, "deepseek-ocr", [500 + 10 * i + k for k in range(5)], 80, 6, t=5.0 + 0.1 * i)
             for i in range(3)]
    res = replay_device(reqs, specs, "lru", budget_bytes=4 << 20,
                        config=cfg(check_invariants=True, max_batch=4))
    s = res.summary
    assert s["completed"] == 15 and s["vista.completed"] == 12 and s["deepseek-ocr.completed"] == 3
    assert s["capacity_blocks"] == 0 and s["arena_bytes"] == 4 << 20
    assert s["compactions"] >= 1 and s["chunks_returned"] >= 1
    assert s["decode_tokens"] == 12 * 3 + 3 * 5
    assert max(r["vista.held_bytes"] for r in res.timeseries) == 4 << 20
    assert max(r["deepseek-ocr.held_bytes"] for r in res.timeseries) > 0
    assert all(r["vista.held_bytes"] + r["deepseek-ocr.held_bytes"] <= 4 << 20 for r in res.timeseries)
    check_sane_multi = [row for row in res.requests if row["model"] == "deepseek-ocr"]
    assert len(check_sane_multi) == 3


def test_model_none_routes_by_request_field():
    from kvtriton.workloads import design_mix_workload
    reqs = design_mix_workload(8, vista_fraction=0.5, output_tokens=2, block_tokens=16, seed=4)
    res = replay_device(reqs, None, "lru", budget_bytes=32 << 20, config=cfg(num_layers=1))
    s = res.summary
    assert s["completed"] == 8 and set(s["model"].split(",")) == {r.model for r in reqs}
    assert sum(s[f"{m}.requests"] for m in s["model"].split(",")) == 8


@pytest.mark.parametrize("call, match", [
    (lambda: replay_device([mreq(0, "vista", [1], 20, 2)], {"vista": "vista", "deepseek-ocr": "deepseek-ocr"},
                           "lru", capacity_blocks=50, config=cfg(num_layers=1)), "budget_bytes"),
    (lambda: replay_device([mreq(0, "llama", [1], 20, 2)], {"vista": "vista", "deepseek-ocr": "deepseek-ocr"},
                           "lru", budget_bytes=8 << 20, config=cfg(num_layers=1)), "must be one of"),
    (lambda: replay_device([req(0, [1], 20, 2)], None, "lru", budget_bytes=8 << 20, config=cfg()), "model=None"),
    (lambda: replay_device([mreq(0, "vista", [1], 20, 2)], {}, "lru", budget_bytes=8 << 20, config=cfg()),
     "at least one"),
    (lambda: replay_device([mreq(0, "vista", [1], 2000, 2)], {"vista": "vista", "deepseek-ocr": "deepseek-ocr"},
                           "lru", budget_bytes=4 << 20, config=cfg(num_layers=1)), "below one request"),
])
def test_several_models_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_policy_kwargs_reach_the_pool_and_bad_ones_are_refused():
    from kvtriton.replay import DeviceReplayConfig, replay_device
    from kvtriton.workloads import make_workload

    reqs = make_workload("zipf", num_requests=6, block_tokens=64, suffix_tokens=(16, 64), output_tokens=(2, 4))
    cfg = DeviceReplayConfig(device="cpu")
    with ops.backend("reference"):
        res = replay_device(reqs, "tiny", "s3fifo", capacity_blocks=256, config=cfg,
                            policy_kwargs={"small_ratio": 0.25})
    assert res.summary["completed"] == 6
    with pytest.raises(ValueError, match="policy_kwargs"):
        replay_device(reqs, "tiny", "lru", capacity_blocks=256, config=cfg, policy_kwargs={"nosuch": 1})


def test_kernel_warm_up_runs_on_the_pool_layout_and_changes_no_result():
    """The warm-up that runs by default on CUDA, forced here on the CPU (Triton's interpreter)."""
    from kvtriton.replay import DeviceReplayConfig, replay_device
    from kvtriton.workloads import make_workload

    reqs = make_workload("zipf", num_requests=4, block_tokens=64, suffix_tokens=(16, 48), output_tokens=(2, 3))
    runs = [replay_device(reqs, "tiny", "lru", capacity_blocks=128,
                          config=DeviceReplayConfig(device="cpu", warmup=w, step_time_s=0.01))
            for w in (True, False)]
    keys = ("completed", "hit_rate", "prefill_tokens_saved", "evictions", "decode_tokens")
    assert [r.summary[k] for k in keys for r in runs[:1]] == [r.summary[k] for k in keys for r in runs[1:]]
    with pytest.raises(ValueError, match="config.warmup"):
        DeviceReplayConfig(device="cpu", warmup="yes").validate()
