"""Generation inside the training program: ``prefill`` and ``decode`` over a KV cache in mutable buffers.

Both methods run the same model as ``train_step`` (the same frozen weights in the ``.pte``, the same
``lora_B`` buffers, so a program that has trained for a few steps generates with the adapter as it is
now) and share the KV cache, one sequence of ``cache_length`` positions (the program's
``--max-length``). The cache is transformers' own ``StaticCache``, so every architecture's attention,
RoPE and masking is the model's own code:

* ``prefill(tokens (1, C) i64, start () i64, last () i64) -> logits (vocab,)`` writes the keys and values
  of C prompt tokens at positions ``start .. start+C-1`` and returns the logits after the token at
  index ``last`` of the chunk. A prompt runs in chunks of C (``Manifest.prefill_chunk``), the last one
  right-padded: a padding token's cache entry lies after every real token, so causal attention never
  reads it, and the decode step at that position overwrites it before any later position could. A chunk
  that would run past the cache (a cache length that is not a multiple of C) starts earlier instead, at
  ``cache_length - C``, and writes the entries of the tokens before it again.
  Static shapes, so the export needs no symbolic length and XNNPACK gets C-row GEMMs.
* ``decode(token (1, 1) i64, position () i64, last () i64) -> logits (vocab,)``: one token at ``position``
  (``last`` is 0: both methods are the same module traced for C and for 1 token).

Positions never written hold zeros (the runtime zero-fills planned memory) or an earlier sequence's
finite keys: the causal mask gives them weight 0, so nothing is reset between generations.
"""

from __future__ import annotations

import torch
from torch import nn

KV_PREFIX = "kv_"  # the cache buffers' names: mutable, never delegated (see export.xnnpack_partitioner)
METHODS = ("prefill", "decode")


def prefill_chunk(max_length: int) -> int:
    """Tokens per prefill call: 32 (a GEMM XNNPACK runs well) or the whole context when it is shorter."""
    return min(32, max_length)


class GenerateMethod(nn.Module):
    """``prefill`` / ``decode`` (see the module docstring): ``model`` plus its static KV cache as buffers."""

    def __init__(self, model: nn.Module, cache_length: int):
        super().__init__()
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer
        from transformers.integrations.executorch import get_head_shapes

        self.model = model  # the attribute ZOStep and ScoreMethod use: buffer names match across methods
        config = model.config.get_text_config()
        self.cache = StaticCache(max_cache_len=cache_length, config=config)
        # sliding-window and KV-sharing layers carry control flow torch.export cannot capture; a full
        # static layer with the model's own mask gives the same attention within cache_length positions
        for i, layer in enumerate(self.cache.layers):
            if type(layer) is not StaticLayer:
                self.cache.layers[i] = StaticLayer(cache_length)
        heads, head_dim = get_head_shapes(config)
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        self.cache.early_initialization(1, heads, head_dim, dtype, torch.device("cpu"))
        for i, layer in enumerate(self.cache.layers):
            self.register_buffer(f"{KV_PREFIX}key_{i}", layer.keys, persistent=False)
            self.register_buffer(f"{KV_PREFIX}value_{i}", layer.values, persistent=False)
            self.register_buffer(f"{KV_PREFIX}length_{i}", layer.cumulative_length, persistent=False)

    def forward(self, tokens, start, last):
        for i, layer in enumerate(self.cache.layers):
            # the module's buffers as this trace sees them (torch.export swaps in its own while tracing;
            # the cache object would otherwise hold the real tensors, captured as constants)
            layer.keys = getattr(self, f"{KV_PREFIX}key_{i}")
            layer.values = getattr(self, f"{KV_PREFIX}value_{i}")
            layer.cumulative_length = getattr(self, f"{KV_PREFIX}length_{i}")
            layer.cumulative_length.copy_(start)
        positions = (torch.arange(tokens.shape[1]) + start).unsqueeze(0)
        out = self.model(
            input_ids=tokens, position_ids=positions, cache=self.cache, use_cache=True, logits_to_keep=last.reshape(1)
        )
        logits = out.logits if hasattr(out, "logits") else out[0]
        # (a model that ignores logits_to_keep returns every position of the chunk)
        return (logits[0, -1] if logits.shape[1] == 1 else logits[0, last]).float()


def example_inputs(chunk: int):
    """(tokens, start, last) to trace a method that takes ``chunk`` tokens per call."""
    return torch.zeros(1, chunk, dtype=torch.long), torch.tensor(0), torch.tensor(chunk - 1)
