"""Every replacement of a third-party internal (ExecuTorch, PyTorch, transformers) that mobizo makes.

Each is a declared :class:`Patch`: the internals it replaces (``targets``), the exact versions it
was verified on (``verified``), why it exists (``why``) and the function that applies it. Calling a
patch applies it only when the installed versions are the verified ones (a local label such as
``+cpu`` aside) and its targets are still there; otherwise it prints one notice line per process on
stderr (``mobizo: notice: <name> not applied (...): using ExecuTorch's own path``) and takes the
plain upstream path: the same program or result, only slower or larger. ``MOBIZO_NO_PATCHES=1``
turns every patch off (``MOBIZO_NO_PATCHES=name,name`` only those), silently.

docs/upstream.md lists them all, with what each saves and the upstream change that would retire it.

    with patches.lean_provenance(), patches.spilled_named_data(directory):
        ...
"""

from . import gguf, lowering, weights_cache
from .core import ALL, ENV, Patch, check, disabled, installed
from .gguf import gguf_metadata_once
from .lowering import (
    fewer_decompositions,
    lean_edge_passes,
    lean_provenance,
    lean_xnnpack_passes,
    parallel_preprocess,
    quick_delegate_shapes,
    quick_merge_check,
    quick_partitioning,
    spilled_named_data,
)
from .weights_cache import share_packed_weights

__all__ = [
    "ALL",
    "ENV",
    "Patch",
    "check",
    "disabled",
    "fewer_decompositions",
    "gguf",
    "gguf_metadata_once",
    "installed",
    "lean_edge_passes",
    "lean_provenance",
    "lean_xnnpack_passes",
    "lowering",
    "parallel_preprocess",
    "quick_delegate_shapes",
    "quick_merge_check",
    "quick_partitioning",
    "share_packed_weights",
    "spilled_named_data",
    "weights_cache",
]
