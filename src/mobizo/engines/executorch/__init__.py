"""Training inside the stock ExecuTorch runtime.

* :mod:`.manifest`: what a program was built for (``manifest.json``) and the identity checks;
* :mod:`.export`: the ZO step exported into ``train.pte`` (:func:`export_program`);
* :mod:`.runtime`: :class:`ExecuTorchEngine`, which drives the program through the ExecuTorch runtime;
* :mod:`.fo`: the first-order baseline in the runtime (benchmarks).
"""

from .export import export_program, plain_attention, xnnpack_partitioner
from .manifest import (
    MANIFEST,
    PROGRAM,
    Manifest,
    ProgramBase,
    adapter_layout,
    check_manifest,
    identity,
    manifest_for,
    read_manifest,
    versions,
)
from .runtime import ExecuTorchEngine

__all__ = [
    "MANIFEST",
    "PROGRAM",
    "ExecuTorchEngine",
    "Manifest",
    "ProgramBase",
    "adapter_layout",
    "check_manifest",
    "export_program",
    "identity",
    "manifest_for",
    "plain_attention",
    "read_manifest",
    "versions",
    "xnnpack_partitioner",
]
