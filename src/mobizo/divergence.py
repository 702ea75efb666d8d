"""Divergence: a training loss that climbs far above its running minimum and stays there.

The in-graph guard (:func:`mobizo.step.guard_ok`) catches single bad steps (non-finite values, an
overflowing update). A run can also diverge slowly with every step finite: on Gemma 3 270M with a
learning rate that suits SmolLM2, the loss fell from 0.98 to 0.3 in 20 steps, then climbed to 6.7 by step
200, and the run "completed" with accuracy 0.175 from 0.75. :class:`Monitor` watches the smoothed loss:

* the loss of every applied step feeds an exponential moving average (``ALPHA``: ~10 steps);
* after ``WARMUP`` steps, the run has diverged when the average stays above ``FACTOR`` times its lowest
  value so far (and at least ``MARGIN`` above it, for losses near 0) for ``PATIENCE`` consecutive steps.

While the average is above that threshold no periodic checkpoint is written (as inside a streak of
steps the guard skipped), so the last checkpoint is a healthy one.

What the trainer then does is ``--divergence`` (docs/reliability.md): ``rollback`` (default) restores the
adapter and update-rule state of the last checkpoint taken while the loss was healthy, halves the
learning rate for the rest of the run (``LR_CUT``; the lr of every step is logged, so ``mobizo replay``
follows) and goes on, at most ``MAX_ROLLBACKS`` times before it stops; ``stop`` stops the run; ``warn``
prints one line and goes on; ``off``. The native trainer applies the same rule with the constants the
bundle carries (:func:`constants`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

POLICIES = ("rollback", "stop", "warn", "off")
ALPHA = 0.1  # weight of each step's loss in the moving average
WARMUP = 10  # steps before the average is trusted
FACTOR = 2.0  # diverged: average > FACTOR x its minimum ...
MARGIN = 0.5  # ... and > minimum + MARGIN
PATIENCE = 20  # ... for this many consecutive steps
LR_CUT = 0.5  # rollback: the learning rate is multiplied by this
MAX_ROLLBACKS = 3  # then the run stops


def constants() -> dict:
    """The rule's constants, as a bundle carries them for the native trainer."""
    return {
        "alpha": ALPHA,
        "warmup": WARMUP,
        "factor": FACTOR,
        "margin": MARGIN,
        "patience": PATIENCE,
        "lr_cut": LR_CUT,
        "max_rollbacks": MAX_ROLLBACKS,
    }


@dataclass
class Monitor:
    """The smoothed loss and the streak of steps above the divergence threshold (state saved in checkpoints)."""

    average: float | None = None
    lowest: float | None = None
    steps: int = 0  # applied steps seen
    streak: int = 0  # consecutive steps above the threshold

    def update(self, loss: float) -> bool:
        """Feed one applied step's loss; True when the run has diverged (see the module docstring)."""
        if not math.isfinite(loss):
            return False  # (the guard skips such a step; it never reaches here)
        self.steps += 1
        self.average = loss if self.average is None else (1 - ALPHA) * self.average + ALPHA * loss
        if self.steps <= WARMUP:
            self.lowest = self.average if self.lowest is None else min(self.lowest, self.average)
            return False
        if self.average > self.threshold():
            self.streak += 1
        else:
            self.streak = 0
            self.lowest = min(self.lowest, self.average)
        return self.streak >= PATIENCE

    def threshold(self) -> float:
        return max(FACTOR * self.lowest, self.lowest + MARGIN)

    @property
    def healthy(self) -> bool:
        return self.streak == 0

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, state: dict | None) -> Monitor:
        if not isinstance(state, dict):
            return cls()
        return cls(**{k: state.get(k, getattr(cls(), k)) for k in ("average", "lowest", "steps", "streak")})
