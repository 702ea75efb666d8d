"""Small helpers shared across mobizo: file hashing, strict JSON, silencing native chatter."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
from pathlib import Path


def file_sha256(path: Path) -> tuple[int, str]:
    """(size, sha256) of a file, read in chunks (never the whole file in memory)."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


@contextlib.contextmanager
def quiet_stderr():
    """Silence the runtime's C++ start-up chatter (cpuinfo probes) on fd 2; Python errors still propagate."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


