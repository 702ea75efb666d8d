"""``synthetic``: a built-in, deterministic sentiment-style classification task.

Each review mixes neutral filler with sentiment words of one polarity; the
answer after ``Sentiment:`` is `` good`` or `` bad``. It needs no files, so
``mobizo demo`` and the tests run anywhere.
"""

from __future__ import annotations

import random

from .base import Example, Task, register

POSITIVE = ["good", "great", "fun", "lovely", "superb", "brilliant", "wonderful", "charming", "excellent", "nice"]
NEGATIVE = ["bad", "awful", "boring", "terrible", "dull", "poor", "weak", "horrible", "dreadful", "sad"]
SUBJECTS = ["movie", "film", "plot", "story", "cast", "music", "ending", "acting", "script", "show", "scenes", "book"]
FILLER = ["really", "quite", "very", "truly", "rather", "so", "just", "simply"]
TEMPLATE = "Review: {text} Sentiment:"
LABEL_WORDS = ["bad", "good"]
SIZES = {"train": 4000, "validation": 500}


def _review(rng: random.Random, label: int) -> str:
    words = POSITIVE if label == 1 else NEGATIVE
    clauses = []
    for _ in range(rng.randint(1, 3)):
        clause = f"the {rng.choice(SUBJECTS)} was"
        if rng.random() < 0.5:
            clause += f" {rng.choice(FILLER)}"
        clauses.append(f"{clause} {rng.choice(words)}")
    return " and ".join(clauses)


def make_split(split: str, n: int | None = None, seed: int = 0) -> list[Example]:
    rng = random.Random(f"mobizo-synthetic:{seed}:{split}")
    out = []
    for _ in range(n or SIZES[split]):
        label = rng.randint(0, 1)
        out.append(
            Example(
                prompt=TEMPLATE.format(text=_review(rng, label)),
                candidates=[" " + w for w in LABEL_WORDS],
                label=label,
            )
        )
    return out


def tokenizer_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: the task's language plus everyday English."""
    corpus = [e.prompt + e.answer for e in make_split("train", 400, seed=99)]
    corpus += [
        "The quick brown fox jumps over the lazy dog. Question: Answer: True False yes no Yes No",
        "Premise: Hypothesis: Passage: Context: Title: Sentence 1: Sentence 2: because so what",
        (
            "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
            "must be in want of a wife. However little known the feelings or views of such a man may be."
        ),
        "positive negative neutral correct incorrect entailment contradiction not_entailment",
    ] * 20
    return corpus


@register
class SyntheticTask(Task):
    name = "synthetic"
    kind = "classification"
    needs_data = False

    def load_split(self, split: str) -> list[Example]:
        return make_split(split)

    def input_fields(self) -> list[str]:
        return ["text"]

    def example(self, record: dict, where: str) -> Example:
        from .custom import render

        return Example(prompt=render(TEMPLATE, record, where), candidates=[" " + w for w in LABEL_WORDS])
