"""The run directory (``--out``): what mobizo writes there, and the rules for replacing or resuming it.

Layout of a run directory::

    .mobizo            marker written at creation: {"mobizo": version, "kind": "run"}
    metrics.jsonl      header record, then one record per step (:class:`MetricsLog`)
    checkpoint/        adapter + state.json (+ optimizer.pt): what --resume continues
    adapter/           the final adapter (PEFT format)
    best/              the adapter of the best periodic eval
    summary.json       the outcome
    program/           --engine executorch: train.pte + manifest.json

Rules, checked by :meth:`RunDir.check` before any work starts:

* a directory that holds anything is refused unless ``--resume`` (it must hold a checkpoint) or
  ``--overwrite`` (it must carry the marker);
* ``--overwrite`` removes only the entries in :data:`ENTRIES` (and the scratch entries of atomic
  writes): a file of yours inside a run directory survives;
* ``program/`` is removed only if the new run does not use it (it is reused when it matches, see
  :mod:`mobizo.program_cache`).

Every file is written atomically (:mod:`mobizo.fsio`) and in strict JSON; adapters and checkpoints in
the formats of :mod:`mobizo.checkpoint`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path

from . import __version__
from .checkpoint import load_checkpoint, read_state, save_adapter, save_checkpoint
from .errors import MobizoError
from .fsio import atomic_write_text, clean_stale, clear_entries, resolve_dir
from .util import dumps

MARKER = ".mobizo"
METRICS, SUMMARY = "metrics.jsonl", "summary.json"
CHECKPOINT, ADAPTER, BEST, PROGRAM_DIR = "checkpoint", "adapter", "best", "program"
ENTRIES = (CHECKPOINT, ADAPTER, BEST, SUMMARY, METRICS, PROGRAM_DIR)  # removal order: checkpoint first
LOG_FORMAT = 1  # version of the metrics.jsonl header record
_SCRATCH = re.compile(r"^\.(.+)\.(tmp-|trash-|old$)")


def default_out(task: str, estimator: str) -> Path:
    """``runs/<task>-<estimator>-<YYYYmmdd-HHMMSS>[-N]`` (the documented default of ``--out``; never an existing one)."""
    base = Path("runs") / f"{task}-{estimator}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def write_marker(directory: Path, kind: str) -> None:
    atomic_write_text(Path(directory) / MARKER, dumps({"mobizo": __version__, "kind": kind}) + "\n")


def read_marker(directory: Path) -> dict | None:
    try:
        marker = json.loads((Path(directory) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return marker if isinstance(marker, dict) and "kind" in marker else None


def is_mobizo_entry(name: str, entries=ENTRIES) -> bool:
    """An entry mobizo writes in a directory of this kind, or the scratch of one of its atomic writes."""
    if name == MARKER or name in entries:
        return True
    m = _SCRATCH.match(name)
    return bool(m) and (m.group(1) in entries or m.group(1) in (MARKER, "overwrite"))


def _is_scratch(name: str) -> bool:
    """Scratch of one of mobizo's atomic writes (what a kill can leave), not a complete entry."""
    return bool(_SCRATCH.match(name)) and not name.endswith(".old") and is_mobizo_entry(name)


def check_target(path: Path, what: str = "--out") -> None:
    """``path`` can be created or written: an existing file, a path under a file or an unwritable parent
    is an error (before any work starts)."""
    if path.exists() and not path.is_dir():
        raise MobizoError(f"{what} {path} exists and is not a directory")
    if path.exists():
        if not os.access(path, os.W_OK | os.X_OK):
            raise MobizoError(f"{what} {path} is not writable")
        return
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise MobizoError(f"cannot create {what} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MobizoError(f"cannot create {what} {path}: {parent} is not writable")


def check_replaceable(
    path: Path, kind: str, overwrite: bool, what: str = "--out", entries=ENTRIES, exclusive: bool = False
) -> None:
    """A non-empty ``path`` may only be replaced with ``overwrite`` and only if it carries the marker of ``kind``.
    ``exclusive``: the whole directory is swapped, so it must hold nothing but mobizo's ``entries``."""
    check_target(path, what)
    if not path.is_dir() or not any(path.iterdir()):
        return
    if not overwrite:
        raise MobizoError(f"{what} {path} is not empty (use --overwrite to replace it)")
    marker = read_marker(path)
    if marker is None or marker.get("kind") != kind:
        raise MobizoError(f"--overwrite: {path} is not a mobizo {kind} directory (no {MARKER} marker); not touching it")
    foreign = sorted(e.name for e in path.iterdir() if not is_mobizo_entry(e.name, entries))
    if exclusive and foreign:
        raise MobizoError(
            f"--overwrite: {path} also holds {foreign[0]!r}, which mobizo did not write; not replacing it"
        )


class RunDir:
    """Owns ``--out``: policy, metrics log, checkpoints, adapters, summary.

    ``writes=False``: ``--out`` as a process that does not own it sees it (a distributed rank other
    than 0, :mod:`mobizo.distributed`): opening, logging, checkpoints, adapters and the summary write
    nothing, and :meth:`has` finds nothing, so the trainer runs unchanged on every rank.
    """

    def __init__(self, path: str | Path, writes: bool = True):
        self.path = Path(path)
        self.writes = writes

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------ policy

    def check(self, resume: bool, overwrite: bool) -> None:
        """Validate before anything is loaded or written (see the module docstring)."""
        if resume and overwrite:
            raise MobizoError("--resume and --overwrite exclude each other (continue the run, or replace it)")
        check_target(self.path)
        if resume:
            if not self.path.is_dir() or resolve_dir(self / CHECKPOINT) is None:
                raise MobizoError(
                    f"--resume: no checkpoint in {self.path} (a run killed before its first checkpoint has nothing "
                    "to resume: start it again with --overwrite)"
                )
            return
        # a directory holding only the scratch of a run killed at its start counts as empty
        if self.path.is_dir() and any(not _is_scratch(e.name) for e in self.path.iterdir()):
            if not overwrite:
                raise MobizoError(
                    f"--out {self.path} is not empty (use --resume to continue that run or --overwrite to replace it)"
                )
            if (read_marker(self.path) or {}).get("kind") != "run":
                raise MobizoError(
                    f"--overwrite: {self.path} is not a mobizo run directory (no {MARKER} marker); not deleting anything"
                )

    def open(self, resume: bool, overwrite: bool, keep_program: bool = False) -> None:
        """Make the directory ready: clean a resumed run's scratch, or empty a replaced run's entries."""
        if not self.writes:
            return
        clean_stale(self.path)
        if overwrite and self.path.is_dir():
            entries = [e for e in ENTRIES if not (keep_program and e == PROGRAM_DIR)]
            clear_entries(self.path, lambda name: is_mobizo_entry(name, entries) and name != MARKER)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MobizoError(f"cannot create --out {self.path}: {e.strerror or e}") from e
        if read_marker(self.path) is None:
            write_marker(self.path, "run")

    # ------------------------------------------------------------ files

    def read_state(self) -> dict:
        d = resolve_dir(self / CHECKPOINT)
        try:
            return read_state(d)
        except MobizoError as e:
            raise MobizoError(f"--resume: {e}") from e

    def load_checkpoint(self):
        return load_checkpoint(self / CHECKPOINT)

    def save_checkpoint(
        self, adapter, rank, alpha, model, state: dict, optimizer=None, fan_in_fan_out=None, rollback=None
    ) -> None:
        if self.writes:
            save_checkpoint(self / CHECKPOINT, adapter, rank, alpha, model, state, optimizer, fan_in_fan_out, rollback)

    def save_adapter(self, name: str, adapter, rank, alpha, model, fan_in_fan_out=None) -> None:
        if self.writes:
            save_adapter(self / name, adapter, rank, alpha, model, fan_in_fan_out)

    def has(self, name: str) -> bool:
        return self.writes and resolve_dir(self / name) is not None

    def write_summary(self, summary: dict) -> None:
        if self.writes:
            atomic_write_text(self / SUMMARY, dumps(summary, indent=1))

    def open_log(self, header: dict, resume_step: int | None = None) -> MetricsLog | NoLog:
        """The run's metrics.jsonl (:class:`MetricsLog`), or a :class:`NoLog` when this process writes nothing."""
        return MetricsLog(self / METRICS, header, resume_step=resume_step) if self.writes else NoLog()


# ---------------------------------------------------------------- metrics.jsonl


def log_header(config: dict, layers: list[str]) -> dict:
    """First line of metrics.jsonl: what `mobizo replay` needs besides the per-step records."""
    return {"mobizo_log": LOG_FORMAT, "config": config, "layers": list(layers), "mobizo_version": __version__}


def read_log(path: str | Path, upto: int | None = None) -> tuple[dict | None, list[dict]]:
    """(header, step records in file order) of a metrics.jsonl, records after step ``upto`` dropped.

    A last line without its newline was cut by a kill (never covered by a checkpoint) and is dropped;
    any other malformed line is an error naming the line.
    """
    p = Path(path)
    if not p.is_file():
        raise MobizoError(f"{p} does not exist or is not a file")
    try:
        data = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MobizoError(f"{p}: not valid UTF-8 text (byte offset {e.start})") from e
    except OSError as e:
        raise MobizoError(f"{p}: unreadable ({e.strerror or e})") from e
    lines = data.split("\n")
    header, records = None, []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            if lineno == len(lines):  # no newline after it: cut by a kill
                break
            raise MobizoError(f"{p}:{lineno}: malformed JSON line ({getattr(e, 'msg', e)})") from e
        if not isinstance(rec, dict):
            raise MobizoError(f"{p}:{lineno}: expected a JSON object")
        if header is None and not records and "mobizo_log" in rec:
            header = rec
            continue
        if upto is not None and isinstance(rec.get("step"), int) and rec["step"] > upto:
            continue
        rec["_line"] = lineno
        records.append(rec)
    return header, records


class MetricsLog:
    """The one writer of metrics.jsonl: a header record, then one whole line per step.

    Every record goes out with its own ``os.write`` calls (no buffer holding part of a line), so a kill
    leaves at most a partial last line (which :func:`read_log` drops). A write that fails (a full disk,
    a file-size limit) after part of the line went out is cut back to the last whole line, so the log
    stays strict JSON lines, and the error names the file. :meth:`sync` before each checkpoint makes the
    log always cover the checkpoint (resume and replay rely on it).
    """

    def __init__(self, path: Path, header: dict, resume_step: int | None = None):
        self.path = Path(path)
        keep: list[dict] = []
        if resume_step is not None and self.path.exists():
            old_header, keep = read_log(self.path, upto=resume_step)  # steps after the checkpoint are redone
            header = old_header or header
        self._write(header, keep)
        self.kept = keep
        self._fd: int | None = self._open()

    def _write(self, header: dict, records: list[dict]) -> None:
        lines = [dumps(header)] + [dumps({k: v for k, v in r.items() if k != "_line"}) for r in records]
        atomic_write_text(self.path, "".join(line + "\n" for line in lines))

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as e:
            raise MobizoError(f"cannot open {self.path}: {e.strerror or e}") from e

    def append(self, record: dict) -> None:
        data = (dumps(record) + "\n").encode("utf-8")
        size = os.fstat(self._fd).st_size
        try:
            done = 0
            while done < len(data):
                done += os.write(self._fd, data[done:])
        except OSError as e:
            with contextlib.suppress(OSError):  # best effort: readers drop a torn last line anyway
                os.ftruncate(self._fd, size)
            raise MobizoError(
                f"cannot write {self.path}: {e.strerror or e} (the log keeps every whole line; free space and "
                "resume with --resume)"
            ) from e

    def rewind(self, step: int) -> None:
        """Drop the records after ``step`` (a rollback redoes those steps), atomically."""
        self.close()
        self._write(*read_log(self.path, upto=step))
        self._fd = self._open()

    def sync(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError as e:
                raise MobizoError(f"cannot write {self.path}: {e.strerror or e}") from e

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class NoLog:
    """The metrics log of a process that writes nothing (:class:`RunDir` with ``writes=False``)."""

    kept: tuple = ()

    def append(self, record: dict) -> None:
        pass

    def rewind(self, step: int) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass
