"""The gate every patch of a third-party internal goes through (see the package docstring)."""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import MobizoError

ENV = "MOBIZO_NO_PATCHES"  # "1" (or "all"): every patch off; "name,name": those off

# The versions every patch in this package was checked on (byte-identical programs, same results).
EXECUTORCH = {"executorch": "1.5.1"}
TORCH = {"torch": "2.13.0"}
TRANSFORMERS = {"transformers": "5.25.0"}

# whose code runs when a patch is not applied: "using <owner's> own path"
_OWNERS = {"executorch": "ExecuTorch's", "torch": "PyTorch's", "transformers": "transformers'"}

# what looking up a moved or renamed internal raises (and a ctypes symbol: AttributeError, OSError)
LOOKUP_ERRORS = (ImportError, AttributeError, OSError)


class NotApplied(Exception):
    """Raised by a patch that finds, while applying, that it cannot apply: nothing is patched yet."""


def installed(dist: str) -> str | None:
    """The installed version of distribution ``dist`` without its local label (``2.13.0+cpu`` ->
    ``2.13.0``: a build variant of the same code), or None. Tests replace this to fake an upgrade."""
    return _version(dist)


@functools.cache
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist).split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return None


def resolve(target: str):
    """The object a dotted name refers to: the longest importable module prefix, then attributes.
    Raises ImportError or AttributeError when it is gone."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            if i == 1:
                raise
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(target)


_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
_noticed: set[str] = set()  # patches whose notice this process has printed


@dataclass(frozen=True)
class Patch:
    """A replacement of third-party internals, applied only where it was verified.

    ``targets``: what it replaces; ``uses``: other private internals it reads (dotted names of both
    are looked up before applying; anything else, a C++ symbol, is looked up by ``fn`` itself).
    ``verified``: the distributions and exact versions it was checked on. ``why``: one paragraph.
    ``fn``: applies it (a context manager factory, or a function); ``plain``: what runs instead,
    with the same arguments (the upstream path)."""

    name: str
    targets: tuple[str, ...]
    uses: tuple[str, ...]
    verified: dict[str, str]
    why: str
    fn: Callable
    plain: Callable

    def blocked(self) -> str | None:
        """Why this patch does not apply here (for the notice), or None when it does; "" when the
        environment switch turned it off (no notice: it was asked for)."""
        if self.name in disabled():
            return ""
        found = {d: installed(d) for d in self.verified}
        if found != self.verified:
            differ = ", ".join(f"{d} {v or 'not installed'}" for d, v in found.items() if v != self.verified[d])
            return f"verified on {self.versions()}; found {differ}"
        for t in self.targets + self.uses:
            if _DOTTED.fullmatch(t):
                try:
                    resolve(t)
                except (ImportError, AttributeError):
                    return f"{t} not found; verified on {self.versions()}"
        return None

    def versions(self) -> str:
        return ", ".join(f"{d} {v}" for d, v in self.verified.items())

    def notice(self, reason: str) -> None:
        if reason and self.name not in _noticed:
            _noticed.add(self.name)
            owner = _OWNERS.get(next(iter(self.verified)), "the library's")
            print(f"mobizo: notice: {self.name} not applied ({reason}): using {owner} own path", file=sys.stderr)

    def __call__(self, *args, **kwargs):
        """Apply the patch (its context manager, or its function's result), or the plain upstream
        path with a notice when :meth:`blocked` or when a lookup fails while applying."""
        reason = self.blocked()
        if reason is not None:
            self.notice(reason)
            return self.plain(*args, **kwargs)
        try:
            out = self.fn(*args, **kwargs)
        except (*LOOKUP_ERRORS, NotApplied) as e:
            self.notice(_say(e))
            return self.plain(*args, **kwargs)
        if isinstance(out, contextlib.AbstractContextManager):
            return _Guarded(self, out, lambda: self.plain(*args, **kwargs))
        return out


def _say(e: BaseException) -> str:
    return str(e) if isinstance(e, NotApplied) else f"{type(e).__name__}: {e}"


class _Guarded(contextlib.AbstractContextManager):
    """A patch's context manager; a lookup that fails while it is entered (before it has replaced
    anything: every patch looks its targets up first) falls back to the plain path with the notice."""

    def __init__(self, patch: Patch, cm, plain: Callable):
        self.patch, self.cm, self.plain = patch, cm, plain

    def __enter__(self):
        try:
            return self.cm.__enter__()
        except (*LOOKUP_ERRORS, NotApplied) as e:
            self.patch.notice(_say(e))
            self.cm = self.plain()
            return self.cm.__enter__()

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)


def _no_patch(*args, **kwargs):
    return contextlib.nullcontext()


ALL: dict[str, Patch] = {}


def patch(targets, verified: dict[str, str], why: str, uses=(), plain: Callable = _no_patch):
    """Declare the decorated function (a context manager factory unless ``plain`` says otherwise) as
    the patch of that name (see :class:`Patch`)."""

    def declare(fn):
        p = Patch(fn.__name__, tuple(targets), tuple(uses), dict(verified), " ".join(why.split()), fn, plain)
        if p.name in ALL:
            raise RuntimeError(f"two patches named {p.name}")
        ALL[p.name] = p
        return p

    return declare


def disabled() -> frozenset[str]:
    """The patches ``MOBIZO_NO_PATCHES`` turns off: ``1``/``all`` every one, else a comma-separated
    list of names (``0`` or empty: none)."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in ("", "0", "no", "false"):
        return frozenset()
    if value.lower() in ("1", "all", "yes", "true"):
        return frozenset(ALL)
    names = frozenset(n.strip() for n in value.split(",") if n.strip())
    unknown = sorted(names - set(ALL))
    if unknown:
        raise MobizoError(f"{ENV} names unknown patches {unknown} (known: {', '.join(ALL)})")
    return names


def check(*names: str) -> None:
    """Decide now whether each named patch applies (printing the notices of those that do not): a
    caller with status lines on the terminal does so before the first line."""
    for n in names:
        p = ALL[n]
        p.notice(p.blocked() or "")
