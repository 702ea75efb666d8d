"""Custom (private) data: ``custom-cls`` classification from local files."""

from __future__ import annotations

import string

from ..errors import MobizoError
from .base import Example, Task, register
from .io import find_split, read_records


def check_text(text: str, what: str) -> str:
    """``text`` if it is valid Unicode (no lone surrogates, e.g. from undecodable bytes), else a clear error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MobizoError(f"{what} is not valid Unicode text (at character {e.start})") from e
    return text


def parse_label_words(label_words: str | list[str] | None) -> list[str]:
    if label_words is None:
        raise MobizoError("--label-words is required for this task (e.g. --label-words bad,good)")
    if isinstance(label_words, str):
        words = [w.strip() for w in label_words.split(",")]
    elif isinstance(label_words, (list, tuple)) and all(isinstance(w, str) for w in label_words):
        words = [w.strip() for w in label_words]
    else:
        raise MobizoError(f"--label-words must be comma-separated words, got {label_words!r}")
    for w in words:
        check_text(w, f"--label-words {label_words!r}")
    if len(words) < 2 or any(not w for w in words):
        raise MobizoError(f"--label-words needs at least two non-empty comma-separated words, got {label_words!r}")
    if len(set(words)) != len(words):
        raise MobizoError(f"--label-words has duplicates: {label_words!r}")
    return words


def template_fields(template: str) -> list[str]:
    check_text(template, "--template")
    try:
        parts = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise MobizoError(f"--template {template!r} is malformed: {e}") from e
    fields = [f for f, _, _ in parts]
    if not fields:
        raise MobizoError(f"--template {template!r} has no {{field}} placeholder (e.g. {{text}})")
    if any(f == "" or not f.isidentifier() for f in fields):
        raise MobizoError(f"--template {template!r}: placeholders must be named, like {{text}}")
    if any(spec or conv for _, spec, conv in parts):
        raise MobizoError(f"--template {template!r}: placeholders must be plain {{name}} (no !conversion or :format)")
    return fields


def render(template: str, record: dict, where: str) -> str:
    fields = template_fields(template)
    missing = [f for f in fields if f not in record]
    if missing:
        raise MobizoError(f"{where}: no field {missing[0]!r} required by the template (fields: {', '.join(record)})")
    values = {}
    for f in fields:
        v = record[f]
        if v is None or isinstance(v, (list, dict)):
            kind = "empty (null)" if v is None else type(v).__name__
            raise MobizoError(f"{where}: field {f!r} is {kind}, expected text")
        values[f] = check_text(str(v), f"{where}: field {f!r}")
    return template.format(**values)


def label_index(value, words: list[str], where: str) -> int:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        idx = value
    elif isinstance(value, float) and value.is_integer():
        idx = int(value)
    elif isinstance(value, str) and value.strip() in words:
        return words.index(value.strip())
    elif isinstance(value, str) and value.strip().lstrip("-").isdecimal():
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
