"""Atomic file I/O: a kill at any moment leaves either the old or the new version of what is written.

:func:`atomic_write_dir` writes a directory into a temporary sibling, fsyncs it and renames it into
place; :func:`atomic_write_text` does the same for one file. What a kill can leave behind:

* ``.<name>.tmp-*``: a version being written (incomplete; never read);
* ``.<name>.old``: the previous version during the two renames of a swap;
  complete, and the one :func:`resolve_dir` returns while ``<name>`` is missing;
* ``.<name>.trash-*``: an old version being deleted (never read).

:func:`clean_stale` removes those scratch entries; :func:`clear_entries` deletes a set of entries so
that a kill midway leaves only complete ones. ``MOBIZO_TEST_SLOW_CHECKPOINT=<seconds>`` (tests only)
sleeps at each stage of an atomic write so a fault-injection test can kill a process inside it.

Everything mobizo writes goes through here: checkpoints and adapters (:mod:`mobizo.checkpoint`), the
run directory's files (:mod:`mobizo.rundir`), exported programs (:mod:`mobizo.engines.executorch`),
kept programs (:mod:`mobizo.program_cache`), bundles and converted models. The native trainer has the
same rules in C++ (native/src/fsutil.h).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .errors import MobizoError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(root))


def _fault_pause() -> None:
    """Test hook: widen the windows inside atomic writes (``MOBIZO_TEST_SLOW_CHECKPOINT`` seconds)."""
    delay = os.environ.get("MOBIZO_TEST_SLOW_CHECKPOINT")
    if delay:
        time.sleep(float(delay))


def _discard(path: Path) -> None:
    """Delete a directory so that no reader ever sees it half-deleted: rename it to trash first."""
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name.lstrip('.')}.trash-", dir=path.parent))
    os.replace(path, trash / "x")
    shutil.rmtree(trash, ignore_errors=True)


def atomic_write_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmpdir)`` then swap ``tmpdir`` into ``target`` (old version kept until the swap).

    At every moment either ``target`` or its ``.old`` twin is a complete version
    (see :func:`resolve_dir`); a kill leaves at most scratch entries behind.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        mode = 0o666 & ~_umask()
        for root, _, files in os.walk(tmp):
            for f in files:
                os.chmod(os.path.join(root, f), mode)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; use the usual permissions
        _fault_pause()
        _fsync_tree(tmp)
        old = target.parent / f".{target.name}.old"
        if target.exists():
            if old.exists():
                _discard(old)  # stale: a kill after the last swap's second rename
            os.replace(target, old)
            _fsync_dir(target.parent)
            _fault_pause()  # target missing, .old complete: resolve_dir finds .old
        # (target missing and .old present: a killed swap; .old stays until the new version is in place)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old.exists():
            _fault_pause()
            _discard(old)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_naming(e, target, tmp)
        raise


def atomic_write_file(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a temporary sibling of ``path``, fsync it and rename it onto ``path``: ``path`` is
    either complete or untouched, whenever a kill lands."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _fault_pause()
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _raise_naming(e, path, Path(tmp))
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _raise_naming(e: BaseException, target: Path, scratch: Path) -> None:
    """A write that failed (a full disk, a file-size limit: ``OSError`` without a file name, or naming the
    scratch copy) as one line naming what was being written; any other error is left as it is."""
    if isinstance(e, OSError) and (not e.filename or str(e.filename).startswith(str(scratch))):
        raise MobizoError(f"cannot write {target}: {e.strerror or e}") from e


_SCRATCH = re.compile(r"^\..+\.(tmp|trash)-")


def clear_entries(directory: Path, remove: Callable[[str], bool]) -> None:
    """Delete the entries of ``directory`` for which ``remove(name)`` holds, so that a kill midway leaves
    only complete entries (plus scratch): they are renamed into a scratch trash directory, then deleted.

    An entry named like a checkpoint goes first: in a run directory a kill midway never leaves a checkpoint
    without the log it relies on.
    """
    d = Path(directory)
    names = sorted((e.name for e in d.iterdir() if remove(e.name)), key=lambda n: ("checkpoint" not in n, n))
    if not names:
        return
    trash = Path(tempfile.mkdtemp(prefix=".overwrite.trash-", dir=d))
    for name in names:
        os.replace(d / name, trash / name)
    shutil.rmtree(trash, ignore_errors=True)


def clean_stale(directory: Path) -> list[str]:
    """Remove what a killed atomic write can leave in ``directory``: scratch entries, and ``.X.old`` next to ``X``."""
    d = Path(directory)
    removed: list[str] = []
    if not d.is_dir():
        return removed
    for entry in sorted(d.iterdir()):
        name = entry.name
        stale_old = name.startswith(".") and name.endswith(".old") and (d / name[1:-4]).exists()
        if stale_old and entry.is_dir() and not entry.is_symlink():
            _discard(entry)  # complete until it is renamed away: never seen half-deleted
            removed.append(name)
        elif _SCRATCH.match(name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(name)
    return removed


def resolve_dir(target: Path) -> Path | None:
    """``target``, or its ``.old`` twin if a kill struck between the two renames of a swap."""
    target = Path(target)
    if target.is_dir():
        return target
    old = target.parent / f".{target.name}.old"
    return old if old.is_dir() else None
