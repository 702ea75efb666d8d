"""Learning-rate schedules: the lr of each step as a pure function of (step, base lr, total steps).

``lr_at(step, base_lr, steps, schedule, warmup_steps)`` with 1-based ``step``:

* warmup (``step <= warmup_steps``): linear ramp ``base_lr * step / warmup_steps`` (never 0);
* then, with ``progress = (step - warmup_steps - 1) / (steps - warmup_steps)`` in [0, 1):

  - ``constant``: ``base_lr``;
  - ``linear``: ``base_lr * (1 - progress)`` (the last step gets ``base_lr / (steps - warmup_steps)``);
  - ``cosine``: ``base_lr * (1 + cos(pi * progress)) / 2``.

Being a pure function of the step, a resumed run continues the same schedule, and the lr logged
per step in ``metrics.jsonl`` is exactly what ``mobizo replay`` applies. ``steps`` shapes the decay,
so for a decaying schedule it is part of the trajectory (changing ``--steps`` on resume changes
the lr of the steps still to come).
"""

from __future__ import annotations

import math

from .errors import MobizoError

SCHEDULES = ("constant", "linear", "cosine")


def check_schedule(schedule: str, warmup_steps: int, steps: int) -> None:
    if schedule not in SCHEDULES:
        raise MobizoError(f"unknown --lr-schedule {schedule!r} (choose from {', '.join(SCHEDULES)})")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise MobizoError(f"--warmup-steps must be an integer >= 0, got {warmup_steps}")
    if steps < 1:
        raise MobizoError(f"--steps must be >= 1, got {steps}")
    if warmup_steps >= steps and schedule != "constant":
        raise MobizoError(f"--warmup-steps {warmup_steps} leaves no step of the {schedule} decay in --steps {steps}")


def lr_at(step: int, base_lr: float, steps: int, schedule: str = "constant", warmup_steps: int = 0) -> float:
    """The learning rate of 1-based training ``step`` (see the module docstring)."""
    check_schedule(schedule, warmup_steps, steps)
    if step < 1:
        raise MobizoError(f"steps are numbered from 1, got {step}")
    if step <= warmup_steps:
        return base_lr * step / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = min(step - warmup_steps - 1, steps - warmup_steps - 1) / (steps - warmup_steps)
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
