"""Intra-op threads for PyTorch and the ExecuTorch runtime (``--threads``).

The default is the number of *physical* cores this process may run on: the CPU affinity mask
(containers and ``taskset`` narrow it), divided by the SMT siblings per core (a GEMM gains little
from a core's second hardware thread and loses to the contention), and ``OMP_NUM_THREADS`` when
the user set it. On a machine that other jobs share, fewer threads than cores are often faster
(threads that wait on each other at every barrier): pass ``--threads`` explicitly there.
"""

from __future__ import annotations

import contextlib
import os

from .errors import MobizoError


def allowed_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _smt_per_core() -> int:
    try:
        import psutil

        logical, physical = psutil.cpu_count(logical=True), psutil.cpu_count(logical=False)
    except Exception:  # noqa: BLE001 - psutil missing or unable to tell
        return 1
    if not logical or not physical or physical > logical:
        return 1
    return max(1, logical // physical)


def default_threads() -> int:
    """A sensible intra-op thread count for this process (see the module docstring)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, allowed_cpus() // _smt_per_core())


def apply_threads(threads: int | None = None, runtime: bool = True) -> int:
    """Use ``threads`` (``None``: :func:`default_threads`) intra-op threads in PyTorch and (``runtime``) in
    the ExecuTorch runtime's threadpool (XNNPACK); returns the number used. ``runtime=False`` leaves the
    runtime unloaded (an eager run never pays for it)."""
    n = default_threads() if threads is None else threads
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise MobizoError(f"--threads must be an integer >= 1, got {threads}")
    import torch

    torch.set_num_threads(n)
    if not runtime:
        return n
    from .util import quiet_stderr

    # the runtime's cpuinfo probes print on first import; no ExecuTorch runtime: PyTorch's setting is what counts
    with contextlib.suppress(Exception), quiet_stderr():
        from executorch.extension.pybindings import _C as portable_lib  # (not portable_lib: it imports all of exir)

        if portable_lib._threadpool_get_thread_count() != n:
            portable_lib._unsafe_reset_threadpool(n)
    return n
