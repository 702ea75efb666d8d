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


def cache_dir() -> Path:
    """mobizo's cache (``$MOBIZO_CACHE``, default ``~/.cache/mobizo``)."""
    return Path(os.environ.get("MOBIZO_CACHE") or Path.home() / ".cache" / "mobizo")


def cached_file_sha256(path: Path) -> str:
    """sha256 of a (large, unchanging) file, remembered in the cache by resolved path, size and mtime:
    a 4 GB checkpoint is read once, not at every run."""
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}:{st.st_size}:{st.st_mtime_ns}"
    store = cache_dir() / "file-sha256.json"
    try:
        known = json.loads(store.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if key not in known:
        known[key] = file_sha256(p)[1]
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known), encoding="utf-8")
            os.replace(tmp, store)
        except OSError:
            pass  # a read-only home: hash again next time
    return known[key]


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


def jsonable(obj):
    """``obj`` with every non-finite float replaced by ``None``: strict JSON has no NaN or Infinity."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    """Strict JSON (``null`` for NaN / infinity), the only way mobizo writes JSON."""
    return json.dumps(jsonable(obj), allow_nan=False, **kwargs)


def quiet_imports() -> None:
    """Silence what importing the model stack prints, where it comes from: torchao's ``Failed to load
    .../_C_mxfp8...so`` warnings (its ``torchao`` logger, when transformers' quantizers import it: the CUDA
    kernels it ships cannot load on a CPU-only machine, and mobizo needs none of them) and torch's
    pytree deprecation notices. Only those loggers are touched: the Python API calls this too."""
    import logging

    logging.getLogger("torchao").setLevel(logging.CRITICAL)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


@contextlib.contextmanager
def no_transformers_bars():
    """transformers' progress bars (``Loading weights``) off while mobizo loads a model (it reports its
    own progress, or none with ``--no-progress`` / ``progress=False``); restored afterwards."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def quiet_third_party() -> None:
    """The command line's silence: :func:`quiet_imports`, import warnings (torchao's optional CUDA kernels,
    pytree deprecations), transformers' and datasets' progress bars. mobizo's own messages go to stderr
    explicitly."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    quiet_imports()
