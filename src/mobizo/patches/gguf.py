"""transformers' GGUF metadata parsing, done once per file while mobizo loads a GGUF model."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

from .core import TRANSFORMERS, patch


@patch(
    targets=["transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint"],
    verified=TRANSFORMERS,
    why="""Loading a GGUF model reads the file's metadata (load_gguf_checkpoint(path,
    return_tensors=False): gguf's reader walks every vocabulary string, seconds for a 49k
    vocabulary) once for the tokenizer (AutoTokenizer) and again for the config (AutoConfig, and
    mobizo's own config reading). Within the load, a metadata-only call is answered from the first
    parse of that file (a deep copy, so no caller sees another's changes); a call that reads tensors
    or loads into a model goes through.""",
)
@contextlib.contextmanager
def gguf_metadata_once():
    import transformers.modeling_gguf_pytorch_utils as mod

    original, memo = mod.load_gguf_checkpoint, {}

    def cached(path, return_tensors=False, **kwargs):
        if return_tensors or kwargs.get("model_to_load") is not None:
            return original(path, return_tensors=return_tensors, **kwargs)
        key = str(Path(path).resolve())
        if key not in memo:
            memo[key] = original(path, return_tensors=False, **kwargs)
        return copy.deepcopy(memo[key])

    mod.load_gguf_checkpoint = cached
    try:
        yield
    finally:
        mod.load_gguf_checkpoint = original
