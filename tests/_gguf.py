"""A GGUF writer for the tests: a transformers Llama and its byte-level BPE tokenizer written as llama.cpp's
convert_hf_to_gguf writes them (its tensor names, the q/k permutation), so that mobizo's GGUF reader is
checked on files it did not write. A plain module (conftest holds fixtures only) that test_gguf,
test_quantize, test_patches and test_deploy import."""

from __future__ import annotations

import json

import numpy as np


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf ``LlamaModel.permute`` (rotary halves -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, tokenizer, path, qtype="F32", arch="llama", drop=(), raw_types=None, unused_tokens=0):
    """Write ``model`` (a transformers Llama) and its byte-level BPE ``tokenizer`` as llama.cpp does.
    ``unused_tokens``: that many more vocabulary entries no merge reaches (a large vocabulary's metadata)."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("mobizo tiny")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(0)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tokens += [f"<unused{i}>" for i in range(unused_tokens)]
    specials = {t["content"] for t in spec["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_add_bos_token(True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for key, t in model.state_dict().items():
        base, suffix = key.rsplit(".", 1)
        name = names.get_name(base) + "." + suffix
        if name in drop:
            continue
        a = t.detach().float().numpy()
        if name.endswith("attn_q.weight"):
            a = _permute(a, c.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            a = _permute(a, c.num_key_value_heads)
        kind = (raw_types or {}).get(name, qtype if a.ndim == 2 else "F32")
        if kind == "F32":
            w.add_tensor(name, np.ascontiguousarray(a))
        elif kind == "F16":
            w.add_tensor(name, a.astype(np.float16))
        else:
            q = gguf.GGMLQuantizationType[kind]
            if q in gguf.quants._type_traits:
                data = gguf.quants.quantize(a, q)
            else:  # a type gguf cannot (de)quantize: right-sized garbage bytes
                block, size = gguf.GGML_QUANT_SIZES[q]
                data = np.zeros((*a.shape[:-1], a.shape[-1] // block * size), dtype=np.uint8)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
