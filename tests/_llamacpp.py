"""llama.cpp itself (through llama-cpp-python's bindings of llama.h), fed token ids directly: the logits
of every position, and greedy continuations. The reference the deploy tests compare mobizo with.

The bindings' low-level API rather than ``llama_cpp.Llama``: the model is loaded without the CPU's
extra buffer types (``use_extra_bufts = false``, llama.cpp's ``--no-repack``). With them, a Q8_0 or Q4_1
matmul crashed (SIGSEGV) on the development machine (a Xeon with AMX-INT8) for any file, llama.cpp's
own quantizations and the unmodified SmolLM2 Q4_1 included; without them llama.cpp runs its
reference CPU kernels for every type. The KV cache is F32 and flash attention off: llama.cpp's
default F16 cache, or its CPU flash-attention kernel (F16 inside), alone moves the tiny model's logits
by ~3e-4, a thousand times what everything else does.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

_QUIET = None  # the no-op log callback (kept alive: llama.cpp holds a pointer to it)


class LlamaCpp:
    """A llama.cpp model (plus, optionally, LoRA adapters at scale 1) on one CPU thread."""

    def __init__(self, model: str | Path, loras=(), n_ctx: int = 256, threads: int = 1):
        import llama_cpp as lc

        global _QUIET
        self.lc = lc
        if _QUIET is None:
            _QUIET = lc.llama_log_callback(lambda level, text, user: None)
            lc.llama_log_set(_QUIET, ctypes.c_void_p(0))
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        mp.use_extra_bufts = False
        self.model = lc.llama_model_load_from_file(str(model).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp cannot load {model}")
        cp = lc.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.n_threads = cp.n_threads_batch = threads
        cp.type_k = cp.type_v = lc.GGML_TYPE_F32
        cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED  # "auto" picks the CPU flash kernel: F16 inside
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp cannot make a context for {model}")
        self.n_ctx = n_ctx
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.adapters = []
        for path in loras:
            adapter = lc.llama_adapter_lora_init(self.model, str(path).encode())
            if not adapter:
                raise RuntimeError(f"llama.cpp cannot load the LoRA adapter {path} on {model}")
            self.adapters.append(adapter)
        if self.adapters:
            n = len(self.adapters)
            arr = (lc.llama_adapter_lora_p_ctypes * n)(*self.adapters)
            scales = (ctypes.c_float * n)(*([1.0] * n))
            if lc.llama_set_adapters_lora(self.ctx, arr, n, scales) != 0:
                raise RuntimeError("llama.cpp refused to set the LoRA adapters")

    def close(self) -> None:
        lc = self.lc
        for a in self.adapters:
            lc.llama_adapter_lora_free(a)
        self.adapters = []
        if self.ctx:
            lc.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            lc.llama_model_free(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _decode(self, ids, start: int) -> np.ndarray:
        """Append ``ids`` at position ``start`` of sequence 0; the logits of every one of them."""
        lc = self.lc
        n = len(ids)
        batch = lc.llama_batch_init(n, 0, 1)
        try:
            batch.n_tokens = n
            for i, t in enumerate(ids):
                batch.token[i] = int(t)
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            if lc.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            ptr = lc.llama_get_logits(self.ctx)
            return np.ctypeslib.as_array(ptr, shape=(n * self.n_vocab,)).reshape(n, self.n_vocab).copy()
        finally:
            lc.llama_batch_free(batch)

    def logits(self, ids) -> np.ndarray:
        """(len(ids), vocab) logits of a fresh sequence ``ids`` (one batch, every position output)."""
        assert len(ids) <= self.n_ctx
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        return self._decode(ids, 0)

    def greedy(self, ids, n: int) -> list[int]:
        """The ``n`` tokens greedy decoding appends to ``ids`` (the prompt in one batch, then one at a time
        over the KV cache, as llama.cpp generates)."""
        last = self.logits(ids)[-1]
        out = []
        for _ in range(n):
            t = int(np.argmax(last))
            out.append(t)
            last = self._decode([t], len(ids) + len(out) - 1)[-1]
        return out
