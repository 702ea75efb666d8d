"""Custom (private) data from local files.

* ``custom`` (kind ``lm``): records ``{"prompt", "completion"}`` (the loss is on the
  completion only), or chat records ``{"messages": [{"role", "content"}, ...]}``
  rendered with the tokenizer's chat template: the last message must be the
  assistant's and is the completion; everything before it is the prompt.
* ``custom-cls``: ``--template "... {text} ..." --label-words a,b`` over records with
  the template's fields and a ``label`` (``--task custom`` with ``--label-words``
  selects it).
"""

from __future__ import annotations

import string

from ..errors import MobizoError
from .base import Example, Task, parse_label, register
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
    return parse_label(value, words, where, noun="label words")


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

    def input_fields(self) -> list[str]:
        return template_fields(self.template)

    def example(self, record: dict, where: str) -> Example:
        return Example(prompt=render(self.template, record, where), candidates=[" " + w for w in self.words])

    def load_split(self, split: str) -> list[Example]:
        path = find_split(self.data, split)
        candidates = [" " + w for w in self.words]
        out = []
        for i, rec in enumerate(read_records(path, split), 1):
            where = f"{path} record {i}"
            if "label" not in rec:
                raise MobizoError(f"{where}: missing 'label' field")
            prompt = render(self.template, rec, where)
            out.append(
                Example(prompt=prompt, candidates=candidates, label=label_index(rec["label"], self.words, where))
            )
        return out


@register
class CustomMultipleChoice(Task):
    """``--task custom`` over records with per-question choices: ``{"question", "choices": [...], "answer": index
    or the choice's text}``, prompted with ``--template`` (default ``Question: {question}\nAnswer:``, any record
    field may appear in it); the candidates are the choices, scored by mean log-prob per token like ARC."""

    name = "custom-mc"
    kind = "multiple_choice"
    TEMPLATE = "Question: {question}\nAnswer:"

    def __init__(self, data=None, template: str | None = None, label_words=None, **options):
        super().__init__(data=data, **options)
        if label_words:
            raise MobizoError("records with 'choices' carry their own candidates; drop --label-words")
        self.template = template or self.TEMPLATE
        template_fields(self.template)

    def input_fields(self) -> list[str]:
        return [*template_fields(self.template), "choices"]

    @staticmethod
    def _choices(rec: dict, where: str) -> list[str]:
        choices = rec.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise MobizoError(f"{where}: 'choices' should be a list of at least two strings")
        choices = [check_text(c.strip(), f"{where}: a choice") for c in choices]
        if any(not c for c in choices) or len(set(choices)) != len(choices):
            raise MobizoError(f"{where}: choices must be non-empty and distinct, got {choices!r}")
        return choices

    def example(self, record: dict, where: str) -> Example:
        choices = self._choices(record, where)
        return Example(prompt=render(self.template, record, where), candidates=[" " + c for c in choices])

    def load_split(self, split: str) -> list[Example]:
        path = find_split(self.data, split)
        out = []
        for i, rec in enumerate(read_records(path, split), 1):
            where = f"{path} record {i}"
            choices = self._choices(rec, where)
            if "answer" not in rec:
                raise MobizoError(f"{where}: missing 'answer' (the index of the right choice, or its text)")
            answer = rec["answer"]
            if isinstance(answer, str) and answer.strip() in choices:
                answer = answer.strip()
            label = parse_label(answer, choices, where, noun="choices")
            out.append(
                Example(prompt=render(self.template, rec, where), candidates=[" " + c for c in choices], label=label)
            )
        return out


def is_multiple_choice(data) -> bool:
    """Whether ``--task custom`` data holds multiple-choice records (the first training record has 'choices')."""
    if not data:
        return False
    try:
        first = read_records(find_split(data, "train"), "train")[0]
    except MobizoError:
        return False  # the task that loads it will say what is wrong
    return isinstance(first, dict) and "choices" in first


def _text_field(rec: dict, key: str, where: str) -> str:
    value = rec.get(key)
    if not isinstance(value, str):
        raise MobizoError(f"{where}: {key!r} should be a string, got {type(value).__name__}")
    return value


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise MobizoError(f"{where}: 'messages' should be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for j, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise MobizoError(f"{where}: message {j} should be an object with string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise MobizoError(
            f"{where}: the last message is from {out[-1]['role']!r}; it must be the assistant's (it is the completion)"
        )
    if not out[-1]["content"].strip():
        raise MobizoError(f"{where}: the last assistant message is empty")
    return out


def adds_bos(tokenizer) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def render_chat(tokenizer, messages: list[dict]) -> tuple[str, str]:
    """(prompt, completion) of a conversation whose last message is the assistant's."""
    what = f"chat record starting {messages[0]['content'][:40]!r}"
    try:
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # jinja raises many types
        raise MobizoError(f"{what}: the tokenizer's chat template failed: {type(e).__name__}: {e}") from e
    if not full.startswith(prompt) or len(full) == len(prompt):
        raise MobizoError(
            f"{what}: the chat template does not render the conversation as <prompt with generation prompt> "
            "+ <assistant reply>, so the completion cannot be isolated"
        )
    completion = full[len(prompt) :]
    bos = tokenizer.bos_token
    if bos and prompt.startswith(bos) and adds_bos(tokenizer):
        prompt = prompt[len(bos) :]  # the encoder adds BOS itself
    return prompt, completion


@register
class CustomLM(Task):
    """``--task custom``: prompt/completion or chat records; eval reports the completion loss."""

    name = "custom"
    kind = "lm"

    def __init__(self, data=None, template: str | None = None, label_words=None, **options):
        super().__init__(data=data, **options)
        if template:
            raise MobizoError(
                "--task custom with --template needs --label-words (classification); "
                "prompt/completion and chat records need no template"
            )

    def load_split(self, split: str) -> list[Example]:
        path = find_split(self.data, split)
        out = []
        for i, rec in enumerate(read_records(path, split), 1):
            where = f"{path} record {i}"
            if "messages" in rec:
                out.append(Example(prompt="", messages=_check_messages(rec["messages"], where)))
            elif "prompt" in rec and "completion" in rec:
                completion = _text_field(rec, "completion", where)
                if not completion.strip():
                    raise MobizoError(f"{where}: empty 'completion'")
                out.append(Example(prompt=_text_field(rec, "prompt", where), target=completion))
            else:
                raise MobizoError(
                    f"{where}: expected 'prompt' and 'completion' fields, or 'messages' (fields: {', '.join(rec)})"
                )
        return out

    def finalize(self, examples: list[Example], tokenizer) -> list[Example]:
        chats = [e for e in examples if e.messages is not None]
        if not chats:
            return examples
        if not getattr(tokenizer, "chat_template", None):
            raise MobizoError(
                'chat records ({"messages": ...}) need a tokenizer with a chat template, and this model\'s '
                'tokenizer has none; use {"prompt", "completion"} records instead'
            )
        out = []
        for e in examples:
            if e.messages is not None and e.target is None:
                prompt, completion = render_chat(tokenizer, e.messages)
                e = Example(prompt=prompt, target=completion, messages=e.messages)
            out.append(e)
        return out
