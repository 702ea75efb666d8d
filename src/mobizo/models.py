"""Model loading: local Hugging Face checkpoints (offline) and the built-in ``tiny`` model."""

from __future__ import annotations

import contextlib
import hashlib
import math
from pathlib import Path

import torch

from .errors import MobizoError

TINY = "tiny"

# Built-in default: a small randomly initialised Llama. Small enough for a
# 2-core laptop to train in seconds, big enough to be a real transformer.
TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TINY_VOCAB = 1024
TINY_SEED = 1234


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained (deterministically) on a built-in corpus.

    Any UTF-8 text encodes (byte fallback); the synthetic task's words and
    common English words are single tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .tasks.synthetic import tokenizer_corpus

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )


def build_tiny(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of the built-in tiny Llama; same weights every time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **TINY_CONFIG,
    )
    return random_model(LlamaForCausalLM, config, TINY_SEED, TINY).to(dtype), tokenizer


def random_model(cls, config, seed: int, name: str):
    """``cls(config)`` with seeded random weights (the global RNG is left as it was), named ``name``."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = cls(config)
    finally:
        torch.random.set_rng_state(state)
    model.config.name_or_path = name
    return model.eval()


def load_model(path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, before_weights=None):
    """(model, tokenizer) from ``tiny``, a local Hugging Face model directory or a ``.gguf`` file, offline.

    ``before_weights(config, weight_bytes, tokenizer)`` is called once the model's config and (prepared)
    tokenizer are read and before any weight is: the checks of a run that need only those
    (:func:`mobizo.build.assemble`) refuse it without waiting for the weights. ``weight_bytes``: what the
    weights will take in ``dtype`` (0 for ``tiny``, built before the call: it is ~1 MB).
    """
    if path == TINY:
        model, tokenizer = build_tiny(dtype)
        if before_weights is not None:
            before_weights(model.config, 0, tokenizer)
        return model, tokenizer
    p = Path(path)
    from .convert import is_gguf, load_gguf

    if is_gguf(p) or p.suffix.lower() == ".gguf":
        hook = None if before_weights is None else lambda c, n, tok: before_weights(c, n, prepare_tokenizer(tok))
        model, tokenizer = load_gguf(p, dtype, trust_remote_code, before_weights=hook)
        return model, prepare_tokenizer(tokenizer)
    if not p.exists():
        raise MobizoError(
            f"model {path} does not exist (a Hugging Face model directory, a .gguf file, or tiny for the built-in model)"
        )
    if not p.is_dir() or not (p / "config.json").is_file():
        raise MobizoError(f"{path} is not a Hugging Face model directory (no config.json) or a GGUF file")
    if not any(p.glob("*.safetensors")):
        raise MobizoError(f"{path} has no *.safetensors weights (mobizo loads weights only from safetensors)")
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = prepare_tokenizer(_tokenizer(p, trust_remote_code))
    if before_weights is not None:
        try:
            config = AutoConfig.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
        except Exception as e:  # any loader failure is a bad model dir
            raise MobizoError(f"cannot read the config of {path}: {type(e).__name__}: {_first_line(e)}") from e
        before_weights(config, safetensors_numel(weight_files(path)) * dtype.itemsize, tokenizer)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            p, local_files_only=True, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except Exception as e:  # any loader failure is a bad model dir
        raise MobizoError(f"cannot load the model from {path}: {type(e).__name__}: {_first_line(e)}") from e
    model.config.name_or_path = str(p.resolve())
    return model.eval(), tokenizer


def safetensors_numel(files) -> int:
    """Elements of the tensors in ``files`` (read from their headers, no tensor data); 0 for an unreadable file
    (the loader says what is wrong with it)."""
    from safetensors import safe_open

    n = 0
    for f in files:
        with contextlib.suppress(Exception), safe_open(str(f), framework="pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())  # noqa: SIM118
    return n


def _tokenizer(p: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise MobizoError(f"cannot load the tokenizer from {p}: {type(e).__name__}: {_first_line(e)}") from e


def load_fast_tokenizer(directory: Path):
    """A tokenizer saved by :func:`save_run_tokenizer`, loaded as transformers' fast tokenizer (no
    AutoTokenizer: that reads the model's config, whose import alone pulls in ``torch._dynamo``)."""
    from transformers import PreTrainedTokenizerFast

    try:
        return prepare_tokenizer(PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True))
    except Exception as e:
        raise MobizoError(f"cannot load the tokenizer in {directory}: {type(e).__name__}: {_first_line(e)}") from e


# texts every carried tokenizer must encode as the run's own does (plus the run's examples)
TOKENIZER_PROBES = (
    "Review: a truly great movie! Sentiment: good",
    " hello\n\tworld  ",
    "Ünïcödé — 数字 123 😀",
    "<s> </s> <pad> <|endoftext|>",
)


def save_run_tokenizer(tokenizer, directory: Path, texts=()) -> bool:
    """Save ``tokenizer`` into ``directory`` when :func:`load_fast_tokenizer` gives it back exactly:
    the same ids for :data:`TOKENIZER_PROBES` and ``texts`` (the run's prompts and answers), the same
    special tokens, padding side and chat template. False (and nothing saved) for a tokenizer that
    does not round-trip (a slow or custom-code tokenizer): a run on the program then loads the model's."""
    import shutil

    directory = Path(directory)
    try:
        tokenizer.save_pretrained(str(directory))
        back = load_fast_tokenizer(directory)
        same = all(
            back(t, add_special_tokens=s)["input_ids"] == tokenizer(t, add_special_tokens=s)["input_ids"]
            for t in (*TOKENIZER_PROBES, *texts)
            for s in (True, False)
        )
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "padding_side", "chat_template"):
            same = same and getattr(back, attr, None) == getattr(tokenizer, attr, None)
    except Exception:  # noqa: BLE001 - any failure means: not carried
        same = False
    if not same:
        shutil.rmtree(directory, ignore_errors=True)
    return same


def load_skeleton(path: str, trust_remote_code: bool = False):
    """(model, tokenizer) of ``path`` without its weights: the architecture built from the config on the
    ``meta`` device (shapes, module names, no storage), for a run whose step runs in an ExecuTorch
    program that already holds the weights. ``tiny`` is built for real (it is ~1 MB)."""
    if path == TINY:
        return build_tiny()
    p = Path(path)
    from .convert import is_gguf, load_gguf_skeleton

    if is_gguf(p) or p.suffix.lower() == ".gguf":
        model, tokenizer = load_gguf_skeleton(p, trust_remote_code)
        return model, prepare_tokenizer(tokenizer)
    if not p.is_dir() or not (p / "config.json").is_file():
        return load_model(path, trust_remote_code=trust_remote_code)  # its one-line error
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = _tokenizer(p, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise MobizoError(f"cannot build the model of {path}: {type(e).__name__}: {_first_line(e)}") from e
    model.config.name_or_path = str(p.resolve())
    return model.eval(), prepare_tokenizer(tokenizer)


def is_skeleton(model: torch.nn.Module) -> bool:
    """Whether ``model`` came from :func:`load_skeleton` (its weights are on the meta device)."""
    return any(t.is_meta for t in model.parameters())


def weight_files(path: str) -> list[Path]:
    """The files holding the weights of model ``path`` (a GGUF file, or a directory's ``*.safetensors``)."""
    p = Path(path)
    return [p] if p.is_file() else sorted(p.glob("*.safetensors"))


def base_hash(path: str, model: torch.nn.Module, given: bool = False) -> str:
    """Identity of a base model: sha256 over its weight files' names and sha256s (so a run that
    trains an exported program checks it without loading the weights; the files' digests are
    cached by path, size and mtime). ``tiny``, or a model ``given`` as an object: :func:`weights_hash`."""
    from .util import cached_file_sha256

    files = [] if given or path == TINY else weight_files(path)
    if files:
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.name}:{cached_file_sha256(f)}\n".encode())
        return h.hexdigest()
    if is_skeleton(model):
        raise MobizoError(f"cannot identify the weights of model {path} (no weight files)")
    return weights_hash(model)


def prepare_tokenizer(tokenizer):
    """mobizo's layout: a pad token (EOS or UNK when the model has none) and left padding."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    tokenizer.padding_side = "left"
    return tokenizer


# config attributes that bound the positions a model can embed (learned tables index out of range past them)
POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx", "seq_length")


def max_positions(model) -> int | None:
    """The number of positions the model's config declares (its position table / trained context), if any.
    ``model``: a model, or its config."""
    config = getattr(model, "config", model)
    for name in POSITION_LIMITS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_max_length(model, max_length: int, flag: str = "--max-length") -> None:
    """Refuse a sequence length beyond the model's positions with one line (instead of an IndexError in
    the position embedding, or RoPE positions the model never saw). Call it once the model is loaded."""
    limit = max_positions(model)
    if limit is not None and max_length > limit:
        config = getattr(model, "config", model)
        name = getattr(config, "name_or_path", "") or type(model).__name__
        raise MobizoError(
            f"{flag} {max_length} is longer than the {limit} positions of model {name}; use {flag} {limit} or less"
        )


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over the frozen base weights (names, shapes, bytes): identifies a base model. Of float
    weights: a quantized base is hashed before quantizing (:func:`mobizo.build.assemble`)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if ".lora_" in name:
            continue
        name = name.replace(".base.", ".")  # same hash before and after MP-LoRA injection
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else ""
