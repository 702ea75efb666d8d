"""Custom (private) data: ``custom-cls`` classification from local files."""

from __future__ import annotations

import string

from ..errors import MobizoError
from .base import Example, Task, register
from .io import find_split, read_records


def parse_label_words(label_words: str | list[str] | None) -> list[str]:
    if label_words is None:
        raise MobizoError("--label-words is required for this task (e.g. --label-words bad,good)")
    words = [w.strip() for w in label_words.split(",")] if isinstance(label_words, str) else list(label_words)
    if len(words) < 2 or any(not w for w in words):
        raise MobizoError(f"--label-words needs at least two non-empty comma-separated words, got {label_words!r}")
    if len(set(words)) != len(words):
        raise MobizoError(f"--label-words has duplicates: {label_words!r}")
    return words


def template_fields(template: str) -> list[str]:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise MobizoError(f"--template {template!r} is malformed: {e}") from e
    if not fields:
        raise MobizoError(f"--template {template!r} has no {{field}} placeholder (e.g. {{text}})")
    if any(f == "" or not f.isidentifier() for f in fields):
        raise MobizoError(f"--template {template!r}: placeholders must be named, like {{text}}")
    return fields


def render(template: str, record: dict, where: str) -> str:
    fields = template_fields(template)
    missing = [f for f in fields if f not in record]
    if missing:
        raise MobizoError(f"{where}: no field {missing[0]!r} required by the template (fields: {', '.join(record)})")
    return template.format(**{f: str(record[f]) for f in fields})


def label_index(value, words: list[str], where: str) -> int:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        idx = value
    elif isinstance(value, float) and value.is_integer():
        idx = int(value)
    elif isinstance(value, str) and value.strip() in words:
        return words.index(value.strip())
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        idx = int(value.strip())
    else:
        raise MobizoError(f"{where}: label {value!r} is not one of the label words {words} nor an index")
    if not 0 <= idx < len(words):
        raise MobizoError(f"{where}: label index {idx} is out of range for {len(words)} label words {words}")
    return idx


@register
class CustomClassification(Task):
    """``--template "Review: {text} Sentiment:" --label-words bad,good``; records {"text", "label"}."""

    name = "custom-cls"
    kind = "classification"

    def __init__(self, data=None, template: str | None = None, label_words=None, **options):
        super().__init__(data=data, **options)
        self.template = template or "{text}"
        template_fields(self.template)
        self.words = parse_label_words(label_words)

    def load_split(self, split: str) -> list[Example]:
        path = find_split(self.data, split)
        candidates = [" " + w for w in self.words]
        out = []
        for i, rec in enumerate(read_records(path, split), 1):
            where = f"{path} record {i}"
            if "label" not in rec:
                raise MobizoError(f"{where}: missing 'label' field")
            prompt = render(self.template, rec, where)
            out.append(Example(prompt=prompt, candidates=candidates, label=label_index(rec["label"], self.words, where)))
        return out
