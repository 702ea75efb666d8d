"""Engines drive the one step implementation (:mod:`mobizo.step`).

An engine exposes:

* ``name``; ``shapes``: fixed (length, answer_len, rows) for batches, ``None`` where free;
* ``train_step(batch, step, lr, eps) -> StepOutput``;
* ``score(batch) -> (sums, counts)``: per-row answer cross-entropy sums and token counts (eval);
* optional ``score_choices(batch) -> (sums, counts)`` of shape (examples, choices) for a shared-prompt
  batch (one-token candidates scored at the prompt's last position): classification and multiple-choice
  eval use it when every candidate is one token;
* optional ``next_token_logits(input_ids, attention_mask) -> (rows, vocab)`` for left-padded rows:
  generation eval (greedy decoding) needs it;
* ``adapter_state()`` / ``load_adapter_state(state)``; ``optimizer_state()`` / ``load_optimizer_state``.
"""

from dataclasses import dataclass, field


@dataclass
class Shapes:
    length: int | None = None
    answer_len: int | None = None
    rows: int | None = None
    eval_rows: int | None = None
    shared: bool | None = None  # choice batches: None = either layout, True = shared prompt only, False = per candidate only
    choices: int | None = None  # candidates per example a fixed-shape shared-prompt program scores


@dataclass
class StepOutput:
    loss: float
    projected_grads: list[float] = field(default_factory=list)
    losses: list[list[float]] = field(default_factory=list)  # [plus per direction, minus per direction]
