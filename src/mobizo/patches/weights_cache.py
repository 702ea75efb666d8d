"""XNNPACK's weights cache, turned on in the pip wheel's runtime through a C++ call the Python
bindings do not expose (``executorch::runtime::set_option``), reached with ``ctypes``."""

from __future__ import annotations

import ctypes
from pathlib import Path

from .core import EXECUTORCH, NotApplied, patch

# executorch::runtime::set_option / get_option(const char* backend, Span<BackendOption>), mangled
_SYMBOL = "_ZN10executorch7runtime10{}_optionEPKcNS0_4SpanINS0_13BackendOptionEEE"

_SHARED = False  # set once the backend has said the cache is on (it stays on for the process)


class _BackendOption(ctypes.Structure):
    """``executorch::runtime::BackendOption`` (runtime/backend/options.h): ``char key[64]`` then
    ``std::variant<bool, int, std::array<char, 256>>`` (256-byte storage, then its index byte)."""

    _fields_ = [
        ("key", ctypes.c_char * 64),
        ("value", ctypes.c_ubyte * 256),
        ("index", ctypes.c_ubyte),
        ("pad", ctypes.c_ubyte * 3),
    ]


@patch(
    targets=["libexecutorch.so: executorch::runtime::set_option, get_option (BackendOption layout)"],
    verified=EXECUTORCH,
    plain=lambda: False,
    why="""Every method of train.pte (train_step, score) has its own XNNPACK delegates, and each
    delegate packs the weights it reads into its own buffers at load time, so loading score next to
    train_step held the packed base weights twice. XNNPACK's weights cache, keyed by the constants'
    names (the sha256 of their bytes), lets every delegate in the process use one packed copy; the
    pip wheel builds it but leaves it off, and the Python bindings have no call for backend options.
    The runtime's public C++ call is reached through ctypes by its mangled name, with a hand-copied
    BackendOption layout (a std::variant), and the option is read back to confirm it took.""",
)
def share_packed_weights() -> bool:
    """Turn on XNNPACK's weights cache for this process (before any method loads); True when the
    backend reports it on. Not applied: False, and each method's delegates pack their own copies."""
    global _SHARED
    if _SHARED:
        return True
    import executorch.extension.pybindings._C as C

    lib = ctypes.CDLL(str(Path(C.__file__).resolve().parents[2] / "lib" / "libexecutorch.so"))
    calls = {}
    for name in ("set", "get"):
        fn = getattr(lib, _SYMBOL.format(name))
        # the Span (pointer, length) is passed by value in two registers
        fn.argtypes, fn.restype = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_uint32
        calls[name] = fn
    if ctypes.sizeof(_BackendOption) != 324:
        raise NotApplied(f"BackendOption is {ctypes.sizeof(_BackendOption)} bytes here, not 324")
    on = _BackendOption(key=b"weight_cache_enabled", index=0)  # variant index 0: bool
    on.value[0] = 1
    if calls["set"](b"XnnpackBackend", ctypes.byref(on), 1) != 0:
        raise NotApplied("XnnpackBackend refused weight_cache_enabled")
    back = _BackendOption(key=b"weight_cache_enabled", index=0)
    if calls["get"](b"XnnpackBackend", ctypes.byref(back), 1) != 0 or back.index != 0 or back.value[0] != 1:
        raise NotApplied("XnnpackBackend does not report weight_cache_enabled on")
    _SHARED = True
    return True
