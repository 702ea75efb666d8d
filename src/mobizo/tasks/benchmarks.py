"""The benchmark suite of the ZO literature (MeZO, MobiZO), read from local files.

Each task reads the column layout of the corresponding Hugging Face dataset
(``glue/sst2``, ``super_glue/rte``, ``boolq``, ``ai2_arc``, ``winogrande``,
``squad``, ``drop``, ...) from JSONL / JSON / CSV / Parquet files or a
``datasets.save_to_disk`` folder (see :mod:`mobizo.tasks.io`), and renders it
with MeZO's prompt templates (``large_models/templates.py``): the label word or
answer follows the prompt and is the only supervised text.

Where MeZO has no causal-LM template (MRPC, QQP, QNLI, WNLI) the template is
the PromptSource-style "... Yes or No?\\n" question MeZO uses for its other
pair tasks; docs/tasks.md lists every template.
"""

from __future__ import annotations

import ast
import json
from typing import Any, ClassVar

from ..errors import MobizoError
from .base import Example, Task, parse_label, register
from .custom import parse_label_words
from .io import find_split, read_records

# --------------------------------------------------------------- record fields


class Record:
    """One raw row with error messages that name the file, the row and the column."""

    def __init__(self, row: dict, where: str):
        self.row = row
        self.where = where

    def _missing(self, name: str) -> MobizoError:
        columns = ", ".join(map(str, self.row)) or "none"
        return MobizoError(f"{self.where}: missing column {name!r} (columns: {columns})")

    def has(self, name: str) -> bool:
        return self.row.get(name) is not None

    def get(self, *names: str) -> Any:
        """The first present, non-null column of ``names`` (alternative spellings of one column)."""
        for name in names:
            if self.row.get(name) is not None:
                return self.row[name]
        raise self._missing(names[0])

    def text(self, *names: str) -> str:
        value = self.get(*names)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise MobizoError(f"{self.where}: column {names[0]!r} should be text, got {type(value).__name__}")
        return str(value)

    def nested(self, name: str, key: str) -> list:
        """``row[name][key]`` as a list: a struct column (Parquet, save_to_disk, JSON), a JSON or
        Python-literal string (CSV), or a flattened ``name.key`` column (``Dataset.flatten()``)."""
        flat = f"{name}.{key}"
        if self.row.get(flat) is not None:
            value = self.row[flat]
        else:
            outer = self.get(name)
            if isinstance(outer, str):
                outer = _parse_literal(outer, f"{self.where}: column {name!r}")
            if not isinstance(outer, dict) or key not in outer:
                raise MobizoError(
                    f"{self.where}: column {name!r} should be a struct with a {key!r} list, got {outer!r:.80}"
                )
            value = outer[key]
        if isinstance(value, str):
            value = _parse_literal(value, f"{self.where}: column {flat}") if value.lstrip()[:1] == "[" else [value]
        if not isinstance(value, (list, tuple)):
            raise MobizoError(f"{self.where}: {flat} should be a list, got {type(value).__name__}")
        return list(value)


def _parse_literal(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise MobizoError(f"{where}: cannot parse {text[:60]!r} as JSON or a Python literal") from e


def follow(prompt: str, word: str) -> str:
    """``word`` as the text that follows ``prompt``: a leading space unless the prompt ends in whitespace."""
    return word if prompt[-1:].isspace() else " " + word


def question(q: str) -> str:
    """MeZO's BoolQ question: capitalized, ending with '?'."""
    q = q.strip()
    if not q:
        return q
    if not q.endswith("?"):
        q += "?"
    return q[0].upper() + q[1:]


# --------------------------------------------------------------- base classes


class BenchmarkTask(Task):
    """A task with a fixed template over the HF column layout; subclasses implement :meth:`build`."""

    hf_dataset: ClassVar[str] = ""  # where the layout comes from, for messages and docs/tasks.md
    columns: ClassVar[tuple[str, ...]] = ()
    label_columns: ClassVar[tuple[str, ...]] = ("label",)  # the gold answer's column(s), absent from new inputs

    def __init__(self, data=None, template: str | None = None, label_words=None, **options):
        super().__init__(data=data, **options)
        if template:
            raise MobizoError(f"task {self.name} has a fixed template; --template is for --task custom")
        self._label_words = label_words

    def choices(self, rec: Record) -> tuple[str, list[str]]:  # pragma: no cover - abstract
        """(prompt, candidates) of a classification / multiple-choice record."""
        raise NotImplementedError

    def label(self, rec: Record) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def build(self, rec: Record) -> Example:
        prompt, candidates = self.choices(rec)
        return Example(prompt=prompt, candidates=candidates, label=self.label(rec))

    def input_fields(self) -> list[str]:
        return [c for c in self.columns if c not in self.label_columns]

    def example(self, record: dict, where: str) -> Example:
        if self.kind not in ("classification", "multiple_choice"):
            return super().example(record, where)
        prompt, candidates = self.choices(Record(record, where))
        return Example(prompt=prompt, candidates=candidates)

    def load_split(self, split: str) -> list[Example]:
        path = find_split(self.data, split)
        rows = read_records(path, split)
        return [self.build(Record(row, f"{path} record {i}")) for i, row in enumerate(rows, 1)]


class ClassificationTask(BenchmarkTask):
    """Label words compared by summed log-prob. ``label_names`` are the HF ClassLabel names."""

    kind = "classification"
    label_names: ClassVar[tuple[str, ...]] = ()
    label_words: ClassVar[tuple[str, ...]] = ()

    def __init__(self, data=None, template=None, label_words=None, **options):
        super().__init__(data=data, template=template, label_words=label_words, **options)
        self.words = list(self.label_words)
        if label_words:
            words = parse_label_words(label_words)
            if len(words) != len(self.label_names):
                raise MobizoError(
                    f"task {self.name} has {len(self.label_names)} classes {list(self.label_names)}; "
                    f"--label-words gave {len(words)}"
                )
            self.words = words

    def prompt(self, rec: Record) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def label(self, rec: Record) -> int:
        return parse_label(rec.get("label"), self.label_names, rec.where)

    def choices(self, rec: Record) -> tuple[str, list[str]]:
        prompt = self.prompt(rec)
        return prompt, [follow(prompt, w) for w in self.words]


class MultipleChoiceTask(BenchmarkTask):
    """Candidates compared by mean log-prob per token; ``--label-words`` does not apply."""

    kind = "multiple_choice"

    def __init__(self, data=None, template=None, label_words=None, **options):
        super().__init__(data=data, template=template, label_words=label_words, **options)
        if label_words:
            raise MobizoError(f"task {self.name} is multiple choice; --label-words does not apply")


class GenerationTask(BenchmarkTask):
    """Extractive QA: train on ``" answer\\n"``, eval by greedy generation with token F1 / exact match."""

    kind = "generation"

    def __init__(self, data=None, template=None, label_words=None, **options):
        super().__init__(data=data, template=template, label_words=label_words, **options)
        if label_words:
            raise MobizoError(f"task {self.name} is generative; --label-words does not apply")

    def answers(self, rec: Record) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def prompt(self, rec: Record) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def build(self, rec: Record) -> Example:
        answers = []
        for a in self.answers(rec):
            a = " ".join(str(a).split())
            if a and a not in answers:
                answers.append(a)
        if not answers:
            raise MobizoError(f"{rec.where}: no non-empty answer (unanswerable questions are not supported)")
        return Example(prompt=self.prompt(rec), target=" " + answers[0] + "\n", answers=answers)


# --------------------------------------------------------------- classification


@register
class SST2(ClassificationTask):
    name = "sst2"
    hf_dataset = "glue/sst2"
    columns = ("sentence", "label")
    label_names = ("negative", "positive")
    label_words = ("terrible", "great")

    def prompt(self, rec):
        return f"{rec.text('sentence').strip()} It was"


@register
class RTE(ClassificationTask):
    name = "rte"
    hf_dataset = "super_glue/rte"
    columns = ("premise", "hypothesis", "label")
    label_names = ("entailment", "not_entailment")
    label_words = ("Yes", "No")

    def prompt(self, rec):
        premise, hypothesis = rec.text("premise", "sentence1"), rec.text("hypothesis", "sentence2")
        return f'{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n'


@register
class BoolQ(ClassificationTask):
    name = "boolq"
    hf_dataset = "boolq (answer: bool) or super_glue/boolq (label)"
    columns = ("question", "passage", "answer|label")
    label_columns = ("answer|label",)
    label_names = ("false", "true")
    label_words = ("No", "Yes")

    def prompt(self, rec):
        return f"{rec.text('passage')} {question(rec.text('question'))}\n"

    def label(self, rec):
        return parse_label(rec.get("answer", "label"), self.label_names, rec.where)


@register
class WiC(ClassificationTask):
    name = "wic"
    hf_dataset = "super_glue/wic"
    columns = ("word", "sentence1", "sentence2", "label")
    label_names = ("false", "true")
    label_words = ("No", "Yes")

    def prompt(self, rec):
        return (
            f'Does the word "{rec.text("word")}" have the same meaning in these two sentences? Yes, No?\n'
            f"{rec.text('sentence1')}\n{rec.text('sentence2')}\n"
        )


@register
class WSC(ClassificationTask):
    name = "wsc"
    hf_dataset = "super_glue/wsc.fixed"
    columns = ("text", "span1_text", "span2_text", "label")
    label_names = ("false", "true")
    label_words = ("No", "Yes")

    def prompt(self, rec):
        return (
            f"{rec.text('text')}\nIn the previous sentence, does the pronoun "
            f'"{rec.text("span2_text").lower()}" refer to {rec.text("span1_text")}? Yes or No?\n'
        )


@register
class MultiRC(ClassificationTask):
    name = "multirc"
    hf_dataset = "super_glue/multirc"
    columns = ("paragraph", "question", "answer", "label")
    label_names = ("false", "true")
    label_words = ("No", "Yes")

    def prompt(self, rec):
        return (
            f"{rec.text('paragraph')}\nQuestion: {rec.text('question')}\n"
            f'I found this answer "{rec.text("answer")}". Is that correct? Yes or No?\n'
        )


@register
class CB(ClassificationTask):
    name = "cb"
    hf_dataset = "super_glue/cb"
    columns = ("premise", "hypothesis", "label")
    label_names = ("entailment", "contradiction", "neutral")
    label_words = ("Yes", "No", "Maybe")

    def prompt(self, rec):
        return f'Suppose {rec.text("premise")} Can we infer that "{rec.text("hypothesis")}"? Yes, No, or Maybe?\n'


@register
class MRPC(ClassificationTask):
    name = "mrpc"
    hf_dataset = "glue/mrpc"
    columns = ("sentence1", "sentence2", "label")
    label_names = ("not_equivalent", "equivalent")
    label_words = ("No", "Yes")

    def prompt(self, rec):
        return (
            f"{rec.text('sentence1')}\n{rec.text('sentence2')}\n"
            "Do these two sentences mean the same thing? Yes or No?\n"
        )


@register
class QQP(ClassificationTask):
    name = "qqp"
    hf_dataset = "glue/qqp"
    columns = ("question1", "question2", "label")
    label_names = ("not_duplicate", "duplicate")
    label_words = ("No", "Yes")

    def prompt(self, rec):
        return (
            f"{rec.text('question1')}\n{rec.text('question2')}\nDo these two questions ask the same thing? Yes or No?\n"
        )


@register
class QNLI(ClassificationTask):
    name = "qnli"
    hf_dataset = "glue/qnli"
    columns = ("question", "sentence", "label")
    label_names = ("entailment", "not_entailment")
    label_words = ("Yes", "No")

    def prompt(self, rec):
        return f'{rec.text("sentence")}\nDoes this sentence answer the question "{rec.text("question")}"? Yes or No?\n'


@register
class WNLI(ClassificationTask):
    name = "wnli"
    hf_dataset = "glue/wnli"
    columns = ("sentence1", "sentence2", "label")
    label_names = ("not_entailment", "entailment")
    label_words = ("No", "Yes")

    def prompt(self, rec):
        return f'{rec.text("sentence1")}\nDoes this mean that "{rec.text("sentence2")}" is true? Yes or No?\n'


# --------------------------------------------------------------- multiple choice


@register
class COPA(MultipleChoiceTask):
    """MeZO's CopaTemplate: "<premise without '.'> because|so" + " <choice, first word lowercased>"."""

    name = "copa"
    hf_dataset = "super_glue/copa"
    columns = ("premise", "choice1", "choice2", "question", "label")

    @staticmethod
    def _choice(c: str) -> str:
        words = c.strip().split(" ")
        if words[0] != "I":
            words[0] = words[0].lower()
        return " ".join(words)

    def choices(self, rec):
        premise = rec.text("premise").rstrip()
        premise = premise.removesuffix(".")
        kind = rec.text("question").strip().lower()
        if kind not in ("cause", "effect"):
            raise MobizoError(f"{rec.where}: question {kind!r} should be 'cause' or 'effect'")
        prompt = premise + (" because" if kind == "cause" else " so")
        return prompt, [" " + self._choice(rec.text(c)) for c in ("choice1", "choice2")]

    def label(self, rec):
        return parse_label(rec.get("label"), ("choice1", "choice2"), rec.where)


@register
class WinoGrande(MultipleChoiceTask):
    """The blank splits the sentence: the text before it is the prompt, each option plus the rest
    of the sentence is a candidate (see docs/tasks.md for how this relates to MeZO's template)."""

    name = "winogrande"
    hf_dataset = "winogrande (winogrande_xl / _debiased)"
    columns = ("sentence", "option1", "option2", "answer")
    label_columns = ("answer",)

    def choices(self, rec):
        sentence = rec.text("sentence")
        if sentence.count("_") != 1:
            found = sentence.count("_")
            raise MobizoError(f"{rec.where}: sentence should contain exactly one '_' blank, found {found}")
        before, after = sentence.split("_")
        options = [rec.text("option1"), rec.text("option2")]
        if before.strip():
            prompt, lead = (before.rstrip(), " ") if before[-1:].isspace() else (before, "")
        else:  # the blank opens the sentence: nothing to condition on but the model's BOS
            prompt, lead = "", ""
        return prompt, [lead + o + after for o in options]

    def label(self, rec):
        return one_based(rec.get("answer"), 2, rec.where)


def one_based(value: Any, n: int, where: str) -> int:
    """WinoGrande's ``answer``: "1" or "2" (a string in the HF layout; ints accepted)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if not text.isdigit() or not 1 <= int(text) <= n:
        hint = " (an unlabelled test split?)" if text in ("", "-1") else ""
        raise MobizoError(f"{where}: answer {value!r} should be one of {', '.join(map(str, range(1, n + 1)))}{hint}")
    return int(text) - 1


class ARC(MultipleChoiceTask):
    """GPT-3's ARC prompt as in MeZO: "Question: ...\\nAnswer:" + " <choice text>"."""

    hf_dataset = "ai2_arc"
    columns = ("question", "choices{text,label}", "answerKey")
    label_columns = ("answerKey",)

    @staticmethod
    def _choices(rec) -> tuple[list[str], list[str]]:
        texts = [str(t) for t in rec.nested("choices", "text")]
        labels = [str(t).strip() for t in rec.nested("choices", "label")]
        if len(texts) != len(labels) or len(texts) < 2:
            raise MobizoError(f"{rec.where}: choices should have as many labels as texts, and at least two")
        return texts, labels

    def choices(self, rec):
        texts, _ = self._choices(rec)
        return f"Question: {rec.text('question')}\nAnswer:", [" " + t.strip() for t in texts]

    def label(self, rec):
        _, labels = self._choices(rec)
        key = rec.text("answerKey").strip()
        if key not in labels:
            raise MobizoError(f"{rec.where}: answerKey {key!r} is not one of the choice labels {labels}")
        return labels.index(key)


@register
class ARCEasy(ARC):
    name = "arc-easy"
    hf_dataset = "ai2_arc/ARC-Easy"


@register
class ARCChallenge(ARC):
    name = "arc-challenge"
    hf_dataset = "ai2_arc/ARC-Challenge"


# --------------------------------------------------------------- generation


@register
class SQuAD(GenerationTask):
    name = "squad"
    hf_dataset = "squad"
    columns = ("context", "question", "answers{text}", "title (optional)")

    def prompt(self, rec):
        title = f"Title: {rec.text('title')}\n" if rec.has("title") else ""
        return f"{title}Context: {rec.text('context')}\nQuestion: {rec.text('question').strip()}\nAnswer:"

    def answers(self, rec):
        return rec.nested("answers", "text")


@register
class DROP(GenerationTask):
    name = "drop"
    hf_dataset = "drop (ucinlp/drop)"
    columns = ("passage", "question", "answers_spans{spans}")

    def prompt(self, rec):
        return f"Passage: {rec.text('passage')}\nQuestion: {rec.text('question').strip()}\nAnswer:"

    def answers(self, rec):
        return rec.nested("answers_spans", "spans")
