"""Engines drive the one step implementation (:mod:`mobizo.step`); :class:`Engine` is their interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass
class Shapes:
    """Fixed batch shapes of an engine (an exported program fixes rows and the answer window; its
    sequence length is free up to the manifest's max_length); ``None`` where free."""

    length: int | None = None
    answer_len: int | None = None
    rows: int | None = None
    eval_rows: int | None = None
    shared: bool | None = (
        None  # choice batches: None = either layout, True = shared prompt only, False = per candidate only
    )
    choices: int | None = None  # candidates per example a fixed-shape shared-prompt program scores


@dataclass
class StepOutput:
    loss: float
    projected_grads: list[float] = field(default_factory=list)
    losses: list[list[float]] = field(default_factory=list)  # [plus per direction, minus per direction]
    extra: dict = field(default_factory=dict)  # more fields for the step's metrics record (distributed: dist_bytes)


@runtime_checkable
class Engine(Protocol):
    """What the trainer, eval and the benchmarks need from whoever runs the step.

    Optional methods: ``score_choices(batch) -> (sums, counts)`` of shape (examples, choices) for a
    shared-prompt batch (one-token candidates scored at the prompt's last position; classification and
    multiple-choice eval use it when every candidate is one token); ``next_token_logits(input_ids,
    attention_mask) -> (rows, vocab)`` for left-padded rows (generation tasks).
    """

    name: str
    shapes: Shapes

    def train_step(self, batch, step: int, lr: float, eps: float) -> StepOutput:
        """One training step on ``batch`` (the update is applied to the engine's adapter)."""

    def score(self, batch):
        """(per-row answer cross-entropy sums, per-row answer token counts) with the current adapter."""

    def adapter_state(self) -> dict:
        """{``<module>.lora_A`` / ``<module>.lora_B``: tensor} of the current adapter."""

    def load_adapter_state(self, state: dict) -> None: ...

    def optimizer_state(self): ...

    def load_optimizer_state(self, state) -> None: ...
