"""A quantized frozen base: ``--quantize``, ``--group-size``, ``--quantize-embeddings``.

Only B trains, so the base model can be stored and run the way an inference engine runs it on a
phone: quantized. :func:`quantize_base` rewrites the frozen base in place *before* the adapter is
injected, so every :class:`mobizo.mplora.MPLoRALinear` wraps an already-quantized linear while its
own path (``x @ A^T``, the per-copy B) stays float32.

Schemes (the names follow torchao / ExecuTorch's LLM export):

========  ==========================================================  ===============================
scheme    base linears                                                ExecuTorch (XNNPACK)
========  ==========================================================  ===============================
none      float32                                                     float32 kernels
8da8w     int8 weights, one scale per output channel; activations     qd8-f32-qc8w kernels
          quantized to int8 per token at run time (dynamic)
8da4w     int4 weights, one scale per ``--group-size`` inputs          qd8-f32-qb4w kernels
          (default 32; 0 = per output channel); dynamic int8
          activations
int8      int8 weights (per output channel), float activations        refused (see below)
          (weight-only)
4w        int4 weights, grouped as 8da4w, float activations           refused (see below)
          (weight-only)
========  ==========================================================  ===============================

The linear layers are quantized with torchao's ``quantize_``
(``Int8DynamicActivationIntxWeightConfig`` / ``IntxWeightOnlyConfig``, affine, symmetric).
XNNPACK in ExecuTorch has kernels for the *dynamically* quantized schemes only: a weight-only
scheme's ``dequantize`` is folded into float32 weights when lowering (no memory saved) and a
grouped 8-bit scheme does not lower at all, so those are refused for ``--engine executorch``,
``mobizo export`` and ``mobizo bundle`` with one line, before anything is traced.

``--quantize-embeddings`` also quantizes the model's input embedding table and its LM head. The
LM head is a linear layer (quantized like the others). The embedding table is quantized by
:class:`QuantEmbedding`: symmetric int8 (8-bit schemes) or int4 packed two per byte (4-bit
schemes) rows with float32 scales per group, dequantized by gather + multiply in the graph. The
ExecuTorch runtime in the executorch wheel has no quantized-embedding kernels
(``quantized_decomposed::embedding_*``), so this is built from ops every runtime has and runs
identically in eager PyTorch and in ExecuTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MobizoError

SCHEMES = ("none", "int8", "8da8w", "8da4w", "4w")
DYNAMIC = ("8da8w", "8da4w")  # lowerable to XNNPACK: int8 dynamic activations x int8/int4 weights
BITS = {"int8": 8, "8da8w": 8, "8da4w": 4, "4w": 4}
DEFAULT_GROUP_SIZE = 32


def group_size_for(scheme: str, group_size: int | None) -> int | None:
    """The group size a scheme uses: ``None`` for ``none``, 0 (per output channel) for the 8-bit
    schemes, ``group_size`` (default :data:`DEFAULT_GROUP_SIZE`) for the 4-bit ones."""
    if scheme == "none":
        return None
    if BITS[scheme] == 8:
        return 0
    return DEFAULT_GROUP_SIZE if group_size is None else group_size


def check_scheme(scheme: str, group_size: int | None, embeddings: bool, executorch: bool = False) -> None:
    """The checks that need no model (config validation)."""
    if scheme not in SCHEMES:
        raise MobizoError(f"--quantize must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if scheme == "none":
        if group_size is not None:
            raise MobizoError("--group-size applies to a 4-bit --quantize scheme (4w, 8da4w), not none")
        if embeddings:
            raise MobizoError("--quantize-embeddings needs a --quantize scheme (8da8w, 8da4w, int8, 4w)")
        return
    if group_size is not None and group_size < 0:
        raise MobizoError(f"--group-size must be >= 0 (0 = one scale per output channel), got {group_size}")
    if BITS[scheme] == 8 and group_size not in (None, 0):
        raise MobizoError(
            f"--quantize {scheme} quantizes per output channel (XNNPACK has no grouped 8-bit "
            "kernel); --group-size applies to 4w and 8da4w"
        )
    if executorch:
        if scheme not in DYNAMIC:
            raise MobizoError(
                f"--quantize {scheme} is weight-only, which ExecuTorch's XNNPACK cannot run quantized "
                "(its weights would be stored dequantized, as float32); use 8da8w or 8da4w for the "
                "ExecuTorch program, or --engine eager"
            )
        gs = group_size_for(scheme, group_size)
        if gs and gs % 32:
            raise MobizoError(f"--group-size {gs}: XNNPACK's 4-bit kernels need a multiple of 32 (or 0 = per channel)")


def _head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    return get() if callable(get) else None


def quantized_linears(model: nn.Module, embeddings: bool) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of the linear layers a scheme quantizes: every ``nn.Linear`` of the base, the LM
    head only with ``embeddings``. Adapter layers' own tensors are never touched (call this before
    :func:`mobizo.mplora.inject`, or it still only returns base linears)."""
    head = _head(model)
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or ".lora_" in name:
            continue
        if m is head and not embeddings:
            continue
        out.append((name, m))
    return out


def check_quantize(
    model: nn.Module, scheme: str, group_size: int | None, embeddings: bool, executorch: bool = False
) -> None:
    """Refuse, with one line and before any long work, a scheme the model's layers do not allow."""
    check_scheme(scheme, group_size, embeddings, executorch)
    if scheme == "none":
        return
    from . import archs

    conv = sorted(
        n for n, m in model.named_modules() if archs.layer_features(m) is not None and not isinstance(m, nn.Linear)
    )
    if conv:
        raise MobizoError(
            f"--quantize: {type(model).__name__} has Conv1D (GPT-2 style) layers, e.g. {conv[0]}, "
            "which torchao does not quantize; use --quantize none"
        )
    linears = quantized_linears(model, embeddings)
    if not linears:
        raise MobizoError(f"--quantize {scheme}: {type(model).__name__} has no nn.Linear layers to quantize")
    for name, m in linears:
        if m.weight.dtype != torch.float32:
            raise MobizoError(f"--quantize needs a float32 base; {name} is {m.weight.dtype}")
    gs = group_size_for(scheme, group_size)
    if gs:
        for name, m in linears:
            if m.in_features % gs:
                raise MobizoError(
                    f"--group-size {gs} does not divide the {m.in_features} input features of "
                    f"{name} (--quantize {scheme}); use a divisor of it, or 0 = per channel"
                )
    if embeddings:
        emb = _embedding(model)
        if not isinstance(emb, nn.Embedding):
            raise MobizoError(f"--quantize-embeddings: {type(model).__name__} has no nn.Embedding input embeddings")
        dim = emb.embedding_dim
        if gs and dim % gs:
            raise MobizoError(f"--group-size {gs} does not divide the embedding width {dim}")
        if BITS[scheme] == 4 and dim % 2:
            raise MobizoError(f"--quantize-embeddings with 4-bit {scheme} needs an even embedding width, not {dim}")


def torchao_config(scheme: str, group_size: int | None):
    """The torchao ``quantize_`` config of a scheme's linear layers."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    gs = group_size_for(scheme, group_size)
    granularity = PerGroup(gs) if gs else PerAxis(0)
    dtype = torch.int8 if BITS[scheme] == 8 else torch.int4
    if scheme in DYNAMIC:
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity)
    return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity)


def quantize_base(
    model: nn.Module, scheme: str, group_size: int | None = None, embeddings: bool = False, executorch: bool = False
) -> nn.Module:
    """Quantize ``model``'s frozen base in place (see the module docstring); returns it.

    Call it after loading and before :func:`mobizo.mplora.inject`. ``executorch``: also refuse
    schemes the ExecuTorch export cannot lower. The base weights' sha256
    (:func:`mobizo.build.Run.base_hash`) names the float model (files, or tensors hashed before
    quantizing), and the scheme is recorded beside it.
    """
    done = quantization_of(model)
    if done["quantize"] != "none":
        want = {"quantize": scheme, "group_size": group_size_for(scheme, group_size), "quantize_embeddings": embeddings}
        if done == want:
            return model  # already quantized this way (a model object passed in twice)
        raise MobizoError(
            f"the model is already quantized ({done['quantize']}); load it afresh for --quantize {scheme}"
        )
    check_quantize(model, scheme, group_size, embeddings, executorch)
    if scheme == "none":
        return model
    from .mplora import lora_layers

    if lora_layers(model):
        raise MobizoError("quantize the base before injecting the MP-LoRA adapter")
    from .util import quiet_third_party

    quiet_third_party()
    from torchao.quantization import quantize_

    chosen = {id(m) for _, m in quantized_linears(model, embeddings)}
    head, emb = _head(model), _embedding(model)
    if embeddings and head is not None and emb is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)  # untie: both get quantized
    with torch.no_grad():
        quantize_(model, torchao_config(scheme, group_size), filter_fn=lambda m, fqn: id(m) in chosen)
        if scheme in DYNAMIC and group_size_for(scheme, group_size):
            # XNNPACK stores a grouped (qb4w) weight's scales as bfloat16: round them the same way here,
            # so eager runs the weights the ExecuTorch program runs (measured: the loss gap drops ~10x)
            for m in model.modules():
                if id(m) in chosen:
                    m.weight.scale.copy_(m.weight.scale.to(torch.bfloat16).to(m.weight.scale.dtype))
        if embeddings:
            gs = group_size_for(scheme, group_size)
            model.set_input_embeddings(QuantEmbedding.from_float(emb, BITS[scheme], gs))
    for p in model.parameters():
        p.requires_grad_(False)
    model.mobizo_quantization = quantization_for(scheme, group_size, embeddings)
    return model


def quantization_for(scheme: str, group_size: int | None, embeddings: bool) -> dict:
    """The manifest's record of a scheme (what :func:`quantize_base` applies for these flags)."""
    return {
        "quantize": scheme,
        "group_size": group_size_for(scheme, group_size),
        "quantize_embeddings": bool(embeddings) and scheme != "none",
    }


def quantization_of(model: nn.Module) -> dict:
    """What :func:`quantize_base` did to ``model`` (``quantize: none`` when nothing)."""
    return dict(
        getattr(model, "mobizo_quantization", None)
        or {"quantize": "none", "group_size": None, "quantize_embeddings": False}
    )


class QuantEmbedding(nn.Module):
    """A frozen embedding table stored as symmetric int8, or int4 packed two per byte, with a float32
    scale per ``group`` columns of each row; looked up by gather + dequantize (every runtime has the ops).

    int4: the value ``v`` in [-8, 7] is stored as the nibble ``v + 8``; byte ``j`` of a row holds
    columns ``j`` (low nibble) and ``j + dim/2`` (high nibble), so unpacking is two elementwise ops
    and one concatenation.
    """

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, bits: int, dim: int, padding_idx=None):
        super().__init__()
        self.register_buffer("qdata", qdata)
        self.register_buffer("scale", scale)
        self.bits, self.embedding_dim, self.num_embeddings = bits, dim, qdata.shape[0]
        self.padding_idx = padding_idx

    @classmethod
    def from_float(cls, emb: nn.Embedding, bits: int, group_size: int | None) -> QuantEmbedding:
        w = emb.weight.detach().float()
        n, dim = w.shape
        group = group_size or dim
        qmax = 127 if bits == 8 else 7
        groups = w.reshape(n, dim // group, group)
        scale = groups.abs().amax(-1).clamp_min(1e-12) / qmax  # (n, dim/group)
        q = torch.round(groups / scale.unsqueeze(-1)).clamp(-qmax - 1, qmax).reshape(n, dim)
        if bits == 8:
            qdata = q.to(torch.int8)
        else:
            u = (q + 8).to(torch.uint8)
            half = dim // 2
            qdata = u[:, :half] + u[:, half:] * 16
        return cls(qdata, scale.float(), bits, dim, emb.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.qdata).to(torch.float32)  # integers: exact in float32
        if self.bits == 8:
            values = rows
        else:
            high = torch.floor(rows / 16.0)
            values = torch.cat([rows - high * 16.0, high], dim=-1) - 8.0
        scale = F.embedding(ids, self.scale)  # (..., dim/group)
        groups = scale.shape[-1]
        shape = values.shape
        return (values.reshape(*shape[:-1], groups, -1) * scale.unsqueeze(-1)).reshape(shape)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (what a caller reading ``embed_tokens.weight`` expects)."""
        return self.forward(torch.arange(self.num_embeddings))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self.bits}, groups={self.scale.shape[-1]}"
