"""Seeded RULER-style long-context tasks, built as chat prompts with the tokenizer's template.

Three retrieval tasks, each a needle (or several) hidden in natural filler text:

* ``passkey``: a 5-digit pass key at ``depth`` in the filler; the answer is the key.
* ``multikey``: ``num_keys`` pass keys, each under a name ("the pass key for Falcon is 40261"); the asked
  one sits at ``depth``, the others at seeded random depths; the answer is the asked key.
* ``vartrack``: variable tracking, ``chains`` chains of ``hops`` + 1 assignments (``VAR QBX = 40261 .``,
  then ``VAR ZKL = QBX .``, ...): the first assignment of the asked chain at ``depth``, the others' at
  seeded depths, each hop further on; the question asks the value of the asked chain's last variable,
  held only by the chain's first line. One chain by default (with two, the other chain holds another
  5-digit value, which SmolLM2-135M cannot tell apart at 512 tokens: 0 of 3).

The filler is natural English: the Debian license texts in ``/usr/share/common-licenses`` (Apache-2.0,
GPL-2, LGPL-2.1, MPL-2.0, Artistic, GFDL-1.3; GPL-3 is kept apart for the perplexity text), split into
sentences; sentences holding 5-digit numbers (a postal code) are left out so that no filler number looks
like a key. A sample takes consecutive sentences from a seeded start, as many as fit the requested
context, and inserts the needles between sentences.

Each prompt is ``chat_template(user message, add_generation_prompt=True)`` followed by an answer prefix
in the assistant turn ("The pass key is"), as RULER does, so that the answer is the next tokens.
``context_tokens`` counts the whole prompt; the prompt is within ``TOLERANCE`` of it.

Scoring: ``exact`` is 1 when the answer appears in the generated text as a whole number (not inside a
longer digit run); ``partial`` is the fraction of the answer's digits that the first number of the
generated text has at the same positions.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..checks import check_int, is_number

__all__ = ["TASKS", "LICENSE_DIR", "FILLER_FILES", "TOLERANCE", "Sample", "make_sample", "make_samples",
           "score_answer", "exact_match", "partial_match", "filler_sentences", "check_task", "check_depth",
           "min_context_tokens", "tolerance"]

TASKS = ("passkey", "multikey", "vartrack")
LICENSE_DIR = Path("/usr/share/common-licenses")
FILLER_FILES = ("Apache-2.0", "GPL-2", "LGPL-2.1", "MPL-2.0", "Artistic", "GFDL-1.3")
TOLERANCE = 0.05          # a prompt is within 5% (or 48 tokens, whichever is larger) of context_tokens
_NAMES = ("Falcon", "Maple", "Copper", "Harbor", "Juniper", "Meadow", "Orchid", "Saffron", "Tundra", "Willow",
          "Cobalt", "Ember")
_MIN_FILLER = 32          # tokens of filler a prompt needs at least


@dataclass(frozen=True)
class Sample:
    """One prompt: ``prompt_ids`` (template and answer prefix included), the expected ``answer``, the
    task, the requested and actual token counts, the ``depth`` asked and the token offset of the asked
    needle in the prompt (``needle_token``), and the ``needle`` sentence itself."""

    task: str
    prompt_ids: list
    answer: str
    context_tokens: int
    depth: float
    seed: int
    needle: str
    needle_token: int
    prompt_tokens: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "prompt_tokens", len(self.prompt_ids))


def check_task(task) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    return task


def check_depth(depth, name: str = "depth") -> float:
    if not is_number(depth) or not 0.0 <= float(depth) <= 1.0 or not math.isfinite(float(depth)):
        raise ValueError(f"{name} must be a number in [0, 1] (0 = start of the context, 1 = end), got {depth!r}")
    return float(depth)


def _sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text)
    parts = re.split(r"(?<=[.;:!?])\s+(?=[A-Z(\"])", text)
    return [p.strip() for p in parts if len(p.split()) >= 4 and not re.search(r"\d{5,}", p)]


@functools.lru_cache(maxsize=4)
def filler_sentences(files: tuple = FILLER_FILES, directory: str = str(LICENSE_DIR)) -> tuple:
    """The filler corpus: the sentences of the license ``files`` under ``directory``, in file order.
    FileNotFoundError naming the directory when none of the files is there."""
    found = [Path(directory) / f for f in files if (Path(directory) / f).is_file()]
    if not found:
        raise FileNotFoundError(f"no filler text: none of {', '.join(files)} is in {directory} (Debian's "
                                f"license texts, package base-files)")
    out = []
    for p in found:
        out.extend(_sentences(p.read_text(encoding="utf-8", errors="replace")))
    return tuple(out)


@functools.lru_cache(maxsize=8)
def _sentence_lengths(tokenizer, corpus: tuple) -> tuple:
    return tuple(len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]) for s in corpus)


def _key(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def _var(rng: random.Random, used: set) -> str:
    while True:
        v = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(3))
        if v not in used:
            used.add(v)
            return v


def _needles(task: str, rng: random.Random, depth: float, num_keys: int, hops: int, chains: int = 1):
    """(needles [(depth, sentence)], the asked needle's sentence, answer, question, answer prefix)."""
    if task == "passkey":
        key = _key(rng)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        return ([(depth, needle)], needle, key,
                "What is the pass key? Answer with the number only.", "The pass key is")
    if task == "multikey":
        names = rng.sample(_NAMES, num_keys)
        keys = []
        while len(keys) < num_keys:
            k = _key(rng)
            if k not in keys:
                keys.append(k)
        needles = [(depth if i == 0 else rng.random(), f"The pass key for {n} is {k}. Remember it.")
                   for i, (n, k) in enumerate(zip(names, keys))]
        return (needles, needles[0][1], keys[0],
                f"What is the pass key for {names[0]}? Answer with the number only.",
                f"The pass key for {names[0]} is")
    used: set = set()
    needles, last, values = [], None, []
    for chain in range(chains):
        value = _key(rng)
        while value in values:
            value = _key(rng)
        values.append(value)
        start = depth if chain == 0 else rng.random()
        names = [_var(rng, used) for _ in range(hops + 1)]
        stmts = [f"VAR {names[0]} = {value} ."] + [f"VAR {names[i + 1]} = {names[i]} ." for i in range(hops)]
        gaps = [start + (1.0 - start) * (i / (hops + 1)) for i in range(hops + 1)]
        needles.extend(zip(gaps, stmts))
        if chain == 0:
            last, asked = names[-1], stmts[0]
    return (needles, asked, values[0],
            f"Follow the VAR assignments in the text. What is the value of {last}? Answer with the number only.",
            f"The value of {last} is")


_INTRO = {
    "passkey": ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize "
                "it. I will quiz you about the pass key."),
    "multikey": ("Several pass keys, each with a name, are hidden inside a lot of irrelevant text. Find them "
                 "and memorize them. I will quiz you about one of them."),
    "vartrack": ("Memorize the variable assignments (lines starting with VAR) hidden in the following text. "
                 "A variable may be assigned the value of another variable."),
}


def _encode(tokenizer, user: str, prefix: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return ids + list(tokenizer(prefix, add_special_tokens=False)["input_ids"])


def _assemble(task, sentences, needles, question, lengths=None) -> str:
    """The user message: intro, filler with each needle inserted at the sentence boundary nearest its depth
    (a fraction of the filler's tokens, ``lengths`` the sentences' token counts)."""
    body = list(sentences)
    lengths = [1] * len(sentences) if lengths is None else list(lengths)
    cum = [0] + list(itertools.accumulate(lengths))

    def boundary(d):
        return min(range(len(cum)), key=lambda j: (abs(cum[j] - d * cum[-1]), j))

    slots = sorted(((boundary(d), i, s) for i, (d, s) in enumerate(needles)), reverse=True)
    for at, _, s in slots:
        body.insert(at, s)
    return f"{_INTRO[task]}\n\n{' '.join(body)}\n\n{question}"


def min_context_tokens(tokenizer, task: str, num_keys: int = 4, hops: int = 2, chains: int = 1) -> int:
    """The shortest ``context_tokens`` a prompt of ``task`` can have: template, needles and question, plus
    a little filler."""
    needles, _, _, question, prefix = _needles(check_task(task), random.Random(0), 0.5, num_keys, hops, chains)
    return len(_encode(tokenizer, _assemble(task, [], needles, question), prefix)) + _MIN_FILLER


def _pick_filler(tokenizer, corpus, budget: int, rng: random.Random) -> tuple[list[str], list[int]]:
    lengths = _sentence_lengths(tokenizer, corpus)
    start, out, used, sizes = rng.randrange(len(corpus)), [], 0, []
    i = start
    while used < budget:
        n = lengths[i % len(corpus)]
        if used + n > budget and out and used + n - budget >= budget - used:
            break                        # the next sentence would overshoot by more than we fall short
        out.append(corpus[i % len(corpus)])
        sizes.append(n)
        used += n
        i += 1
        if i - start >= 4 * len(corpus):  # pragma: no cover - budget far beyond the corpus
            break
    return out, sizes


def make_sample(task: str, tokenizer, *, context_tokens: int, depth: float = 0.5, seed: int = 0,
                num_keys: int = 4, hops: int = 2, chains: int = 1, corpus: tuple | None = None) -> Sample:
    """One prompt of ``task`` (see the module docstring) of about ``context_tokens`` tokens with the asked
    needle at ``depth`` in [0, 1] of the filler; the same arguments give the same prompt.

    ValueError naming the argument: an unknown task (the valid ones listed), a depth outside [0, 1], a
    context too short for the task (the minimum given), ``num_keys`` outside [2, 12], ``hops`` < 1,
    ``chains`` outside [1, 4]."""
    check_task(task)
    context_tokens = check_int("context_tokens", context_tokens, 1)
    depth = check_depth(depth)
    seed = check_int("seed", seed, 0)
    check_int("num_keys", num_keys, 2, len(_NAMES))
    check_int("hops", hops, 1)
    check_int("chains", chains, 1, 4)
    least = min_context_tokens(tokenizer, task, num_keys, hops, chains)
    if context_tokens < least:
        raise ValueError(f"context_tokens must be at least {least} for task {task!r} (template, needles and "
                         f"question), got {context_tokens}")
    rng = random.Random(f"{task}:{seed}:{depth!r}:{context_tokens}")
    needles, asked, answer, question, prefix = _needles(task, rng, depth, num_keys, hops, chains)
    corpus = filler_sentences() if corpus is None else corpus
    fixed = len(_encode(tokenizer, _assemble(task, [], needles, question), prefix))
    sentences, lengths = _pick_filler(tokenizer, corpus, context_tokens - fixed, rng)
    user = _assemble(task, sentences, needles, question, lengths)
    ids = _encode(tokenizer, user, prefix)
    return Sample(task=task, prompt_ids=ids, answer=answer, context_tokens=context_tokens, depth=depth,
                  seed=seed, needle=asked, needle_token=_needle_token(tokenizer, user, asked, len(ids)))


def _needle_token(tokenizer, user: str, needle: str, num_ids: int) -> int:
    """The index of the prompt token where ``needle`` starts (from the rendered template's offsets)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                         tokenize=False)
    at = text.index(needle)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if b > at:
            return min(i, num_ids - 1)
    return num_ids - 1  # pragma: no cover


def make_samples(task: str, tokenizer, *, context_tokens: int, num_samples: int, seed: int = 0,
                 depth: float | None = None, **kw) -> list[Sample]:
    """``num_samples`` prompts with seeds ``seed, seed + 1, ...``. ``depth`` None spreads the asked needle
    evenly over [0.1, 0.9] across the samples (0.5 for one sample); a number puts every needle there."""
    num_samples = check_int("num_samples", num_samples, 1)
    seed = check_int("seed", seed, 0)
    if depth is None:
        depths = [0.5] if num_samples == 1 else [0.1 + 0.8 * i / (num_samples - 1) for i in range(num_samples)]
    else:
        depths = [check_depth(depth)] * num_samples
    return [make_sample(task, tokenizer, context_tokens=context_tokens, depth=d, seed=seed + i, **kw)
            for i, d in enumerate(depths)]


def exact_match(text: str, answer: str) -> float:
    """1.0 when ``answer`` appears in ``text`` as a whole number (not inside a longer digit run)."""
    return 1.0 if re.search(rf"(?<!\d){re.escape(str(answer))}(?!\d)", str(text)) else 0.0


def partial_match(text: str, answer: str) -> float:
    """The fraction of ``answer``'s characters that the first digit run of ``text`` has at the same
    positions (0.0 when ``text`` holds no digit)."""
    answer = str(answer)
    m = re.search(r"\d+", str(text))
    if not m or not answer:
        return 0.0
    got = m.group(0)
    return sum(a == b for a, b in zip(got, answer)) / len(answer)


def score_answer(text: str, answer: str, rule: str = "exact") -> float:
    """Score generated ``text`` against ``answer`` by ``rule``: ``exact`` or ``partial``."""
    if rule == "exact":
        return exact_match(text, answer)
    if rule == "partial":
        return partial_match(text, answer)
    raise ValueError(f"rule must be one of exact, partial, got {rule!r}")


def tolerance(context_tokens: int) -> int:
    """How far a prompt's length may be from ``context_tokens``."""
    return max(48, math.ceil(TOLERANCE * context_tokens))


