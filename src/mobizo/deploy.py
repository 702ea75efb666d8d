"""Take a trained adapter to the engines people deploy: ``mobizo export-adapter``.

Three formats:

* ``lora-gguf``: a llama.cpp LoRA adapter (``llama-cli --lora``, llama-server, Ollama's ``ADAPTER``)
  for the GGUF of the base model. What llama.cpp's loader (``src/llama-adapter.cpp``) reads:
  ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha`` (the scale is
  ``alpha / r``, r read off the tensors) and ``general.architecture``, which must equal the base's;
  per adapted weight ``<gguf tensor>.weight.lora_a`` holding A (ggml shape ``[in, r]``, i.e. PEFT's
  ``(r, in)`` row-major) and ``.lora_b`` holding B (ggml ``[r, out]``). llama.cpp computes
  ``W x + scale * B (A x)`` in the base's own layout, so B's rows must be in the GGUF row order:
  Llama-family converters permute the q/k rows (rotary halves -> interleaved pairs), so the B of a
  ``q_proj``/``k_proj`` gets the same permutation (A, whose columns are the input, does not).
* ``merged-hf``: ``W + (alpha / r) B A`` folded into every adapted layer (``Conv1D`` stores W
  transposed), saved as a Hugging Face checkpoint with the tokenizer.
* ``merged-gguf``: the same merge in a GGUF base's own file: its metadata and tokenizer copied,
  every tensor dequantized, the delta added to the adapted ones in GGUF layout, and re-quantized.

The GGUF formats are limited to the architectures in :data:`LLAMA_CPP_ARCHS`, the ones whose
export was compared with llama.cpp itself (``tests/test_deploy.py``, docs/deploy.md); others are
refused with one line. Every output appears complete or not at all (a temporary sibling renamed
into place).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CONFIG, read_adapter
from .errors import MobizoError
from .fsio import atomic_write_dir, atomic_write_file, resolve_dir

FORMATS = ("lora-gguf", "merged-hf", "merged-gguf")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_OUTTYPE = {"lora-gguf": "f32", "merged-hf": "f32", "merged-gguf": "f16"}

# GGUF architectures whose export was compared with llama.cpp itself (logits and greedy tokens; llama:
# tests/test_deploy.py and SmolLM2-135M, gemma3: Gemma 3 270M, by hand: docs/deploy.md), mapped to
# whether llama.cpp's converter permutes the q/k rows of that architecture (its LlamaModel does;
# Gemma's rotary layout needs no permutation).
LLAMA_CPP_ARCHS = {"llama": True, "gemma3": False}
# Hugging Face model types that llama.cpp's convert_hf_to_gguf.py turns into one of those
# architectures: an HF-directory base for --format lora-gguf (same names and layout as the GGUF base).
HF_MODEL_TYPES = {"llama": "llama", "gemma3_text": "gemma3"}

_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # gguf.LlamaFileType: general.file_type


@dataclass
class Adapter:
    path: Path  # the adapter directory read
    run: Path | None  # the run directory it belongs to, when given one
    state: dict[str, torch.Tensor]  # "<module>.lora_A" / "<module>.lora_B"
    config: dict  # adapter_config.json
    base: str  # the base model (given, or recorded)

    @property
    def modules(self) -> list[str]:
        return sorted({k.rsplit(".", 1)[0] for k in self.state})

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def alpha(self) -> float:
        return float(self.config["lora_alpha"])

    def factors(self, module: str) -> tuple[np.ndarray, np.ndarray]:
        """(A (r, in), B (out, r)) of ``module`` as float32 arrays."""
        a, b = self.state[f"{module}.lora_A"], self.state[f"{module}.lora_B"]
        return a.detach().float().numpy(), b.detach().float().numpy()

    def delta(self, module: str) -> torch.Tensor:
        """(alpha / r) B A, shaped like an ``nn.Linear`` weight (out, in), float32."""
        a, b = self.state[f"{module}.lora_A"].float(), self.state[f"{module}.lora_B"].float()
        return (b @ a) * (self.alpha / self.rank)


# ---------------------------------------------------------------- inputs


def open_adapter(path: str | os.PathLike, model: str | None = None) -> Adapter:
    """The adapter at ``path`` (an adapter directory, or a run directory: its ``adapter/``) and its base
    model: ``model`` if given, else the adapter's ``base_model_name_or_path``, else the run's
    ``summary.json`` ``config.model``."""
    from .rundir import ADAPTER, SUMMARY

    p = Path(path)
    run = None
    if not p.exists():
        raise MobizoError(f"--adapter {p} does not exist")
    if not (p / CONFIG).is_file() and ((p / SUMMARY).is_file() or resolve_dir(p / ADAPTER) is not None):
        run, found = p, resolve_dir(p / ADAPTER)
        if found is None:
            raise MobizoError(f"run {p} has no final adapter (pass --adapter {p / 'best'} or {p / 'checkpoint'})")
        p = found
    elif (p.parent / SUMMARY).is_file():
        run = p.parent  # RUN/adapter, RUN/best, RUN/checkpoint
    state, config = read_adapter(p)
    base = model or config.get("base_model_name_or_path") or _run_model(run)
    if not base:
        raise MobizoError(f"{p / CONFIG} names no base model (base_model_name_or_path); pass --model")
    if not model and base != "tiny" and not Path(base).exists():
        raise MobizoError(
            f"the adapter's base model {base} (recorded in {p / CONFIG}) does not exist here; "
            "pass --model (a Hugging Face model directory or a .gguf file)"
        )
    return Adapter(p, run, state, config, str(base))


def _run_model(run: Path | None) -> str | None:
    from .rundir import SUMMARY

    if run is None:
        return None
    try:
        return (json.loads((run / SUMMARY).read_text(encoding="utf-8")).get("config") or {}).get("model")
    except (OSError, ValueError, AttributeError):
        return None


def check_base_identity(adapter: Adapter) -> None:
    """Refuse a base whose weights differ from the ones the run trained on, when the run recorded them
    (the base-weights sha256 of ``RUN/program/manifest.json``, written by ``--engine executorch``)."""
    from .models import TINY, weight_files
    from .rundir import PROGRAM_DIR

    if adapter.run is None or adapter.base == TINY:
        return
    manifest = adapter.run / PROGRAM_DIR / "manifest.json"
    try:
        recorded = json.loads(manifest.read_text(encoding="utf-8")).get("base_weights_sha256")
    except (OSError, ValueError, AttributeError):
        return
    if not recorded or not weight_files(adapter.base):
        return
    from .models import base_hash

    have = base_hash(adapter.base, None)
    if have != recorded:
        raise MobizoError(
            f"base model {adapter.base} is not the one run {adapter.run} trained on (its weights' sha256 "
            f"{have[:12]}... differs from {recorded[:12]}... recorded in {manifest})"
        )


def _is_gguf(path: str) -> bool:
    from .convert import is_gguf

    return Path(path).suffix.lower() == ".gguf" or is_gguf(path)


def _check_out(out: Path, overwrite: bool, directory: bool) -> None:
    if out.exists():
        if directory and not out.is_dir():
            raise MobizoError(f"--out {out} exists and is not a directory")
        if not directory and out.is_dir():
            raise MobizoError(f"--out {out} is a directory; this format writes one file")
        full = any(out.iterdir()) if out.is_dir() else out.stat().st_size > 0
        if full and not overwrite:
            raise MobizoError(f"--out {out} is not empty (use --overwrite to replace it)")


# ---------------------------------------------------------------- the base's GGUF names and shapes


@dataclass
class GGUFLayout:
    """Where each adapted module lives in llama.cpp's file of the base model."""

    arch: str
    names: dict[str, str]  # module -> GGUF tensor name (without ``.weight``)
    n_head: int
    n_head_kv: int

    def permutes(self, name: str) -> int | None:
        """The head count to permute the rows of ``name`` with, or None (not a permuted q/k weight)."""
        if not LLAMA_CPP_ARCHS[self.arch]:
            return None
        if name.endswith(".attn_q"):
            return self.n_head
        if name.endswith(".attn_k"):
            return self.n_head_kv
        return None


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for one weight (out, ...): within each head the rotary halves
    ``[x0..x(d/2-1), y0..]`` become interleaved pairs ``[x0, y0, x1, y1, ...]``."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise MobizoError(f"cannot permute {rows} rows into {n_head} heads of rotary pairs")
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_arch(arch: str, where: str) -> None:
    if arch not in LLAMA_CPP_ARCHS:
        raise MobizoError(
            f"{where}: llama.cpp export is verified for GGUF architecture {', '.join(sorted(LLAMA_CPP_ARCHS))} "
            f"only, not {arch!r} (use --format merged-hf and llama.cpp's convert_hf_to_gguf.py)"
        )


def _name_table(arch: str, n_layers: int, modules=()):
    """gguf's HF -> GGUF name map for ``arch``, with enough blocks for every layer index in ``modules``
    (an adapter for a deeper model gets its names, then fails the presence check with a clear line)."""
    import gguf

    for module in modules:
        n_layers = max(n_layers, *(int(part) + 1 for part in module.split(".") if part.isdigit()), 0)

    key = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if key is None:  # pragma: no cover - the verified archs are gguf's
        raise MobizoError(f"GGUF architecture {arch!r} is unknown to the gguf package")
    return gguf.get_tensor_name_map(key, n_layers)


def _scalar(meta: dict, key: str, where: str) -> int:
    value = meta.get(key)
    if isinstance(value, list):  # per-layer values: fine only when they are all the same
        value = value[0] if value and all(v == value[0] for v in value) else None
    if not isinstance(value, int):
        raise MobizoError(f"{where}: no usable {key} in its GGUF metadata")
    return value


def gguf_layout(adapter: Adapter) -> GGUFLayout:
    """Map the adapter's modules to the base's GGUF tensors and check they fit: every module has a
    tensor of the base file (a GGUF base) or of the checkpoint (an HF base), of A's and B's sizes."""
    if _is_gguf(adapter.base):
        return _layout_from_gguf(adapter)
    return _layout_from_hf(adapter)


def _layout_from_gguf(adapter: Adapter) -> GGUFLayout:
    from .convert import inspect_gguf

    h = inspect_gguf(adapter.base)
    arch, meta = h.architecture, h.metadata
    _check_arch(arch, adapter.base)
    n_layers = _scalar(meta, f"{arch}.block_count", adapter.base)
    n_head = _scalar(meta, f"{arch}.attention.head_count", adapter.base)
    key = f"{arch}.attention.head_count_kv"
    n_head_kv = _scalar(meta, key, adapter.base) if key in meta else n_head
    table = _name_table(arch, n_layers, adapter.modules)
    shapes = {t.name: t.shape for t in h.tensors}
    names = {}
    for module in adapter.modules:
        name = table.get_name(module)
        if name is None:
            raise MobizoError(f"adapter module {module} has no tensor in llama.cpp's {arch} layout")
        a, b = adapter.factors(module)
        have = shapes.get(f"{name}.weight")
        if have is None:
            tied = " (the output layer is tied to the token embedding in this model)" if name == "output" else ""
            raise MobizoError(
                f"adapter does not fit base model {adapter.base}: it adapts {module}, the file has no {name}.weight{tied}"
            )
        if tuple(have) != (b.shape[0], a.shape[1]):
            raise MobizoError(
                f"adapter does not fit base model {adapter.base}: {module} is {have[1]} -> {have[0]} there, "
                f"the adapter's is {a.shape[1]} -> {b.shape[0]}"
            )
        names[module] = name
    return GGUFLayout(arch, names, n_head, n_head_kv)


def _layout_from_hf(adapter: Adapter) -> GGUFLayout:
    from .models import load_skeleton

    model, _ = load_skeleton(adapter.base)
    check_fits(adapter, model)
    config = model.config
    model_type = getattr(config, "model_type", None)
    arch = HF_MODEL_TYPES.get(model_type)
    if arch is None:
        raise MobizoError(
            f"{adapter.base}: llama.cpp export is verified for model type {', '.join(sorted(HF_MODEL_TYPES))} "
            f"only, not {model_type!r} (use --format merged-hf and llama.cpp's convert_hf_to_gguf.py)"
        )
    table = _name_table(arch, config.num_hidden_layers, adapter.modules)
    names = {}
    for module in adapter.modules:
        name = table.get_name(module)
        if name is None:
            raise MobizoError(f"adapter module {module} has no tensor in llama.cpp's {arch} layout")
        if name == "output" and getattr(config, "tie_word_embeddings", False):
            raise MobizoError(
                f"adapter adapts {module}, which {adapter.base} ties to the token embedding: llama.cpp "
                "has no separate output tensor to apply it to"
            )
        names[module] = name
    n_head = config.num_attention_heads
    return GGUFLayout(arch, names, n_head, getattr(config, "num_key_value_heads", None) or n_head)


def check_fits(adapter: Adapter, model: torch.nn.Module) -> None:
    """Every adapted module is a linear layer of ``model`` with A's input and B's output sizes."""
    from .archs import layer_features

    for module in adapter.modules:
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            raise MobizoError(f"adapter does not fit base model {adapter.base}: it has no module {module}") from None
        features = layer_features(layer)
        a, b = adapter.factors(module)
        if features is None:
            raise MobizoError(f"adapter does not fit base model {adapter.base}: {module} is not a linear layer")
        if features[:2] != (a.shape[1], b.shape[0]):
            raise MobizoError(
                f"adapter does not fit base model {adapter.base}: {module} is {features[0]} -> {features[1]} "
                f"there, the adapter's is {a.shape[1]} -> {b.shape[0]}"
            )


# ---------------------------------------------------------------- tensor encoding


def out_type(shape, outtype: str, keep_f32: bool = False):
    """The ggml type a tensor of ``shape`` gets in ``outtype``, by llama.cpp's converter's rules: vectors
    (and ``keep_f32``: norms) stay F32; Q8_0 needs rows of a multiple of its block (32) and falls back
    to F16 otherwise."""
    import gguf

    T = gguf.GGMLQuantizationType
    if outtype == "f32" or len(shape) < 2 or keep_f32:
        return T.F32
    if outtype == "q8_0":
        return T.Q8_0 if shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] == 0 else T.F16
    return T.BF16 if outtype == "bf16" else T.F16


def encode(a: np.ndarray, qtype) -> np.ndarray:
    """A float32 array as the bytes (or floats) of ggml type ``qtype``."""
    import gguf

    T = gguf.GGMLQuantizationType
    a = np.ascontiguousarray(a, dtype=np.float32)
    if qtype == T.F32:
        return a
    if qtype == T.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype)


def _nbytes(shape, qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


# ---------------------------------------------------------------- writers


def write_lora_gguf(adapter: Adapter, layout: GGUFLayout, out: Path, outtype: str) -> dict:
    """The llama.cpp LoRA GGUF of ``adapter`` (see the module docstring for the format)."""
    import gguf

    def write(path: Path) -> None:
        w = gguf.GGUFWriter(str(path), layout.arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, adapter.alpha)
        w.add_name(f"{Path(adapter.base).stem} LoRA (mobizo)")
        w.add_file_type(_FILE_TYPES[outtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for module in adapter.modules:
            name = layout.names[module]
            a, b = adapter.factors(module)
            n = layout.permutes(name)
            if n is not None:
                b = permute_rows(b, n)  # B's rows are the output rows: llama.cpp's order
            for suffix, t in (("lora_a", a), ("lora_b", b)):
                qtype = out_type(t.shape, outtype)
                data = encode(t, qtype)
                w.add_tensor(f"{name}.weight.{suffix}", data, raw_shape=data.shape, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write_file(out, write)
    return {"tensors": 2 * len(adapter.modules), "arch": layout.arch}


def write_merged_hf(adapter: Adapter, out: Path, outtype: str) -> dict:
    """The base with the adapter folded in, as a Hugging Face checkpoint (config, safetensors, tokenizer)."""
    from .archs import layer_features
    from .convert import load_gguf
    from .models import TINY, _tokenizer, build_tiny, load_model

    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}.get(outtype)
    if dtype is None:
        raise MobizoError(f"--outtype {outtype} is for GGUF output; --format merged-hf writes f32, f16 or bf16")
    # the tokenizer as the base has it (load_model's copy is set up for training: pad token, left padding)
    if adapter.base == TINY:
        model, tokenizer = build_tiny()
    elif _is_gguf(adapter.base):
        model, tokenizer = load_gguf(adapter.base)
    else:
        model, _ = load_model(adapter.base)
        tokenizer = _tokenizer(Path(adapter.base), False)
    check_fits(adapter, model)
    with torch.no_grad():
        for module in adapter.modules:
            layer = model.get_submodule(module)
            delta = adapter.delta(module)
            if layer_features(layer)[2]:  # Conv1D: weight stored (in, out)
                delta = delta.T
            layer.weight.add_(delta.to(layer.weight.dtype))
    model = model.to(dtype)
    model.config.name_or_path = out.name

    def write(d: Path) -> None:
        model.save_pretrained(d, safe_serialization=True)
        tokenizer.save_pretrained(d)

    atomic_write_dir(out, write)
    return {"layers": len(adapter.modules)}


def _kv_value(field, gguf):
    """(value, type, sub type) of a metadata field as ``GGUFWriter.add_key_value`` takes it; strings
    as raw bytes (a vocabulary may hold byte sequences that are not valid UTF-8)."""
    V = gguf.GGUFValueType
    kind = field.types[0]
    if kind == V.ARRAY:
        sub = field.types[-1]
        if len(field.types) != 2:
            raise MobizoError(f"metadata {field.name}: nested arrays are not supported")
        if sub == V.STRING:
            return [bytes(field.parts[i]) for i in field.data], kind, sub
        return [field.parts[i].tolist()[0] for i in field.data], kind, sub
    if kind == V.STRING:
        return bytes(field.parts[-1]), kind, None
    return field.parts[-1].tolist()[0], kind, None


def write_merged_gguf(adapter: Adapter, layout: GGUFLayout, out: Path, outtype: str) -> dict:
    """The GGUF base with the adapter merged: metadata and tokenizer copied from the base file, every
    tensor dequantized, ``(alpha/r) B A`` (B's rows in the file's order) added to the adapted weights,
    re-encoded in ``outtype`` (norms and vectors F32). Streams one tensor at a time."""
    import gguf

    reader = gguf.GGUFReader(adapter.base)
    merged = {f"{name}.weight": module for module, name in layout.names.items()}
    skip = {"general.architecture", "general.file_type", "general.alignment", "general.quantization_version"}

    def write(path: Path) -> None:
        w = gguf.GGUFWriter(str(path), layout.arch)
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key in skip:
                continue
            w.add_key_value(key, *_kv_value(field, gguf))
        if "general.alignment" in reader.fields:
            w.add_custom_alignment(int(reader.fields["general.alignment"].contents()))
        w.add_file_type(_FILE_TYPES[outtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        plan = []
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape))  # torch order
            qtype = out_type(shape, outtype, keep_f32=t.name.endswith("_norm.weight"))
            plan.append((t, shape, qtype))
            w.add_tensor_info(t.name, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t, shape, qtype in plan:
            x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(shape)
            module = merged.get(t.name)
            if module is not None:
                a, b = adapter.factors(module)
                n = layout.permutes(layout.names[module])
                if n is not None:
                    b = permute_rows(b, n)
                x = x + (adapter.alpha / adapter.rank) * (b @ a)
            w.write_tensor_data(encode(x, qtype))
        w.close()

    atomic_write_file(out, write)
    return {"tensors": len(reader.tensors), "merged": len(merged), "arch": layout.arch}


# ---------------------------------------------------------------- entry point


def export_adapter(
    adapter: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike,
    model: str | None = None,
    outtype: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Write ``adapter`` (an adapter or run directory) in ``fmt`` (:data:`FORMATS`) to ``out``.

    ``model``: the base (a Hugging Face directory, a ``.gguf`` file or ``tiny``; default: the one the
    adapter records). ``outtype``: :data:`OUTTYPES` (default per format: :data:`DEFAULT_OUTTYPE`).
    Returns what was written (format, base, out, tensor type, counts)."""
    if fmt not in FORMATS:
        raise MobizoError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    outtype = outtype or DEFAULT_OUTTYPE[fmt]
    if outtype not in OUTTYPES:
        raise MobizoError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    if fmt == "merged-hf" and outtype == "q8_0":
        raise MobizoError("--outtype q8_0 is for GGUF output; --format merged-hf writes f32, f16 or bf16")
    out = Path(out)
    _check_out(out, overwrite, directory=fmt == "merged-hf")
    a = open_adapter(adapter, model)
    if fmt == "merged-gguf" and not _is_gguf(a.base):
        raise MobizoError(
            f"--format merged-gguf needs a .gguf base, {a.base} is not one (use --format merged-hf, then "
            "llama.cpp's convert_hf_to_gguf.py)"
        )
    check_base_identity(a)
    if fmt == "merged-hf":
        info = write_merged_hf(a, out, outtype)
    else:
        layout = gguf_layout(a)
        if fmt == "lora-gguf":
            info = write_lora_gguf(a, layout, out, outtype)
        else:
            info = write_merged_gguf(a, layout, out, outtype)
    return {"format": fmt, "base": a.base, "adapter": str(a.path), "out": str(out), "outtype": outtype, **info}


# ---------------------------------------------------------------- re-pointing an adapter at a converted base


def repoint_adapters(adapters, gguf_path: str | os.PathLike, hf_dir: str | os.PathLike) -> list[Path]:
    """Check that each adapter fits ``gguf_path`` (before anything is written), for
    :func:`set_adapter_base` once ``hf_dir`` holds the converted checkpoint."""
    found = []
    for path in adapters:
        a = open_adapter(path, str(gguf_path))
        recorded = a.config.get("base_model_name_or_path")
        if recorded and Path(recorded).exists() and Path(recorded).resolve() != Path(gguf_path).resolve():
            raise MobizoError(
                f"adapter {a.path} was trained on {recorded}, not {gguf_path}: it is not re-pointed at {hf_dir}"
            )
        _layout_check_any(a)
        found.append(a.path)
    return found


def _layout_check_any(adapter: Adapter) -> None:
    """Names and shapes against the GGUF's model (any architecture transformers reads)."""
    from .models import load_skeleton

    model, _ = load_skeleton(adapter.base)
    check_fits(adapter, model)


def set_adapter_base(adapter_dir: Path, base: Path) -> None:
    """Rewrite ``base_model_name_or_path`` in ``adapter_dir``'s adapter_config.json (atomically), so that
    ``peft.AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` loads ``base``."""
    from .fsio import atomic_write_text

    path = Path(adapter_dir) / CONFIG
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(Path(base).resolve())
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True))
