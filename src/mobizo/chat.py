"""``mobizo chat``: a conversation with a fine-tuned chat model in the terminal.

Each turn the whole conversation (``--system``, then the user / assistant messages) is rendered with the
tokenizer's chat template, as ``--task custom`` renders chat records for training, and the reply is
streamed as it is decoded (:func:`mobizo.generation.stream`). A conversation that no longer fits the
model's positions (with room for ``--max-new-tokens``) drops its oldest exchanges, with a note; a single
message too long to fit is not sent, and the session goes on. ``/reset`` starts over, ``/exit`` or Ctrl-D
ends it (exit 0), Ctrl-C ends it with exit 130 (:func:`mobizo.cli.main`), a cut reply's line ended first.
Turn ``n`` (from 0) samples with ``--seed`` + ``n``.
"""

from __future__ import annotations

import dataclasses
import sys

from .errors import MobizoError
from .inference import note


def fit(tokenizer, system: list[dict], messages: list[dict], max_new_tokens: int, positions: int | None):
    """(prompt ids, exchanges dropped) of the conversation; its oldest user / assistant exchanges are dropped
    from ``messages`` (in place) until it fits ``positions`` with ``max_new_tokens`` to spare. (None, tokens)
    when even the last message alone does not fit (``messages`` is then left as it was)."""
    from .generation import chat_text, text_ids

    kept = list(messages)
    while True:
        ids = text_ids(tokenizer, chat_text(tokenizer, system + kept))
        if positions is None or len(ids) + max_new_tokens <= positions:
            dropped = (len(messages) - len(kept)) // 2
            messages[:] = kept
            return ids, dropped
        if len(kept) <= 1:
            return None, len(ids)
        del kept[:2]


def run_chat(gen, sampling, system: str | None = None, out=None) -> int:
    """The session loop on ``gen`` (:class:`mobizo.inference.Generator`); returns the exit code."""
    from .generation import has_chat_template, stream

    out = out or sys.stdout
    if not has_chat_template(gen.tokenizer):
        raise MobizoError(
            f"the tokenizer of {gen.model} has no chat template: mobizo chat needs a chat model "
            "(use mobizo generate to continue plain text)"
        )
    try:
        import readline  # noqa: F401 - line editing and history at the prompt
    except ImportError:  # pragma: no cover - not on every platform
        pass
    if gen.source is not None:
        gen.source.announce()
    head = [{"role": "system", "content": system}] if system else []
    positions, what = gen.positions, gen.positions_of
    messages: list[dict] = []
    with_adapter = f" with adapter {gen.adapter}" if gen.adapter is not None else ""
    note(f"chat with {gen.model}{with_adapter}; /reset starts over, /exit or Ctrl-D ends")
    turn = 0
    while True:
        try:
            line = input("> ")
        except EOFError:  # Ctrl-D
            out.write("\n")
            out.flush()
            return 0
        except KeyboardInterrupt:
            out.write("\n")  # off the cut prompt line: the message that follows stands on its own
            out.flush()
            raise
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages.clear()
            note("conversation reset")
            continue
        messages.append({"role": "user", "content": line})
        ids, dropped = fit(gen.tokenizer, head, messages, sampling.max_new_tokens, positions)
        if ids is None:
            messages.pop()
            note(
                f"that message does not fit: {dropped} tokens with --max-new-tokens {sampling.max_new_tokens} go "
                f"past the {positions} positions of {what} (not sent: shorten it, lower --max-new-tokens or /reset)"
            )
            continue
        if dropped:
            note(
                f"the conversation no longer fits the {positions} positions of {what}: dropped the oldest {dropped} exchange(s)"
            )
        pieces: list[str] = []
        config = dataclasses.replace(sampling, seed=sampling.seed + turn)
        try:
            for piece in stream(gen.engine, gen.tokenizer, ids, config):
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write("\n")
            out.flush()
            raise
        out.write("\n")
        out.flush()
        messages.append({"role": "assistant", "content": "".join(pieces)})
        turn += 1
