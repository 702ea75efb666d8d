"""Feedback on long work: status lines and progress bars on stderr.

They appear when stderr is a terminal (as tqdm's and most CLIs' do; a log file or a pipe gets only
results and one-line errors) and are silenced by ``--no-progress``."""

from __future__ import annotations

import contextlib
import sys
import time


def interactive(enabled: bool = True) -> bool:
    return bool(enabled) and sys.stderr.isatty()


@contextlib.contextmanager
def status(what: str, enabled: bool = True):
    """``mobizo: <what> ...`` then ``done in 1.2 s`` (or ``failed``) on the same line."""
    if not interactive(enabled):
        yield
        return
    t0 = time.perf_counter()
    print(f"mobizo: {what} ...", end="", file=sys.stderr, flush=True)
    try:
        yield
    except BaseException:
        print(" failed", file=sys.stderr, flush=True)
        raise
    print(f" done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def bar(total: int, desc: str, enabled: bool = True, initial: int = 0, unit: str = "it"):
    """A tqdm bar on stderr (disabled: a no-op object with the same methods)."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not interactive(enabled),
        dynamic_ncols=True,
        unit=unit,
        file=sys.stderr,
    )


class Stages:
    """Status lines for a sequence of stages: ``stages("tracing")`` ends the previous stage's line
    (with its time) and starts the next; ``stages.done()`` ends the last one."""

    def __init__(self, what: str, enabled: bool = True):
        self.what, self.enabled = what, interactive(enabled)
        self.t0 = self.current = None
        self.seconds: dict[str, float] = {}  # each ended stage's time, kept whether or not lines are shown

    def __call__(self, stage: str) -> None:
        self.done()
        self.t0, self.current = time.perf_counter(), stage
        if self.enabled:
            print(f"mobizo: {self.what}: {stage} ...", end="", file=sys.stderr, flush=True)

    def done(self, failed: bool = False) -> None:
        if self.current is not None:
            took = time.perf_counter() - self.t0
            self.seconds[self.current] = round(took, 1)
            if self.enabled:
                print(" failed" if failed else f" done in {took:.1f} s", file=sys.stderr, flush=True)
            self.current = None
