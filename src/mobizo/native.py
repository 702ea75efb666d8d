"""Build and run the native on-device trainer ``mobizo-train`` (C++17 sources in ``native/``).

``mobizo-train`` trains from a bundle (:mod:`mobizo.bundle`) inside the stock ExecuTorch runtime,
with no Python or torch in the process. It is built against the installed ``executorch`` wheel,
which ships the runtime (``libexecutorch.so``), the CPU kernels, the XNNPACK delegate, their
headers and a CMake package config:

* needs a C++17 compiler and CMake >= 3.19 (>= 3.28 uses the wheel's imported targets; older
  versions link the same libraries through its variables), Ninja if present (else make). The
  ``test`` extra installs ``cmake>=3.28`` and ``ninja`` from PyPI; those are used when importable.
* the build directory is cached, by default in ``$XDG_CACHE_HOME/mobizo/native/<key>``
  (``~/.cache/...``; ``MOBIZO_NATIVE_CACHE`` overrides the root), where the key hashes the sources,
  the executorch package and the compiler: a change of any of them builds afresh.
* the sources are found next to the package (a source checkout or editable install:
  ``<repo>/native``) or in ``MOBIZO_NATIVE_SRC``.
* the tokenizer (``mobizo-train generate``, ``--data``): the C++ library of ``pytorch-tokenizers``
  (:data:`TOKENIZERS_VERSION`, the one release whose sdist on PyPI holds its C++ sources and
  third-party code: abseil, re2, PCRE2, sentencepiece, nlohmann json). The sdist is downloaded once
  (pinned URL and sha256; ``MOBIZO_TOKENIZERS_SDIST`` names a local copy instead) and its
  ``tokenizers`` and ``regex_lookahead`` static libraries built with its own CMake project into
  ``<cache>/tokenizers-<key>``, shared by every mobizo-train build; mobizo-train links them
  statically. ``build(tokenizer=False)`` builds without it (pre-tokenized training only).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .errors import MobizoError

BINARY = "mobizo-train"
MIN_CMAKE = (3, 19)
TOKENIZERS_VERSION = "1.0.1"
TOKENIZERS_URL = (
    "https://files.pythonhosted.org/packages/0c/a7/d07ebde1011d704e4ab5c8fcb46fc71cb72fdf2c393f85202f7dfb8fd669/"
    "pytorch_tokenizers-1.0.1.tar.gz"
)
TOKENIZERS_SHA256 = "19938c0efd5348fb0589610094c1c6bf6e055b20889f6250068d2b552a0b137b"
# the HF tokenizer over re2; PCRE2 for the look-ahead regexes of some pre-tokenizers (GPT-2 style \s+(?!\S))
# (TK_LOG_ENABLED=0: the library logs to stderr unless told not to, even in Release builds)
TOKENIZERS_CMAKE = (
    "-DSUPPORT_REGEX_LOOKAHEAD=ON",
    "-DTOKENIZERS_BUILD_TEST=OFF",
    "-DTOKENIZERS_BUILD_PYTHON=OFF",
    "-DCMAKE_CXX_FLAGS=-DTK_LOG_ENABLED=0",
)
TOKENIZERS_TARGETS = ("tokenizers", "regex_lookahead")


def source_dir() -> Path:
    """The directory holding ``CMakeLists.txt`` and ``src/`` of mobizo-train."""
    env = os.environ.get("MOBIZO_NATIVE_SRC")
    d = Path(env) if env else Path(__file__).resolve().parents[2] / "native"
    if not (d / "CMakeLists.txt").is_file():
        raise MobizoError(
            f"the mobizo-train sources are not at {d} (set MOBIZO_NATIVE_SRC to the repository's native/ directory)"
        )
    return d


def _executorch_dir() -> Path:
    try:
        import executorch
    except ImportError as e:
        raise MobizoError("building mobizo-train needs the executorch wheel (pip install executorch)") from e
    d = Path(next(iter(executorch.__path__)))
    if not (d / "share" / "cmake" / "executorch-config.cmake").is_file():
        raise MobizoError(
            f"{d} has no share/cmake/executorch-config.cmake (this executorch wheel cannot build C++ programs)"
        )
    return d


def _version(exe: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(x) for x in m.groups(default="0")) if m else ()


def _cmake() -> str:
    """The newest usable cmake: PyPI's ``cmake`` package first, then the one on PATH."""
    candidates = []
    try:
        import cmake

        candidates.append(str(Path(cmake.CMAKE_BIN_DIR) / "cmake"))
    except (ImportError, AttributeError):
        pass
    if shutil.which("cmake"):
        candidates.append(shutil.which("cmake"))
    found = [(v, c) for c in candidates if (v := _version(c))]
    found = [(v, c) for v, c in found if v >= MIN_CMAKE]
    if not found:
        raise MobizoError("building mobizo-train needs CMake >= 3.19 (pip install 'cmake>=3.28' ninja)")
    return max(found)[1]


def _ninja() -> str | None:
    try:
        import ninja

        exe = Path(ninja.BIN_DIR) / "ninja"
        if exe.is_file():
            return str(exe)
    except (ImportError, AttributeError):
        pass
    return shutil.which("ninja")


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise MobizoError("building mobizo-train needs a C++17 compiler (g++ or clang++)")
    return cxx


def _compiler_id(cxx: str) -> bytes:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return cxx.encode()


def _build_key(src: Path, et: Path, cxx: str, tokenizers: Path | None = None) -> str:
    h = hashlib.sha256()
    h.update(f"tokenizers:{tokenizers}".encode())
    for f in sorted([src / "CMakeLists.txt", *(src / "src").glob("*")]):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    h.update(str(et).encode())
    for lib in sorted((et / "lib").glob("*.so")):
        st = lib.stat()
        h.update(f"{lib.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(_compiler_id(cxx))
    return h.hexdigest()[:16]


def default_build_dir() -> Path:
    root = os.environ.get("MOBIZO_NATIVE_CACHE")
    if root:
        return Path(root)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "mobizo" / "native"


def _run_logged(cmds: list[list[str]], log: Path, verbose: bool, what: str) -> None:
    with open(log, "w") as f:
        for cmd in cmds:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            r = subprocess.run(cmd, stdout=None if verbose else f, stderr=None if verbose else subprocess.STDOUT)
            if r.returncode != 0:
                raise MobizoError(f"building {what} failed ({' '.join(cmd[:2])} exited {r.returncode}; see {log})")


def _tokenizers_sdist(dest: Path) -> Path:
    """The pytorch-tokenizers sdist, checked against its pinned sha256: ``MOBIZO_TOKENIZERS_SDIST`` or PyPI."""
    local = os.environ.get("MOBIZO_TOKENIZERS_SDIST")
    path = Path(local) if local else dest / f"pytorch_tokenizers-{TOKENIZERS_VERSION}.tar.gz"
    if not path.is_file():
        import urllib.request

        tmp = path.with_name(path.name + ".part")
        try:
            with urllib.request.urlopen(TOKENIZERS_URL, timeout=120) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as e:
            raise MobizoError(
                f"cannot download pytorch-tokenizers {TOKENIZERS_VERSION} from PyPI ({e}): set MOBIZO_TOKENIZERS_SDIST "
                "to a local copy of its sdist, or build without the tokenizer (mobizo native build --no-tokenizer)"
            ) from e
        tmp.replace(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != TOKENIZERS_SHA256:
        raise MobizoError(f"{path} is not the pytorch-tokenizers {TOKENIZERS_VERSION} sdist (sha256 {digest})")
    return path


def build_tokenizers(verbose: bool = False) -> Path:
    """Build the pytorch-tokenizers C++ library once (cached; see the module docstring); returns the
    directory holding ``src/`` (the extracted sdist) and ``build/`` (its CMake build, the static libraries)."""
    import tarfile

    cxx = _compiler()
    h = hashlib.sha256(f"{TOKENIZERS_SHA256}:{TOKENIZERS_CMAKE}:{TOKENIZERS_TARGETS}".encode() + _compiler_id(cxx))
    root = default_build_dir() / f"tokenizers-{TOKENIZERS_VERSION}-{h.hexdigest()[:12]}"
    root.mkdir(parents=True, exist_ok=True)
    stamp = root / "mobizo-build.key"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file():
            return root
        print(
            f"mobizo: building the tokenizer library pytorch-tokenizers {TOKENIZERS_VERSION} for mobizo-train "
            f"(once; a few minutes) in {root}",
            file=sys.stderr,
            flush=True,
        )
        sdist = _tokenizers_sdist(root)
        src = root / "src"
        if src.exists():
            shutil.rmtree(src)
        with tarfile.open(sdist) as tar:
            tmp = root / "src.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                tar.extractall(tmp)
            (tmp / f"pytorch_tokenizers-{TOKENIZERS_VERSION}").rename(src)
            shutil.rmtree(tmp)
        cmake, ninja = _cmake(), _ninja()
        bdir = root / "build"
        shutil.rmtree(bdir, ignore_errors=True)
        configure = [
            cmake,
            "-S",
            str(src),
            "-B",
            str(bdir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CXX_COMPILER={cxx}",
        ]
        configure += list(TOKENIZERS_CMAKE)
        if ninja:
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        compile_ = [cmake, "--build", str(bdir), "-j2", "--target", *TOKENIZERS_TARGETS]
        _run_logged([configure, compile_], root / "build.log", verbose, f"pytorch-tokenizers {TOKENIZERS_VERSION}")
        if not os.environ.get("MOBIZO_TOKENIZERS_SDIST"):
            sdist.unlink()  # the extracted sources stay (headers, for mobizo-train's own builds)
        stamp.write_text(TOKENIZERS_SHA256 + "\n")
    return root


def has_tokenizer(binary: str | Path) -> bool:
    """Whether a mobizo-train binary was built with the tokenizer library (its ``--version`` says so)."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "tokenizer: pytorch-tokenizers" in out


def build(
    out_dir: str | Path | None = None, force: bool = False, verbose: bool = False, tokenizer: bool = True
) -> Path:
    """Compile mobizo-train against the installed executorch wheel; returns the binary's path.

    ``out_dir`` is the build directory (default: a cached one per sources/wheel/compiler, see the
    module docstring). An up-to-date binary is reused; concurrent builds wait for each other.
    ``tokenizer``: link the tokenizer library (built first if needed: a few minutes, once).
    """
    src, et, cxx = source_dir(), _executorch_dir(), _compiler()
    tokenizers = build_tokenizers(verbose) if tokenizer else None
    key = _build_key(src, et, cxx, tokenizers)
    bdir = Path(out_dir) if out_dir is not None else default_build_dir() / key
    bdir.mkdir(parents=True, exist_ok=True)
    binary, stamp = bdir / BINARY, bdir / "mobizo-build.key"
    with open(bdir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and binary.is_file() and stamp.is_file() and stamp.read_text().strip() == key:
            return binary
        cmake, ninja = _cmake(), _ninja()
        configure = [
            cmake,
            "-S",
            str(src),
            "-B",
            str(bdir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={et / 'share' / 'cmake'}",
            f"-DCMAKE_CXX_COMPILER={cxx}",
        ]
        if force:
            for entry in bdir.iterdir():
                if entry.name != ".lock":
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        if ninja and not (bdir / "CMakeCache.txt").exists():  # a configured dir keeps its generator
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        configure += [
            f"-DMOBIZO_TOKENIZERS_SOURCE={tokenizers / 'src' if tokenizers else ''}",
            f"-DMOBIZO_TOKENIZERS_BUILD={tokenizers / 'build' if tokenizers else ''}",
            f"-DMOBIZO_TOKENIZERS_VERSION={TOKENIZERS_VERSION if tokenizers else ''}",
        ]
        log = bdir / "build.log"
        _run_logged([configure, [cmake, "--build", str(bdir), "-j2"]], log, verbose, "mobizo-train")
        if not binary.is_file():
            raise MobizoError(f"building mobizo-train produced no {binary} (see {log})")
        stamp.write_text(key + "\n")
    return binary


def train(
    bundle: str | Path,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    steps: int | None = None,
    quiet: bool = True,
    binary: str | Path | None = None,
    data: str | Path | None = None,
) -> dict:
    """Run mobizo-train on ``bundle`` into ``out`` (building it first if needed); returns ``summary.json``.
    ``data``: train on these records (a .jsonl of the bundle's task), tokenized by mobizo-train.

    Raises :class:`MobizoError` with the binary's one-line error when it fails.
    """
    if steps is not None and not (isinstance(steps, int) and steps >= 1):  # `mobizo train --steps`'s rule
        raise MobizoError(f"--steps must be >= 1, got {steps}")
    exe = Path(binary) if binary is not None else build()
    cmd = [str(exe), str(bundle), "--out", str(out)]
    if resume:
        cmd.append("--resume")
    if overwrite:
        cmd.append("--overwrite")
    if steps is not None:
        cmd += ["--steps", str(int(steps))]
    if data is not None:
        cmd += ["--data", str(data)]
    if quiet:
        cmd.append("--quiet")
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("mobizo-train: error: ")]
        msg = lines[-1][len("mobizo-train: error: ") :] if lines else (r.stderr.strip().splitlines() or [""])[-1]
        raise MobizoError(msg or f"mobizo-train exited with code {r.returncode}")
    if r.stderr and not quiet:
        sys.stderr.write(r.stderr)
    return json.loads((Path(out) / "summary.json").read_text(encoding="utf-8"))
