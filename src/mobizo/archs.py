"""Per-architecture facts: default LoRA targets, which layers MP-LoRA can wrap, what a model must be.

Everything architecture-specific lives here as data; the step (:mod:`mobizo.step`) has no
per-family code. The families below are the ones ``tests/test_arch.py`` trains (eager ZO,
first-order, ExecuTorch ZO with eager parity, PEFT load with equal logits) on a tiny random
config of the listed transformers class; ``docs/architectures.md`` is the support table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .errors import MobizoError


@dataclass(frozen=True)
class Arch:
    family: str  # what users call it
    model_types: tuple[str, ...]  # Hugging Face ``config.model_type`` values
    model_class: str  # the transformers causal-LM class the tests build
    targets: tuple[str, ...]  # default --target-modules
    notes: str = ""  # what the family exercises


# The attention query and value projections (the modules the LoRA/MeZO literature adapts); for a
# fused q/k/v layer the fused layer itself (LoRA on it is the same module name in PEFT).
ARCHS = (
    Arch(
        "Llama (SmolLM2, TinyLlama)",
        ("llama",),
        "LlamaForCausalLM",
        ("q_proj", "v_proj"),
        "GQA, RoPE, tied embeddings (SmolLM2)",
    ),
    Arch("Mistral", ("mistral",), "MistralForCausalLM", ("q_proj", "v_proj"), "GQA, sliding-window attention"),
    Arch("Qwen2 / Qwen2.5", ("qwen2",), "Qwen2ForCausalLM", ("q_proj", "v_proj"), "biases in q/k/v"),
    Arch("Qwen3", ("qwen3",), "Qwen3ForCausalLM", ("q_proj", "v_proj"), "QK-norm"),
    Arch("Gemma", ("gemma",), "GemmaForCausalLM", ("q_proj", "v_proj"), "MQA, tied and scaled embeddings"),
    Arch(
        "Gemma2", ("gemma2",), "Gemma2ForCausalLM", ("q_proj", "v_proj"), "local/global attention, logit soft-capping"
    ),
    Arch(
        "Gemma3 (text)", ("gemma3_text",), "Gemma3ForCausalLM", ("q_proj", "v_proj"), "local/global attention, QK-norm"
    ),
    Arch("Phi-3", ("phi3",), "Phi3ForCausalLM", ("qkv_proj",), "fused q/k/v"),
    Arch("GPT-2", ("gpt2",), "GPT2LMHeadModel", ("c_attn",), "Conv1D (transposed) fused q/k/v, learned positions"),
    Arch("OPT", ("opt",), "OPTForCausalLM", ("q_proj", "v_proj"), "learned positions (offset 2)"),
    Arch(
        "GPT-NeoX (Pythia)",
        ("gpt_neox",),
        "GPTNeoXForCausalLM",
        ("query_key_value",),
        "fused q/k/v, parallel attention/MLP, partial RoPE",
    ),
)

# Model types with sensible defaults that the tests do not build (same layer names as a tested family).
UNTESTED_TARGETS = {
    "mixtral": ("q_proj", "v_proj"),
    "gptj": ("q_proj", "v_proj"),
    "falcon": ("query_key_value",),
    "bloom": ("query_key_value",),
}

DEFAULT_TARGETS: dict[str, list[str]] = {
    **{t: list(a.targets) for a in ARCHS for t in a.model_types},
    **{t: list(v) for t, v in UNTESTED_TARGETS.items()},
}


def conv1d_class():
    """transformers' ``Conv1D`` (GPT-2 style linear layer with a transposed (in, out) weight), or None."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def layer_features(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in_features, out_features, fan_in_fan_out) of a layer MP-LoRA can wrap, else None.

    ``nn.Linear`` stores its weight (out, in); transformers' ``Conv1D`` stores it (in, out)
    (``fan_in_fan_out`` in PEFT's words). LoRA's A (r, in) and B (out, r) are the same for both:
    only the base layer differs, and it runs unchanged.
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    conv1d = conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        nx, nf = module.weight.shape
        return nx, nf, True
    return None


def _linear_names(model: nn.Module) -> str:
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and layer_features(m) is not None})
    return ", ".join(names) if names else "none"


def check_causal_lm(model: nn.Module) -> None:
    """Refuse, with one line naming the class, a Hugging Face model that is not a decoder-only causal LM."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return
    if not isinstance(model, PreTrainedModel):
        return  # a plain module (tests, custom wrappers): the caller names its targets
    cls = type(model).__name__
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise MobizoError(f"{cls} is an encoder-decoder model; mobizo trains decoder-only causal language models")
    if model.get_output_embeddings() is None:
        raise MobizoError(
            f"{cls} is not a causal language model (it has no LM head); load it with AutoModelForCausalLM"
        )


def default_targets(model: nn.Module) -> list[str]:
    """The family's default ``--target-modules``, or a one-line error naming the class and what is missing."""
    check_causal_lm(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    raise MobizoError(
        f"{type(model).__name__} (model type {model_type!r}) has no default --target-modules; pass "
        f"--target-modules explicitly (its linear layers: {_linear_names(model)})"
    )


def adapter_fan_in_fan_out(base_model: str | None) -> bool:
    """Whether the adapted layers of ``base_model`` (a local checkpoint directory) are ``Conv1D``.

    PEFT's ``fan_in_fan_out`` flag: PEFT itself forces it per layer type when it loads an
    adapter (True on Conv1D, False on nn.Linear), so this only keeps the written config honest.
    """
    if not base_model:
        return False
    path = Path(base_model) / "config.json"
    try:
        model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    return model_type in CONV1D_MODEL_TYPES


# Model types whose attention/MLP layers are transformers' Conv1D.
CONV1D_MODEL_TYPES = frozenset({"gpt2"})
