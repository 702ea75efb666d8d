"""GGUF in, Hugging Face out: load a llama.cpp ``.gguf`` file as a float PyTorch model, or convert it.

* :func:`inspect_gguf` reads a file's header (metadata, tensor table) without touching tensor data
  and refuses, with one line, what cannot be loaded: not a GGUF file, a truncated file, an
  architecture transformers cannot map, a tensor type the ``gguf`` package cannot dequantize.
* :func:`load_gguf` builds the model from the file's config and streams the tensors in: each is
  dequantized from the memory-mapped file, turned into transformers' layout (llama.cpp permutes
  the q/k rows of Llama-family attention) and copied into the model's uninitialised parameter, so
  the weights exist once in RAM (plus one tensor in flight). The result is an ordinary float model
  with no quantization config: ``save_pretrained`` works and MP-LoRA wraps its ``nn.Linear`` layers.
* :func:`convert_gguf` writes a local Hugging Face checkpoint (``config.json``, ``*.safetensors``,
  tokenizer files) that ``transformers`` and ``peft`` load; adapters trained on the GGUF model
  (their module names are transformers') load on it unchanged.

The name and layout mapping is transformers' own (``modeling_gguf_pytorch_utils``: the GGUF
loader of ``from_pretrained(..., gguf_file=...)``). Architectures only transformers' newer
packed-GGUF path knows are loaded through ``from_pretrained`` and dequantized there.
"""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import patches
from .errors import MobizoError

GGUF_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
# fixed-size metadata value types: id -> struct format
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_CHUNK = 1 << 22  # elements: tensors larger than this are dequantized in slabs of rows


@dataclass
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (ggml stores dims fastest-first)
    qtype: int
    offset: int  # from the start of the data section


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict  # string arrays (vocabularies, merges) are replaced by their length
    tensors: list[GGUFTensorInfo] = field(default_factory=list)
    data_start: int = 0

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def qtype_names(self) -> dict[str, int]:
        """{type name: number of tensors}."""
        import gguf

        out: dict[str, int] = {}
        for t in self.tensors:
            name = _qtype_name(t.qtype, gguf)
            out[name] = out.get(name, 0) + 1
        return out


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that should be read as GGUF (its magic bytes, or a ``.gguf`` name)."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _qtype_name(qtype: int, gguf) -> str:
    try:
        return gguf.GGMLQuantizationType(qtype).name
    except ValueError:
        return f"type {qtype}"


def _read_header(path: Path) -> GGUFHeader:
    try:
        blob = np.memmap(path, mode="r", dtype=np.uint8)
    except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
        raise MobizoError(f"{path} is not a GGUF file ({e})") from e
    if blob.shape[0] < 24 or bytes(blob[:4]) != GGUF_MAGIC:
        raise MobizoError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", blob, 4)
        if version not in _VERSIONS:
            raise MobizoError(f"{path} is GGUF version {version}; mobizo reads versions 2 and 3")
        pos = 24

        def string(pos):
            (n,) = struct.unpack_from("<Q", blob, pos)
            if pos + 8 + n > blob.shape[0]:
                raise struct.error("string runs past the end of the file")
            return bytes(blob[pos + 8 : pos + 8 + n]).decode("utf-8"), pos + 8 + n

        def value(pos, vtype):
            if vtype in _SCALARS:
                fmt = _SCALARS[vtype]
                return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)
            if vtype == _STRING:
                return string(pos)
            if vtype == _ARRAY:
                etype, count = struct.unpack_from("<IQ", blob, pos)
                pos += 12
                if etype in _SCALARS:
                    width = struct.calcsize(_SCALARS[etype])
                    if count <= 64:
                        vals = list(struct.unpack_from(f"<{count}{_SCALARS[etype][1]}", blob, pos))
                        return vals, pos + count * width
                    return count, pos + count * width
                if etype == _STRING:
                    for _ in range(count):
                        (n,) = struct.unpack_from("<Q", blob, pos)
                        pos += 8 + n
                    return count, pos
                raise MobizoError(f"{path}: unsupported GGUF metadata array of type {etype}")
            raise MobizoError(f"{path}: unsupported GGUF metadata value type {vtype}")

        metadata = {}
        for _ in range(n_kv):
            key, pos = string(pos)
            (vtype,) = struct.unpack_from("<I", blob, pos)
            metadata[key], pos = value(pos + 4, vtype)
        tensors = []
        for _ in range(n_tensors):
            name, pos = string(pos)
            (ndim,) = struct.unpack_from("<I", blob, pos)
            dims = struct.unpack_from(f"<{ndim}Q", blob, pos + 4)
            qtype, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * ndim)
            pos += 4 + 8 * ndim + 12
            tensors.append(GGUFTensorInfo(name, tuple(int(d) for d in reversed(dims)), int(qtype), int(offset)))
    except (struct.error, UnicodeDecodeError) as e:
        raise MobizoError(f"{path} is truncated or corrupted (cannot read its GGUF header: {e})") from e
    align = int(metadata.get("general.alignment", 32))
    return GGUFHeader(path, version, metadata, tensors, (pos + align - 1) // align * align)


def _dequantizable(qtype: int, gguf) -> bool:
    from gguf.quants import _type_traits  # the types gguf.dequantize implements (besides F32/F16)

    T = gguf.GGMLQuantizationType
    return qtype in (T.F32, T.F16, T.F64) or qtype in _type_traits


def _nbytes(info: GGUFTensorInfo, gguf) -> int:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(info.qtype)]
    n = int(np.prod(info.shape)) if info.shape else 1
    return n // block * size


def _legacy_archs() -> set[str]:
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:
        return set()
    return set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}


def _packed_archs() -> set[str]:
    try:
        from transformers.integrations.gguf import GGUF_ARCHS
    except ImportError:
        return set()
    return set(GGUF_ARCHS)


def inspect_gguf(path: str | os.PathLike) -> GGUFHeader:
    """The header of a GGUF file, checked: one :class:`MobizoError` line for anything mobizo cannot load."""
    import gguf
    import transformers

    p = Path(path)
    if not p.exists():
        raise MobizoError(f"GGUF file {path} does not exist")
    if not p.is_file():
        raise MobizoError(f"{path} is not a file")
    h = _read_header(p)
    arch = h.architecture
    if not arch:
        raise MobizoError(f"{path} has no general.architecture in its GGUF metadata")
    supported = _legacy_archs() | _packed_archs()
    # llama.cpp names some architectures differently from the loader's table
    if arch not in supported and not (arch.startswith("t5") and "t5" in supported):
        raise MobizoError(
            f"{path}: GGUF architecture {arch!r} is not one transformers {transformers.__version__} can read "
            f"(it reads: {', '.join(sorted(supported))})"
        )
    size = p.stat().st_size
    for t in h.tensors:
        try:
            qt = gguf.GGMLQuantizationType(t.qtype)
        except ValueError:
            raise MobizoError(f"{path}: tensor {t.name} has an unknown ggml type {t.qtype}") from None
        if not _dequantizable(t.qtype, gguf):
            raise MobizoError(
                f"{path}: tensor {t.name} is stored as {qt.name}, which the gguf package "
                f"({_version('gguf')}) cannot dequantize; re-quantize the model (e.g. Q8_0, Q4_K_M or F16)"
            )
        if h.data_start + t.offset + _nbytes(t, gguf) > size:
            raise MobizoError(f"{path} is truncated (tensor {t.name} runs past the end of the file)")
    return h


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _tensor_data(blob: np.ndarray, h: GGUFHeader, info: GGUFTensorInfo, gguf) -> np.ndarray:
    """The raw tensor as gguf.dequantize wants it: floats for F32/F16/F64, byte rows for blocks."""
    start = h.data_start + info.offset
    raw = blob[start : start + _nbytes(info, gguf)]
    T = gguf.GGMLQuantizationType
    shape = info.shape or (1,)
    if info.qtype == T.F32:
        return raw.view(np.float32).reshape(shape)
    if info.qtype == T.F16:
        return raw.view(np.float16).reshape(shape)
    if info.qtype == T.F64:
        return raw.view(np.float64).reshape(shape)
    block, size = gguf.GGML_QUANT_SIZES[T(info.qtype)]
    return raw.reshape(*shape[:-1], shape[-1] // block * size)


def _load_tokenizer(p: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            str(p.parent), gguf_file=p.name, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as e:  # any loader failure is a bad file
        raise MobizoError(f"cannot build the tokenizer of {p}: {type(e).__name__}: {_first_line(e)}") from e
    return tok


def _load_config(p: Path):
    import transformers.modeling_gguf_pytorch_utils as mod
    from transformers import AutoConfig

    parsed = mod.load_gguf_checkpoint(str(p), return_tensors=False)
    cfg = dict(parsed["config"])
    cfg.pop("_model_name_or_path", None)
    model_type = cfg.pop("model_type")
    return AutoConfig.for_model(model_type, **cfg), parsed["config"]


def load_gguf(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, before_weights=None
):
    """(model, tokenizer) from a GGUF file: float weights in ``dtype``, loaded once (see module docstring).
    ``before_weights(config, weight_bytes, tokenizer)``: called before any tensor is read
    (:func:`mobizo.models.load_model`)."""
    import gguf

    p = Path(path)
    h = inspect_gguf(p)
    streaming = h.architecture in _legacy_archs()
    with patches.gguf_metadata_once():  # the metadata is parsed once for tokenizer and config
        tokenizer = _load_tokenizer(p, trust_remote_code)
        if streaming:
            config, raw_config = _config_of(p, h, raw=True)
        if before_weights is not None:
            numel = sum(int(np.prod(t.shape)) if t.shape else 1 for t in h.tensors)
            hook_config = config if streaming else _config_of(p, h, trust_remote_code)
            before_weights(hook_config, numel * dtype.itemsize, tokenizer)
        if not streaming:
            model = _load_packed(p, dtype, trust_remote_code)
    # The parsed metadata (a 262k-token vocabulary's strings, scores and merges: ~130 MiB for Gemma 3) is
    # let go before the weights arrive: kept, it raised the load's peak above the loaded model's footprint.
    _trim_heap()
    if streaming:
        model = _load_streaming(p, h, dtype, gguf, config, raw_config)
        _trim_heap()  # the dequantizer's temporaries
    model.config.name_or_path = str(p.resolve())
    return model.eval(), tokenizer


def _config_of(p: Path, h: GGUFHeader, trust_remote_code: bool = False, raw: bool = False):
    """The transformers config of a GGUF file (call it inside :func:`mobizo.patches.gguf_metadata_once`); ``raw``
    (streamed architectures): (config, the config dict transformers' tensor processors take)."""
    from transformers import AutoConfig

    try:
        if h.architecture in _legacy_archs():
            config, raw_config = _load_config(p)
        else:
            config = AutoConfig.from_pretrained(
                str(p.parent), gguf_file=p.name, local_files_only=True, trust_remote_code=trust_remote_code
            )
    except Exception as e:
        raise MobizoError(f"cannot read the model config of {p}: {type(e).__name__}: {_first_line(e)}") from e
    config.name_or_path = str(p.resolve())
    return (config, raw_config) if raw else config


def load_gguf_skeleton(path: str | os.PathLike, trust_remote_code: bool = False):
    """(model on the meta device, tokenizer) of a GGUF file: config and tokenizer only, no tensor read
    (see :func:`mobizo.models.load_skeleton`)."""
    from transformers import AutoModelForCausalLM

    p = Path(path)
    h = inspect_gguf(p)
    with patches.gguf_metadata_once():  # the metadata is parsed once for tokenizer and config
        tokenizer = _load_tokenizer(p, trust_remote_code)
        config = _config_of(p, h, trust_remote_code)
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except Exception as e:
            raise MobizoError(f"cannot build the model of {p}: {type(e).__name__}: {_first_line(e)}") from e
    model.config.name_or_path = str(p.resolve())
    return model.eval(), tokenizer


def _load_streaming(p: Path, h: GGUFHeader, dtype: torch.dtype, gguf, config, raw_config: dict):
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    try:
        with no_init_weights():  # parameters are allocated, not initialised: each page is written once, below
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as e:
        raise MobizoError(
            f"{p}: transformers cannot build a causal LM for GGUF architecture {h.architecture!r}: "
            f"{type(e).__name__}: {_first_line(e)}"
        ) from e
    processor = TENSOR_PROCESSORS.get(h.architecture, TensorProcessor)(config=raw_config)
    mapping = _weights_map(model, processor, h.architecture, gguf)
    targets = dict(model.state_dict(keep_vars=True))
    blob = np.memmap(p, mode="r", dtype=np.uint8)
    parsed: dict = {"tensors": {}, "config": raw_config}
    written: set[str] = set()

    def put(name: str, value) -> None:
        if isinstance(value, np.ndarray):
            with warnings.catch_warnings():  # a view of the read-only map: only read, by copy_ below
                warnings.simplefilter("ignore")
                t = torch.from_numpy(np.ascontiguousarray(value))
        else:
            t = value
        target = targets[name]
        if tuple(t.shape) != tuple(target.shape):
            if t.numel() != target.numel():
                raise MobizoError(
                    f"{p}: tensor for {name} has shape {tuple(t.shape)}, the model needs {tuple(target.shape)}"
                )
            t = t.reshape(target.shape)
        with torch.no_grad():
            target.copy_(t)
        written.add(name)

    plain = type(processor).process is TensorProcessor.process  # a processor that renames/permutes nothing

    def put_rows(name: str, start: int, rows: np.ndarray) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = torch.from_numpy(np.ascontiguousarray(rows))
        with torch.no_grad():
            targets[name][start : start + t.shape[0]].copy_(t)

    def unchanged(name: str, weights: np.ndarray) -> bool:
        """Whether the architecture's processor passes tensor ``name`` through as it is (Gemma's subtracts 1
        from norm weights, Llama's permutes q/k rows; their embeddings pass): asked on a slab of it, with
        scratch state, so a processor that assembles tensors itself (MoE experts) is left untouched."""
        if plain:
            return True
        scratch = {"tensors": {}, "config": raw_config}
        try:
            r = processor.process(weights=weights, name=name, tensor_key_mapping=mapping, parsed_parameters=scratch)
        except Exception:  # noqa: BLE001 - the whole-tensor path below reports what is wrong
            return False
        return r.name == name and r.weights is weights and not scratch["tensors"]

    n_done = 0
    for info in h.tensors:
        qtype = gguf.GGMLQuantizationType(info.qtype)
        target = targets.get(mapping.get(info.name, ""))
        if (
            target is not None
            and len(info.shape) == 2
            and tuple(target.shape) == info.shape
            and target.numel() > _CHUNK
        ):
            # a big tensor (the embedding: 262144 x 640 in Gemma 3): dequantize a slab of rows at a time
            # straight into the model, never the whole float tensor plus the dequantizer's temporaries at
            # once (a second copy of the embedding, and more), when the processor leaves it as it is
            data = _tensor_data(blob, h, info, gguf)
            step = max(1, _CHUNK // info.shape[1])
            first = gguf.dequantize(data[:step], qtype)
            if unchanged(info.name, first):
                put_rows(mapping[info.name], 0, first)
                del first
                for i in range(step, info.shape[0], step):
                    put_rows(mapping[info.name], i, gguf.dequantize(data[i : i + step], qtype))
                written.add(mapping[info.name])
                _drop_pages(blob, h.data_start + info.offset, _nbytes(info, gguf))
                continue
            del first
        try:
            weights = gguf.dequantize(_tensor_data(blob, h, info, gguf), qtype)
        except NotImplementedError as e:
            raise MobizoError(f"{p}: cannot dequantize tensor {info.name}: {e}") from e
        result = processor.process(
            weights=weights, name=info.name, tensor_key_mapping=mapping, parsed_parameters=parsed
        )
        if result.name in mapping and mapping[result.name] in targets:
            put(mapping[result.name], result.weights)
        for name in list(parsed["tensors"]):  # processors that assemble tensors themselves (MoE experts)
            put(name, parsed["tensors"].pop(name))
        del weights, result
        _drop_pages(blob, h.data_start + info.offset, _nbytes(info, gguf))
        n_done += 1
        if n_done % 8 == 0:
            _trim_heap(collect=False)  # glibc keeps freed dequantizer temporaries: hand them back as we go
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    # every parameter and persistent buffer must have come from the file (tied ones share storage)
    seen = {targets[n].data_ptr() for n in written}
    missing = [n for n, t in model.state_dict().items() if n not in written and t.data_ptr() not in seen]
    if missing:
        raise MobizoError(
            f"{p}: the file has no tensor for {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return model


def _weights_map(model, processor, arch_name: str, gguf) -> dict[str, str]:
    """{GGUF tensor name: transformers state-dict key}: transformers' ``get_gguf_hf_weights_map`` (a
    parameter is looked up under its full name, then under each shorter suffix, as that function's
    recursion over submodules does), with gguf's name table built once instead of once per module."""
    arch = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name), None)
    if arch is None:
        raise MobizoError(f"GGUF architecture {arch_name!r} is unknown to the gguf package {_version('gguf')}")
    table = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    out: dict[str, str] = {}
    for key in model.state_dict():
        parts = processor.preprocess_name(key).split(".")
        for i in range(len(parts)):
            hf_name = ".".join(parts[i:])
            name, suffix = hf_name, ""
            if hf_name.endswith((".weight", ".bias")):
                name, suffix = hf_name.rsplit(".", 1)
                suffix = "." + suffix
            gguf_name = table.get_name(name)
            if gguf_name is None:
                processor.perform_fallback_tensor_mapping(out, suffix, ".".join(parts[:i]) + "." * bool(i), hf_name)
                continue
            out.setdefault(gguf_name + suffix, ".".join(parts[:i] + [hf_name]) if i else hf_name)
            break
    return out


def _load_packed(p: Path, dtype: torch.dtype, trust_remote_code: bool):
    """Architectures only transformers' packed-GGUF path reads: let it dequantize, then drop the
    quantization config so the model saves as an ordinary checkpoint."""
    from transformers import AutoModelForCausalLM, GgufConfig

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(p.parent),
            gguf_file=p.name,
            dtype=dtype,
            local_files_only=True,
            quantization_config=GgufConfig(dequantize=True),
            trust_remote_code=trust_remote_code,
        )
    except Exception as e:
        raise MobizoError(f"cannot load the model from {p}: {type(e).__name__}: {_first_line(e)}") from e
    return _plain(model)


def _plain(model):
    """Forget that the weights came from a quantized file (``save_pretrained`` refuses quantized models)."""
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def convert_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write ``gguf_path`` as a Hugging Face checkpoint in ``out_dir`` (config, safetensors, tokenizer).

    Refuses a non-empty ``out_dir`` unless ``overwrite``; the directory appears complete or not at all.
    """
    from .fsio import atomic_write_dir

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MobizoError(f"--out {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MobizoError(f"--out {out} is not empty (use --overwrite to replace it)")
    model, tokenizer = load_gguf(gguf_path, dtype)
    model.config.name_or_path = out.name

    def write(d: Path) -> None:
        model.save_pretrained(d, safe_serialization=True)
        tokenizer.save_pretrained(d)

    atomic_write_dir(out, write)
    return out


def _drop_pages(blob: np.memmap, start: int, length: int) -> None:
    """Let the kernel drop the mapped file pages of a tensor already copied (they count in RSS while mapped)."""
    import mmap

    m = getattr(blob, "_mmap", None)
    if m is None or not hasattr(m, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    lo = start // page * page
    try:
        m.madvise(mmap.MADV_DONTNEED, lo, start + length - lo)
    except (OSError, ValueError):
        pass


def _trim_heap(collect: bool = True) -> None:
    """glibc keeps freed allocations (the metadata parser's strings, the dequantizer's temporaries) in
    its heap instead of returning them to the system; give them back."""
    import ctypes
    import gc

    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else ""
