"""The program cache: exported ExecuTorch programs kept for reuse, so a run need not export again.

A run's program directory (``--out``'s ``program/``, or a scratch directory) is reused when it
already holds an intact program built for the run (:func:`program_matches`). Otherwise the cache
(``$MOBIZO_CACHE/programs``) may hold one: every exported program is kept there, hard links where
the file system allows, so a kept program costs no space while its run directory exists. The key is
everything the program is built from (the manifest's identity), so a run that changes only what the
program takes as input (lr, eps, steps, schedule, eval cadence) or only its ``--out`` reuses the
export instead of repeating it. A ``--fixed-length`` program is kept apart: it would serve a run
that asked for any length, but pad all its batches. The :data:`PROGRAMS_KEPT` most recently used
programs stay.

:func:`mobizo.build.build_engine` is the one user; the programs themselves are made by
:mod:`mobizo.engines.executorch` and written with :func:`mobizo.fsio.atomic_write_dir`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from .engines.executorch import PROGRAM, check_manifest, read_manifest
from .errors import MobizoError
from .fsio import atomic_write_dir
from .rundir import write_marker
from .util import cache_dir, dumps, file_sha256


def program_matches(program_dir: Path, expected: dict) -> bool:
    """Whether ``program_dir`` holds an intact program built for ``expected`` (reuse instead of re-export)."""
    try:
        m = read_manifest(program_dir)
        check_manifest(m, expected)
        size, digest = file_sha256(Path(program_dir) / PROGRAM)
    except (MobizoError, OSError):
        return False
    return size == m.pte_bytes and digest == m.pte_sha256


PROGRAMS_KEPT = 4  # programs kept (the most recently used); older ones are deleted


def _program_cache(expected: dict, fixed_length: bool = False) -> Path:
    key = {**expected, "fixed_length": True} if fixed_length else expected
    return cache_dir() / "programs" / hashlib.sha256(dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _link_tree(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.name.startswith("."):
            continue
        if f.is_dir():  # the carried tokenizer
            (dst / f.name).mkdir()
            _link_tree(f, dst / f.name)
        elif f.is_file():
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)


def restore_program(target: Path, expected: dict, fixed_length: bool = False) -> bool:
    """Put the kept program built for ``expected`` into ``target``; False when none is kept."""
    src = _program_cache(expected, fixed_length)
    if not program_matches(src, expected):
        return False
    atomic_write_dir(Path(target), lambda d: _link_tree(src, d))
    write_marker(target, "program")
    src.touch()  # most recently used
    return True


def keep_program(program_dir: Path, expected: dict, fixed_length: bool = False) -> None:
    """Keep a just-exported program in the cache (the :data:`PROGRAMS_KEPT` most recently used)."""
    dst = _program_cache(expected, fixed_length)
    try:
        atomic_write_dir(dst, lambda d: _link_tree(Path(program_dir), d))
        kept = sorted(
            (p for p in dst.parent.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for old in kept[PROGRAMS_KEPT:]:
            shutil.rmtree(old, ignore_errors=True)
    except OSError:
        pass  # a cache that cannot be written only costs the next export
