"""From examples to fixed-layout batches.

Layout (the same for training, eval and the exported program):

* sequences are ``prompt + answer`` token ids, **left-padded** to length T, so
  every answer ends at position T-1;
* ``labels`` has shape (rows, K): the answer ids right-aligned in a window of
  the last K positions, -100 where a row's answer is shorter (or the row is a
  masked padding row). Logits are needed only at positions T-K-1 .. T-2,
  which is how the step avoids projecting the whole sequence to the vocabulary.

Which examples make up step s is a pure function of (seed, s): resuming at any
step reproduces the batches of an uninterrupted run without saving data state.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import torch

from .errors import MobizoError
from .tasks.base import Example

IGNORE = -100


@dataclass
class Encoded:
    prompt_ids: list[int]
    answer_ids: list[int]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (rows, T) int64
    attention_mask: torch.Tensor  # (rows, T) int64
    labels: torch.Tensor  # (rows, K) int64, IGNORE outside answers
    n_real: int  # rows that are real examples; the others are masked filler
    gold: torch.Tensor | None = None  # (examples,) gold candidate index for the choice objective, -100 = filler
    # Shared prompt (choice objective, one-token candidates): one row per example holding only the
    # prompt, and ``labels`` (examples, choices) the candidates' token ids, -100 for a missing one.
    shared: bool = False

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]


class Encoder:
    """Tokenizes prompt/answer pairs so the answer tokens are exactly what follows the prompt.

    The pair is tokenized jointly and the prompt's tokens are split off, which
    gets leading-space handling right for BPE (``Ġgood``) and SentencePiece
    (``▁good``) tokenizers alike; multi-token answers are kept whole.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self._eos_suffix = bool(probe) and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id
        self._cache: dict[tuple[str, str], Encoded] = {}

    def _ids(self, text: str, special: bool) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        if special and self._eos_suffix and ids and ids[-1] == self.tokenizer.eos_token_id:
            ids = ids[:-1]
        return list(ids)

    def __call__(self, prompt: str, answer: str) -> Encoded:
        key = (prompt, answer)
        if key not in self._cache:
            if prompt[-1:].isspace() and answer.startswith(" "):
                answer = answer[1:]
            p = self._ids(prompt, True)
            full = self._ids(prompt + answer, True)
            if len(full) > len(p) and full[: len(p)] == p:
                a = full[len(p) :]
            else:
                a = self._boundary_answer(p, answer, full)
            if not a:
                raise MobizoError(f"answer {answer!r} tokenizes to nothing")
            if not p:
                raise MobizoError(f"prompt {prompt[:40]!r} tokenizes to nothing")
            self._cache[key] = Encoded(p, a)
        return self._cache[key]

    def _boundary_answer(self, p: list[int], answer: str, full: list[int]) -> list[int]:
        """Answer ids when a token spans the prompt/answer boundary (e.g. a learned ``"\\nYes"``).

        Tokenized on its own, a SentencePiece answer gets a spurious ``▁`` (a space) in front.
        Tokenize it after a neutral anchor instead and keep the first candidate that, after the
        prompt's ids, decodes to the same text as the joint tokenization.
        """
        options = []
        for anchor in ("\n", "a", "0", "."):
            base, joint = self._ids(anchor, False), self._ids(anchor + answer, False)
            if len(joint) > len(base) and joint[: len(base)] == base:
                options.append(joint[len(base) :])
        options.append(self._ids(answer, False))
        want = self.tokenizer.decode(full, skip_special_tokens=True)
        for a in options:
            if a and self.tokenizer.decode(p + a, skip_special_tokens=True) == want:
                return a
        return options[0]

    def example(self, ex: Example) -> Encoded:
        return self(ex.prompt, ex.answer)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's ids alone (what generation starts from): the same ids :meth:`__call__` gives."""
        ids = self._ids(prompt, True)
        if not ids:
            raise MobizoError(f"prompt {prompt[:40]!r} tokenizes to nothing")
        return ids


def check_candidates(encoder: Encoder, examples, what: str = "examples") -> None:
    """Encode every candidate / answer of ``examples`` once; one line naming the first one that
    tokenizes to no tokens (an empty label word, or text the tokenizer drops) or whose prompt does."""
    for n, ex in enumerate(examples):
        for cand in ex.candidates or [ex.answer]:
            try:
                encoder(ex.prompt, cand)
            except MobizoError as e:
                if "tokenizes to nothing" not in str(e):
                    raise
                which = f"candidate {cand!r}" if ex.candidates else f"answer {cand!r}"
                if "prompt" in str(e):
                    which = f"prompt {ex.prompt[:40]!r}"
                raise MobizoError(
                    f"{what} example {n + 1}: {which} tokenizes to no tokens with this tokenizer "
                    "(give label words / answers with visible text)"
                ) from None


def collate(
    encs: list[Encoded | None],
    pad_id: int,
    max_length: int,
    length: int | None = None,
    answer_len: int | None = None,
    rows: int | None = None,
) -> Batch:
    """Left-pad ``encs`` into a :class:`Batch`.

    ``length``/``answer_len``/``rows`` fix T, K and the row count (exported
    programs have static shapes); by default they fit the batch. Prompts too
    long for ``max_length`` lose tokens from the left; answers never do.
    ``None`` entries (and rows beyond ``len(encs)``) are filler rows: a copy
    of a real sequence (finite activations) with no supervised token.
    """
    real = [e for e in encs if e is not None]
    if not real:
        raise MobizoError("cannot make a batch of zero examples")
    if rows is not None and len(encs) > rows:
        raise MobizoError(f"batch of {len(encs)} examples does not fit the {rows} rows of the program")
    limit = min(max_length, length) if length else max_length
    seqs, answers = [], []
    for e in real:
        a = e.answer_ids
        if answer_len is not None and len(a) > answer_len:
            raise MobizoError(
                f"an answer of {len(a)} tokens is longer than the program's answer window of {answer_len} tokens"
            )
        if len(a) + 1 > limit:
            raise MobizoError(f"an answer of {len(a)} tokens does not fit --max-length {limit} with its prompt")
        p = e.prompt_ids
        if len(p) + len(a) > limit:
            p = p[len(p) + len(a) - limit :]
        seqs.append(p + a)
        answers.append(a)
    T = length or max(len(s) for s in seqs)
    K = answer_len or max(len(a) for a in answers)
    if T < K + 1:
        raise MobizoError(f"sequence length {T} leaves no room for a prompt before a {K}-token answer window")
    n_rows = rows or len(encs)
    ids = torch.full((n_rows, T), pad_id, dtype=torch.long)
    mask = torch.zeros((n_rows, T), dtype=torch.long)
    labels = torch.full((n_rows, K), IGNORE, dtype=torch.long)
    j = 0
    for i in range(n_rows):
        is_real = i < len(encs) and encs[i] is not None
        s = seqs[j % len(seqs)]  # filler rows repeat a real sequence ...
        ids[i, T - len(s) :] = torch.tensor(s)
        mask[i, T - len(s) :] = 1
        if is_real:  # ... but have no supervised tokens
            a = answers[j]
            labels[i, K - len(a) :] = torch.tensor(a)
            j += 1
    return Batch(ids, mask, labels, len(real))


def collate_choices(
    groups: list[list[Encoded]],
    golds: list[int],
    n_choices: int,
    pad_id: int,
    max_length: int,
    length: int | None = None,
    answer_len: int | None = None,
    examples: int | None = None,
    shared: bool | None = None,
) -> Batch:
    """The layout of the choice objective (cross-entropy over the candidates' scores), with ``gold``.

    * per candidate: one row per (example, candidate), ``n_choices`` rows per example (missing ones
      are filler);
    * ``shared``: one row per example holding the prompt, ``labels`` (examples, n_choices) the
      candidates' token ids, scored at the prompt's last position (:func:`mobizo.step.choice_losses`).
      Exact, and C times fewer rows, when every candidate is one token.

    ``shared=None`` picks the shared layout when it is exact: for a program with an answer window
    (``answer_len``) of 1 token, or (no ``answer_len``: an engine with free shapes) when every
    candidate of this batch is one token.
    """
    examples = examples or len(groups)
    if len(groups) > examples:
        raise MobizoError(f"batch of {len(groups)} examples does not fit the {examples} examples of the program")
    single = all(len(e.answer_ids) == 1 for g in groups for e in g)
    if shared is None:
        shared = answer_len == 1 if answer_len is not None else single
    if shared:
        if not single:
            raise MobizoError("a shared-prompt batch needs candidates of one token each")
        return _collate_shared(groups, golds, n_choices, pad_id, max_length, length, examples)
    encs: list[Encoded | None] = []
    for g in groups:
        if len(g) > n_choices:
            raise MobizoError(f"an example has {len(g)} candidates; the program was built for {n_choices}")
        encs.extend(list(g) + [None] * (n_choices - len(g)))
    batch = collate(encs, pad_id, max_length, length, answer_len, rows=examples * n_choices)
    batch.gold = torch.tensor(list(golds) + [IGNORE] * (examples - len(groups)), dtype=torch.long)
    return batch


def count_truncated(
    encoder: Encoder, examples: list[Example], max_length: int, truncation: str = "left", what: str = "examples"
) -> int:
    """How many examples' prompts must lose tokens on the left to fit ``max_length`` with their answer(s).

    Encodes everything once (bad text fails fast). An answer that cannot fit is always an error; a
    prompt that must be cut is one with ``truncation="error"``.
    """
    long = 0
    for ex in examples:
        encs = [encoder(ex.prompt, c) for c in ex.candidates] or [encoder.example(ex)]
        for e in encs:
            if len(e.answer_ids) + 1 > max_length:
                raise MobizoError(
                    f"{what}: an answer of {len(e.answer_ids)} tokens does not fit --max-length {max_length}"
                )
        if any(len(e.prompt_ids) + len(e.answer_ids) > max_length for e in encs):
            long += 1
            if truncation == "error":
                raise MobizoError(
                    f"{what}: a prompt of {len(encs[0].prompt_ids)} tokens is longer than --max-length {max_length} "
                    "allows (raise --max-length or use --truncation left)"
                )
    return long


def _collate_shared(groups, golds, n_choices, pad_id, max_length, length, examples) -> Batch:
    """One left-padded prompt row per example; prompts keep the tokens the per-candidate layout keeps
    (``limit - 1``: room for the one-token answer), so both layouts score the same context."""
    limit = min(max_length, length) if length else max_length
    if limit < 2:
        raise MobizoError(f"--max-length {limit} leaves no room for a prompt before a one-token answer")
    prompts, cands = [], []
    for g in groups:
        if len(g) > n_choices:
            raise MobizoError(f"an example has {len(g)} candidates; the program was built for {n_choices}")
        p = g[0].prompt_ids
        if any(e.prompt_ids != p for e in g[1:]):
            raise MobizoError("candidates of one example tokenize with different prompts; cannot share the prompt")
        if len(p) + 1 > limit:
            p = p[len(p) + 1 - limit :]
        prompts.append(p)
        cands.append([e.answer_ids[0] for e in g] + [IGNORE] * (n_choices - len(g)))
    if not prompts:
        raise MobizoError("cannot make a batch of zero examples")
    T = length or max(len(p) for p in prompts)
    ids = torch.full((examples, T), pad_id, dtype=torch.long)
    mask = torch.zeros((examples, T), dtype=torch.long)
    labels = torch.full((examples, n_choices), IGNORE, dtype=torch.long)
    for i in range(examples):
        p = prompts[i % len(prompts)]  # filler rows repeat a real prompt, with no candidate to score
        ids[i, T - len(p) :] = torch.tensor(p)
        mask[i, T - len(p) :] = 1
        if i < len(prompts):
            labels[i] = torch.tensor(cands[i])
    gold = torch.tensor(list(golds) + [IGNORE] * (examples - len(groups)), dtype=torch.long)
    return Batch(ids, mask, labels, len(prompts), gold=gold, shared=True)


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(f"mobizo-data:{seed}:{epoch}").shuffle(order)
    return tuple(order)


def step_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of 1-based training ``step``: a seeded reshuffle every epoch."""
    if n < 1:
        raise MobizoError("no training examples")
    out: list[int] = []
    pos = (step - 1) * batch_size
    while len(out) < batch_size:
        epoch, off = divmod(pos + len(out), n)
        take = min(batch_size - len(out), n - off)
        out.extend(_permutation(n, seed, epoch)[off : off + take])
    return out
