"""Text generation: one decoding loop for every engine that can continue a prompt.

An engine that generates offers ``decoder(input_ids, attention_mask)`` over left-padded rows (at most
``engine.max_decode_rows`` of them, when it has that limit): the eager engine keeps a transformers KV
cache (:class:`mobizo.engines.eager.KVDecoder`), an ExecuTorch program runs its ``prefill`` / ``decode``
methods over the KV cache in its mutable buffers (:class:`mobizo.engines.executorch.runtime.ProgramDecoder`,
one row). A decoder has ``logits`` (rows, vocab) for each row's next token, ``step(tokens)`` and
``keep(rows)``; :func:`open_decoder` starts one on a single prompt. Everything else lives here once:

* :class:`Sampler`: greedy (``temperature == 0``) or temperature + nucleus (``top_p``) sampling from a
  seeded generator, so a run with the same seed gives the same text on every engine that gives the same
  logits;
* :func:`stream`: the loop; it yields text as it is decoded (a UTF-8 character split across tokens is
  held back until it is whole), stops at EOS, at ``max_new_tokens`` or at a stop string (never printed:
  text that could still become one is held back until it cannot);
* :func:`prompt_ids`: the prompt as the model was trained on it (a chat model's template applied the
  way ``--task custom`` renders chat records for training).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .errors import MobizoError


class Decoder(Protocol):
    logits: torch.Tensor  # (rows, vocab) float32: each row's next-token distribution

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row; the new ``logits``."""

    def keep(self, rows: list[int]) -> None:
        """Drop every row not in ``rows`` (finished ones)."""


def max_positions(engine) -> int | None:
    """Positions a sequence may fill when ``engine`` generates (the model's, or an exported program's cache)."""
    return getattr(engine, "max_positions", None)


def open_decoder(engine, ids: list[int]) -> Decoder:
    """A one-row decoder of ``engine`` started on the prompt ``ids``."""
    make = getattr(engine, "decoder", None)
    if make is None:
        raise MobizoError(f"the {getattr(engine, 'name', '?')} engine cannot generate text")
    return make(torch.tensor([ids], dtype=torch.long), torch.ones(1, len(ids), dtype=torch.long))


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus: sample among the most likely tokens whose probabilities add up to top_p
    seed: int = 0
    stop: list[str] = field(default_factory=list)  # stop strings (besides EOS)

    def check(self) -> SamplingConfig:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise MobizoError(f"--max-new-tokens must be an integer >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise MobizoError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MobizoError(f"--top-p must be in (0, 1], got {self.top_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise MobizoError("--stop strings must not be empty")
        return self


class Sampler:
    """Picks each next token from the logits: argmax, or a seeded draw from the tempered nucleus."""

    def __init__(self, config: SamplingConfig):
        self.config = config
        self.generator = torch.Generator().manual_seed(config.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        c = self.config
        logits = logits.float().reshape(-1)
        if c.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / c.temperature, dim=-1)
        if c.top_p < 1:
            p, idx = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the most likely token always stays)
            keep = (p.cumsum(0) - p) < c.top_p
            probs = torch.zeros_like(probs).scatter_(0, idx[keep], p[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_text(tokenizer, messages: list[dict]) -> str:
    """``messages`` rendered with the tokenizer's chat template and its generation prompt, exactly as
    ``--task custom`` renders a chat record's prompt for training (a BOS the template writes is dropped
    when the tokenizer adds its own, so it is not doubled)."""
    from .tasks.custom import adds_bos

    if not has_chat_template(tokenizer):
        raise MobizoError("the tokenizer has no chat template")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja raises many types
        raise MobizoError(f"the tokenizer's chat template failed: {type(e).__name__}: {e}") from e
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and adds_bos(tokenizer):
        text = text[len(bos) :]
    return text


def prompt_ids(tokenizer, prompt: str, chat: bool | None = None) -> list[int]:
    """Token ids of ``prompt`` as a fine-tuned model saw its prompts in training: for a chat model (a
    tokenizer with a chat template; ``chat=None``: use it when there is one) a user message rendered
    with the template and its generation prompt, as ``--task custom`` renders chat records."""
    if chat is None:
        chat = has_chat_template(tokenizer)
    if chat:
        prompt = chat_text(tokenizer, [{"role": "user", "content": prompt}])
    return text_ids(tokenizer, prompt)


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of an already rendered prompt (BOS added as the tokenizer does for training)."""
    from .data import Encoder

    return Encoder(tokenizer).prompt_ids(text)


def check_room(n_prompt: int, max_new_tokens: int, positions: int | None, what: str = "the model") -> None:
    """One line when the prompt, or the prompt plus ``max_new_tokens``, does not fit ``positions``."""
    if positions is None:
        return
    if n_prompt >= positions:
        raise MobizoError(
            f"the prompt is {n_prompt} tokens, {what} holds {positions} positions: it leaves no room to generate"
        )
    if n_prompt + max_new_tokens > positions:
        raise MobizoError(
            f"--max-new-tokens {max_new_tokens} after a {n_prompt}-token prompt goes past the {positions} positions of "
            f"{what} (use --max-new-tokens {positions - n_prompt} or less)"
        )


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could still be the start of a stop string."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:k]):
                keep = k
                break
    return keep


def stream(
    engine, tokenizer, ids: list[int], config: SamplingConfig, tokens: list[int] | None = None, info: dict | None = None
) -> Iterator[str]:
    """Yield the text ``engine`` generates after the prompt ``ids`` piece by piece (see the module docstring).
    ``tokens``, if given, receives the generated token ids (EOS excluded); ``info``, if given, receives
    ``finish``: why it stopped (``eos``, ``stop``: a stop string, ``length``: ``max_new_tokens``)."""
    info = {} if info is None else info
    info["finish"] = "length"
    config.check()
    check_room(len(ids), config.max_new_tokens, max_positions(engine))
    decoder = open_decoder(engine, ids)
    sampler = Sampler(config)
    eos = tokenizer.eos_token_id
    eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    new: list[int] = [] if tokens is None else tokens
    shown = 0  # characters of the decoded text already yielded
    logits = decoder.logits[0]
    for n in range(config.max_new_tokens):
        token = sampler(logits)
        if token in eos_ids:
            info["finish"] = "eos"
            break
        new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=True)
        # (text that could begin a stop string is never shown, so one can only start at or after ``shown``)
        found = [i for i in (text.find(s, shown) for s in config.stop) if i >= 0]
        if found:
            info["finish"] = "stop"
            cut = min(found)
            if cut > shown:
                yield text[shown:cut]
            return
        # an unfinished UTF-8 sequence decodes to U+FFFD: wait for the rest of it
        ready = len(text) - _held_back(text, config.stop)
        while ready > shown and text[ready - 1] == "\ufffd":
            ready -= 1
        if ready > shown:
            yield text[shown:ready]
            shown = ready
        if n + 1 < config.max_new_tokens:
            logits = decoder.step(torch.tensor([token]))[0]
    text = tokenizer.decode(new, skip_special_tokens=True)
    if len(text) > shown:
        yield text[shown:]


def generate(engine, tokenizer, ids: list[int], config: SamplingConfig) -> str:
    """The whole completion of :func:`stream` as one string."""
    return "".join(stream(engine, tokenizer, ids, config))
