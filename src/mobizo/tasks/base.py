"""The task layer: what an example is, how a task loads and how it is scored.

Every task turns its raw records into :class:`Example` objects. An example is
always "prompt, then answer" (MeZO-style prompting): the answer tokens are the
only supervised tokens. How the answer is chosen and scored depends on
``Task.kind``:

* ``classification``: ``candidates`` are the label words (with their leading
  space), ``label`` indexes the gold one; eval compares the summed log-prob of
  each candidate.
* ``multiple_choice``: same, but eval compares the *mean* log-prob per token.
* ``generation``: ``target`` is the gold completion, ``answers`` all accepted
  answers; eval generates greedily and reports token F1 / exact match.
* ``lm``: ``target`` is a completion; eval reports the answer loss only.

The tasks: :mod:`.benchmarks` (the ZO literature's suite from local files in
Hugging Face layouts), :mod:`.custom` (private data), :mod:`.synthetic`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import MobizoError

KINDS = ("classification", "multiple_choice", "generation", "lm")


@dataclass
class Example:
    prompt: str
    candidates: list[str] = field(default_factory=list)
    label: int | None = None
    target: str | None = None
    answers: list[str] | None = None
    messages: list[dict] | None = None  # chat records: rendered into prompt/target by Task.finalize

    @property
    def answer(self) -> str:
        """The supervised text for training."""
        if self.target is not None:
            return self.target
        if self.label is None:
            raise MobizoError("example has neither a target nor a label")
        return self.candidates[self.label]


class Task:
    """Base class. Subclasses set ``name``/``kind`` and implement :meth:`load_split`."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "classification"
    needs_data: ClassVar[bool] = True

    def __init__(self, data: str | None = None, **options):
        if self.needs_data and not data:
            raise MobizoError(f"task {self.name} needs --data DIR")
        if data and not self.needs_data:
            raise MobizoError(f"task {self.name} is built in: --data does not apply to it")
        # Options a subclass does not consume reach here: a flag that would be silently ignored is an error.
        for key, value in options.items():
            if value is not None:
                raise MobizoError(f"--{key.replace('_', '-')} does not apply to task {self.name}")
        self.data = data

    def load_split(self, split: str) -> list[Example]:  # pragma: no cover - abstract
        raise NotImplementedError

    def input_fields(self) -> list[str]:
        """The fields a new input of a classification / multiple-choice task has (``mobizo predict``)."""
        return []

    def example(self, record: dict, where: str) -> Example:
        """An unlabelled example (prompt and candidates, ``label`` None) of a new input ``record``:
        ``mobizo predict``. Classification and multiple-choice tasks implement it."""
        raise MobizoError(f"task {self.name} ({self.kind}) has no candidates to rank")

    def finalize(self, examples: list[Example], tokenizer) -> list[Example]:
        """Tokenizer-dependent rendering (e.g. chat templates), once the model's tokenizer is loaded."""
        return examples

    def load(self, split: str, limit: int | None = None, seed: int = 0) -> list[Example]:
        examples = self.load_split(split)
        if not examples:
            raise MobizoError(f"task {self.name}: the {split} split is empty")
        if limit is not None and 0 < limit < len(examples):
            rng = random.Random(f"{seed}:{split}")
            examples = rng.sample(examples, limit)
        return examples


TASKS: dict[str, type[Task]] = {}
# Other spellings users type; names are also matched case-insensitively with '_' read as '-'.
ALIASES = {
    "sst-2": "sst2",
    "arc-e": "arc-easy",
    "arc-c": "arc-challenge",
    "arc": "arc-easy",
    "squad-v1": "squad",
    "wsc.fixed": "wsc",
}


def register(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls
    return cls


def canonical_name(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    return ALIASES.get(key, key)


def parse_label(value: Any, names, where: str, noun: str = "classes") -> int:
    """Class index of a label: an int, a bool (two classes), a decimal string, or one of ``names``
    (exact, else case-insensitive). The one label parser of every task."""
    names = list(names)
    original = value
    if isinstance(value, bool) or isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str):
        v = value.strip()
        lowered = [n.lower() for n in names]
        if v in names:
            return names.index(v)
        if v.lower() in lowered:
            return lowered.index(v.lower())
        if v.lstrip("-").isdecimal() and v.count("-") <= 1 and not v.endswith("-"):
            value = int(v)
        elif len(names) == 2 and v.lower() in ("true", "false"):
            value = int(v.lower() == "true")
    if not isinstance(value, int) or isinstance(value, bool):
        raise MobizoError(f"{where}: label {original!r} is not one of the {noun} {names} (nor a class index)")
    if value < 0:
        raise MobizoError(
            f"{where}: label {original!r} means 'no label' (an unlabelled test split?); use a labelled split"
        )
    if value >= len(names):
        raise MobizoError(f"{where}: label {original!r} is out of range for {len(names)} {noun} {names}")
    return value


class ExamplesTask(Task):
    """Examples passed as objects (``mobizo.train(..., train_examples=[...])``): no files to read.

    The kind follows the examples: candidates and a label make a classification task, a target alone a
    language-modelling one (answer loss)."""

    name = "examples"
    needs_data = False

    def __init__(self, examples: list[Example]):
        super().__init__()
        self.kind = "classification" if all(e.candidates and e.label is not None for e in examples) else "lm"

    def load_split(self, split: str) -> list[Example]:
        raise MobizoError(f"no {split} examples were passed")
