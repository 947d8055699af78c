"""The device replay's phases one at a time on tiny cases: admit, prefill (its attention checked against
a float64 reference over the gathered K/V), decode (with preemption), complete, compact, and a whole
step's clock."""

import time

import pytest
import torch

from kvtriton import ops
from kvtriton.memory import GPUMemoryAllocator
from kvtriton.replay.device_config import DeviceReplayConfig
from kvtriton.replay import engine as engine_mod
from kvtriton.replay.engine import ReplayEngine, reclaimable_chunks
from kvtriton.replay.metrics import StepRecord
from kvtriton.replay.sequences import prepare_sequences, resolve_models
from kvtriton.spec import get_spec
from kvtriton.workloads import Request

TINY1 = get_spec("tiny").with_(num_layers=1)
BS = TINY1.block_size
PER_TOKEN = 1e-4


@pytest.fixture(autouse=True)
def _reference_ops():
    with ops.backend("reference"):
        yield


@pytest.fixture
def engine():
    made = []

    def make(reqs, capacity, **kw):
        kw.setdefault("compaction_threshold", None)
        kw.setdefault("step_time_s", 0.01)
        cfg = DeviceReplayConfig(device="cpu", prefill_s_per_token=PER_TOKEN, **kw)
        specs, by_request = resolve_models(TINY1, cfg)
        seqs = prepare_sequences(reqs, cfg, specs, by_request)
        eng = ReplayEngine(seqs, specs, "lru", capacity, None, cfg, torch.device("cpu"), GPUMemoryAllocator)
        made.append(eng)
        eng.bind_kernels()
        eng.metrics.start(eng._pool_row())
        return eng

    yield make
    for eng in made:
        eng.close()


def req(i, ids, n_in, n_out, t=0.0):
    return Request(request_id=i, arrival_s=t, input_length=n_in, output_length=n_out, hash_ids=tuple(ids),
                   block_tokens=BS)


def by_id(eng):
    return {s.req.request_id: s for s in eng.seqs}


def key_at(m, block: int, offset: int) -> torch.Tensor:
    return m.kv[0][0][block, offset]


def admitted_and_prefilled(eng, now=0.0):
    eng._arrive(now)
    st = StepRecord()
    eng._admit(st, now)
    eng._prefill(st, now)
    return st


def test_admit_pins_prefix_hits_first_come_first_served_up_to_the_batch(engine):
    eng = engine([req(0, [0, 1, 2], 48, 4), req(1, [0, 1, 5], 40, 4), req(2, [9], 16, 2, t=1.0)], 32, max_batch=2)
    eng._arrive(0.0)
    assert [s.req.request_id for s in eng.waiting] == [0, 1] and len(eng.pending) == 1
    st = StepRecord()
    eng._admit(st, 0.0)
    assert [(s.req.request_id, hits) for s, hits in st.admitted] == [(0, 0), (1, 2)]
    assert not eng.waiting and st.memory_s > 0
    m = eng.models[TINY1.name]
    assert [s.slot for s in m.running] == [0, 1] and list(m.lens[:2]) == [48, 40]
    assert m.counts.lookups == 3 + 2 and m.counts.hits == 2
    s0, s1 = m.running
    assert s1.blocks[:2] == s0.blocks[:2] and s1.blocks[2] not in s0.blocks  # shared prefix, private tail
    assert s0.admitted_at == s1.admitted_at == 0.0 and s1.order > s0.order
    eng._arrive(1.0)
    st2 = StepRecord()
    eng._admit(st2, 1.0)  # the batch is full: the head waits
    assert not st2.admitted and [s.req.request_id for s in eng.waiting] == [2]


def test_prefill_writes_only_the_missed_tokens_and_times_the_first_token(engine):
    eng = engine([req(0, [0, 1, 2], 48, 4), req(1, [0, 1, 5], 40, 4)], 32)
    m = eng.models[TINY1.name]
    before = m.kv[0][0].clone()
    st = admitted_and_prefilled(eng)
    s0, s1 = by_id(eng).values()
    assert eng.metrics.prefill_tokens == 88 and eng.metrics.prefill_tokens_computed == 48 + 8
    assert st.prefill_model_s == pytest.approx(56 * PER_TOKEN)
    assert 0 < st.prefill_attention_s < st.prefill_kernel_s  # append_kv, then the attention
    assert eng.metrics.prefill_attention_s == st.prefill_attention_s
    # the clock is fixed (step_time_s): a first token comes after the modelled prefill of its step so far
    assert s0.first_token_at == pytest.approx(48 * PER_TOKEN) and s1.first_token_at == pytest.approx(56 * PER_TOKEN)
    assert s0.generated == s1.generated == 1
    for t in range(48):
        assert torch.equal(key_at(m, s0.blocks[t // BS], t % BS), m.k_fill[t])
    for t in range(8):  # s1's hit blocks were not written again; its tail got the first 8 fill rows
        assert torch.equal(key_at(m, s1.blocks[2], t), m.k_fill[t])
    assert torch.equal(key_at(m, s1.blocks[2], 8), before[s1.blocks[2], 8])


def reference_prefill(m, s, first: int, q: torch.Tensor) -> torch.Tensor:
    """Float64 causal attention of queries ``q [n, num_q_heads, head_dim]`` at positions ``first ..
    first + n - 1`` of ``s`` over its K/V gathered from the pool's pages (layer 0)."""
    kc, vc = m.kv[0]
    bs, n_q = TINY1.block_size, q.shape[0]
    pos = torch.arange(first + n_q)
    blocks = torch.tensor(s.blocks, dtype=torch.int64)[pos // bs]
    k, v = kc[blocks, pos % bs].double(), vc[blocks, pos % bs].double()     # [keys, hkv, d]
    group = TINY1.num_q_heads // TINY1.num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / TINY1.head_dim ** 0.5
    visible = pos[None, :] <= (first + torch.arange(n_q))[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def capture_prefill_attention(eng):
    """Wrap the engine's prefill attention: every call's index tensors and output, in order."""
    calls, real = [], eng._prefill_attn

    def attn(q, kc, vc, block_tables, seq_lens, cu_seqlens_q, **kw):
        out = real(q, kc, vc, block_tables, seq_lens, cu_seqlens_q, **kw)
        calls.append(dict(q=q.clone(), bt=block_tables.clone(), lens=seq_lens.clone(), cu=cu_seqlens_q.clone(),
                          out=out.clone()))
        return out

    eng._prefill_attn = attn
    return calls


def test_prefill_attention_reads_the_hits_from_the_pages_and_computes_the_missed_part(engine):
    """One batched call per layer for the step's prompts; a prefix hit's missed tokens attend to the
    cached prefix (never rewritten) and causally to themselves, as a float64 reference over the gathered
    K/V computes."""
    eng = engine([req(0, [0, 1, 2], 48, 4), req(1, [0, 1, 5], 40, 4)], 32)
    calls = capture_prefill_attention(eng)
    st = admitted_and_prefilled(eng)
    m = eng.models[TINY1.name]
    s0, s1 = by_id(eng).values()
    assert s1.hit_blocks == 2 and len(calls) == TINY1.num_layers == 1
    c = calls[0]
    assert c["cu"].tolist() == [0, 48, 56] and c["lens"].tolist() == [48, 40]  # missed: 48, then 40 - 32
    assert c["bt"][0, :3].tolist() == s0.blocks and c["bt"][1, :3].tolist() == s1.blocks
    for rows, s, first in ((slice(0, 48), s0, 0), (slice(48, 56), s1, 32)):
        ref = reference_prefill(m, s, first, c["q"][rows])
        err = (c["out"][rows].double() - ref).norm() / ref.norm()
        assert err < 1e-5, (s.req.request_id, float(err))
    # each prompt's share of the batched time follows its query-key pairs: 48 * 49 / 2 vs 8 * 32 + 8 * 9 / 2
    w0, w1 = 48 * 49 // 2, 8 * 32 + 8 * 9 // 2
    assert s0.prefill_attention_s + s1.prefill_attention_s == pytest.approx(st.prefill_attention_s)
    assert s0.prefill_attention_s / s1.prefill_attention_s == pytest.approx(w0 / w1)


def test_prefill_attention_in_bounded_calls_chunks_a_long_prompt(engine, monkeypatch):
    """With calls of at most 24 query rows: a 48-token prompt is cut into two chunks (the second attends
    to the first through the pages) and the next prompt goes to a call of its own; the outputs are those
    of one whole-prompt call. A prompt wholly in the cache computes nothing."""
    monkeypatch.setattr(engine_mod, "PREFILL_CHUNK_TOKENS", 24)
    eng = engine([req(0, [0, 1, 2], 48, 4), req(1, [0, 1, 5], 40, 4), req(2, [0, 1], 32, 4)], 32)
    calls = capture_prefill_attention(eng)
    admitted_and_prefilled(eng)
    m = eng.models[TINY1.name]
    s0, s1, s2 = by_id(eng).values()
    assert m.q_fill.shape[0] == 24 and s2.hit_blocks == 2 and s2.prefill_attention_s == 0.0
    assert [(c["cu"].tolist(), c["lens"].tolist()) for c in calls] == [
        ([0, 24], [24]), ([0, 24], [48]), ([0, 8], [40])]
    for c, s, first in ((calls[0], s0, 0), (calls[1], s0, 24), (calls[2], s1, 32)):
        ref = reference_prefill(m, s, first, c["q"])
        assert (c["out"].double() - ref).norm() / ref.norm() < 1e-5


def test_measured_clock_ttft_includes_the_prefill_attention(engine):
    """On the measured clock a first token comes after the cost model, append_kv and the prompt's share
    of the prefill attention; on the fixed clock only the cost model counts."""
    for step_time_s in (None, 0.01):
        eng = engine([req(0, [0, 1, 2], 48, 4)], 32, step_time_s=step_time_s)
        real = eng._prefill_attn

        def slow(*args, **kw):
            time.sleep(0.05)
            return real(*args, **kw)

        eng._prefill_attn = slow
        st = admitted_and_prefilled(eng, now=1.0)
        (s,) = eng.seqs
        assert s.prefill_attention_s == st.prefill_attention_s >= 0.05
        want = 48 * PER_TOKEN + (st.prefill_kernel_s if step_time_s is None else 0.0)
        assert s.first_token_at - 1.0 == pytest.approx(want)
        if step_time_s is None:
            assert s.first_token_at - 1.0 >= 48 * PER_TOKEN + 0.05


def test_decode_appends_one_token_per_sequence_into_its_own_slot(engine):
    eng = engine([req(0, [0, 1], 32, 4), req(1, [7], 20, 4), req(2, [8], 16, 1)], 32)
    st = admitted_and_prefilled(eng)
    m = eng.models[TINY1.name]
    s0, s1, s2 = by_id(eng).values()
    eng._decode(st)
    assert st.finished == [s2] and s2.slot == -1  # one output token: done by its prefill, not decoded
    assert st.batch == 2 and m.counts.decode_tokens == 2 and st.decode_kernel_s > 0
    assert (s0.seq_len, s1.seq_len) == (33, 21) and s0.generated == s1.generated == 2
    assert len(s0.blocks) == 3  # token 33 opened a third block
    for s in (s0, s1):
        row = s.slot
        pos = s.seq_len - 1
        assert torch.equal(key_at(m, s.blocks[pos // BS], pos % BS), m.k_new[row])
        assert list(m.bt[row, :len(s.blocks)]) == s.blocks and m.lens[row] == s.seq_len
    eng.check_invariants()


def test_decode_preempts_the_latest_admitted_when_the_pool_is_full(engine):
    eng = engine([req(0, [0, 1], 32, 6), req(1, [2, 3], 32, 6)], 4)  # 4 blocks, each prompt fills 2
    st = admitted_and_prefilled(eng)
    s0, s1 = by_id(eng).values()
    eng._decode(st)
    assert eng.metrics.preemptions == 1 and s1.preemptions == 1 and s0.preemptions == 0
    assert list(eng.waiting) == [s1] and s1.cache is None and s1.slot == -1
    assert st.batch == 1 and s0.seq_len == 33 and s0.slot == 0
    eng.check_invariants()


def test_complete_releases_and_keeps_rows_dense(engine):
    eng = engine([req(0, [0, 1], 32, 2), req(1, [2], 20, 5), req(2, [3], 16, 5)], 32)
    st = admitted_and_prefilled(eng)
    eng._decode(st)
    s0, s1, s2 = by_id(eng).values()
    cached0 = eng.models[TINY1.name].pool.stats()["cached_blocks"]
    eng._complete(st)
    assert st.finished == [s0] and s0.cache is None and eng.metrics.completed == 1
    assert [s.slot for s in eng.models[TINY1.name].running] == [0, 1] and s2.slot == 0  # the last took row 0
    assert eng.models[TINY1.name].pool.stats()["cached_blocks"] == cached0 + 2  # its full prompt blocks stay cached
    eng.check_invariants()


def test_compact_gives_back_the_chunks_holes_leave(engine):
    n = 8
    eng = engine([req(i, [], BS, 3) for i in range(n)], n, max_batch=n, compaction_threshold=0.2,
                 compaction_check_every=1, chunk_bytes=2 * TINY1.bytes_per_block)
    st = admitted_and_prefilled(eng)
    m = eng.models[TINY1.name]
    for s in list(m.running):
        if s.blocks[0] % 2:  # one block of every 2-block chunk finishes: every chunk half empty
            s.generated = s.output_len
    eng._complete(st)
    stats = m.pool.stats()
    assert stats["external_fragmentation"] == pytest.approx(0.5) and reclaimable_chunks(stats, eng.chunk_bytes) == 2
    eng.metrics.steps = 1
    eng._compact(st)
    assert eng.metrics.compactions == 1 and eng.metrics.chunks_returned == 2 and eng.metrics.blocks_moved == 2
    assert st.compaction_s > 0 and m.pool.stats()["chunks_held"] == 2
    eng.check_invariants()  # the moved sequences' host rows follow their caches
    eng.metrics.steps = 2
    eng._compact(st)  # nothing left to give back
    assert eng.metrics.compactions == 1


def test_step_advances_the_clock_by_the_step_and_the_modelled_prefill(engine):
    eng = engine([req(0, [0, 1], 32, 2), req(1, [2], 20, 1)], 32)
    eng._arrive(0.5)
    st, now = eng.step(0.5)
    s0, s1 = by_id(eng).values()
    assert now == pytest.approx(0.5 + 0.01 + 52 * PER_TOKEN)
    assert st.finished == [s1, s0] and s0.finished_at == s1.finished_at == now
    assert eng.metrics.steps == 1 and eng.metrics.decode_tokens == 1 and st.kernel_s > 0
    assert st.other_s >= 0 and st.wall_s >= st.memory_s
