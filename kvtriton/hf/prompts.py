"""Short chat prompts for tests, benchmarks and notebooks: one list of questions, tokenised through a
model's chat template (its system prompt is the prefix the requests share)."""

from __future__ import annotations

QUESTIONS = (
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis in one sentence.",
    "List three primary colors.", "What is 12 times 7?", "Who wrote Romeo and Juliet?",
    "Give me a tip for learning to code.", "Why is the sky blue?", "Name a mammal that can fly.",
    "What does a CPU do?", "Translate 'good morning' into Spanish.", "Describe a cat in five words.",
    "What is the boiling point of water at sea level?", "Suggest a name for a pet goldfish.",
    "How many continents are there?", "What is the opposite of 'ancient'?", "Tell me a fun fact about octopuses.",
    "What is the largest planet in the solar system?", "Write one sentence about autumn.",
    "What language is spoken in Brazil?",
)


def chat_questions(n: int = len(QUESTIONS)) -> list[str]:
    """``n`` questions: the list in order, repeated with a "(take k)" suffix past its end."""
    return [QUESTIONS[i % len(QUESTIONS)] + ("" if i < len(QUESTIONS) else f" (take {i // len(QUESTIONS) + 1})")
            for i in range(n)]


def chat_prompts(tokenizer, n: int = len(QUESTIONS)) -> list[list[int]]:
    """:func:`chat_questions` as token-id lists, each one user turn through ``tokenizer``'s chat template."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"]
            for q in chat_questions(n)]
