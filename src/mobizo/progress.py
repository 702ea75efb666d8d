"""Feedback on long work: status lines and progress bars on stderr.

They appear when stderr is a terminal (as tqdm's and most CLIs' do) and are silenced by
``--no-progress``. Off a terminal (a log file, nohup, CI) a training run prints a progress line every
:data:`LINE_SECONDS` seconds and one at the end instead of a bar (:class:`Lines`, as training frameworks
log), so a long run in a log is not silent until its result; everything else there prints only
results and one-line errors."""

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


LINE_SECONDS = 30.0  # off a terminal: a progress line at most this often (and one at the end)


def bar(total: int, desc: str, enabled: bool = True, initial: int = 0, unit: str = "it", lines: bool = False):
    """A tqdm bar on stderr (disabled: a no-op object with the same methods). ``lines``: off a terminal,
    :class:`Lines` instead of nothing."""
    if lines and enabled and not interactive(enabled):
        return Lines(total, desc, initial, unit)
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


def duration(seconds: float) -> str:
    """``45s``, ``3m20s``, ``2h05m``."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Lines:
    """Progress for a log: ``mobizo: eager/prge step 120/1000: loss 0.6931, 1.52 s/step, eta 22m18s`` at most
    every :data:`LINE_SECONDS` seconds, and a last line when it closes; tqdm's ``update`` /
    ``set_postfix`` / ``close`` (call ``set_postfix`` before ``update`` for the line to carry it)."""

    def __init__(self, total: int, desc: str, initial: int = 0, unit: str = "it"):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.shown = self.start = initial
        self.t0 = self.last = time.monotonic()
        self.postfix: dict = {}

    def set_postfix(self, values: dict | None = None, refresh: bool = True) -> None:
        self.postfix = dict(values or {})

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= LINE_SECONDS:
            self._line(now)

    def _line(self, now: float) -> None:
        done = self.n - self.start
        parts = [f"{k} {v}" for k, v in self.postfix.items()]
        if done > 0:
            per = (now - self.t0) / done
            parts.append(f"{per:.2f} s/{self.unit}")
            left = self.total - self.n
            parts.append(f"eta {duration(per * left)}" if left > 0 else f"{duration(now - self.t0)} in all")
        print(f"mobizo: {self.desc} {self.unit} {self.n}/{self.total}: {', '.join(parts)}", file=sys.stderr, flush=True)
        self.last, self.shown = now, self.n

    def close(self) -> None:
        if self.n != self.shown:
            self._line(time.monotonic())

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
