"""MP-LoRA: multi-perturbed LoRA on LoRA-FA, and its injection into a model.

A :class:`MPLoRALinear` wraps a frozen ``nn.Linear`` (or GPT-2's ``Conv1D``) with a frozen, seeded
down-projection ``A`` (r x in) and a trained up-projection ``B`` (out x r,
zero init), scaled by ``alpha / r`` exactly like LoRA / PEFT.

In a ZO step the batch holds ``C`` copies laid out copy-major
(``[copy0 rows, copy1 rows, ...]``) and :attr:`copies` holds one perturbed
``B`` per copy, shape ``(C, out, r)``. The base layer and ``x @ A^T`` run once
over the whole batch; only the tiny rank-r product is done per copy (``bmm``).
With :attr:`copies` unset the layer is an ordinary LoRA layer using ``B``.

``A`` and ``B`` are buffers (ExecuTorch keeps mutable state in buffers); the
first-order baseline turns them into parameters with :func:`make_trainable`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import archs
from .errors import MobizoError

# Per-architecture defaults live in :mod:`mobizo.archs` (re-exported here for existing callers).
DEFAULT_TARGETS = archs.DEFAULT_TARGETS


class MPLoRALinear(nn.Module):
    """MP-LoRA around a frozen ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2's linear layer with a
    transposed (in, out) weight: ``fan_in_fan_out``). A and B have the same shapes for both, and the
    base layer runs unchanged, so the step and the adapter format are the same."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise MobizoError(f"--rank must be >= 1, got {rank}")
        features = archs.layer_features(base)
        if features is None:
            raise MobizoError(f"MP-LoRA wraps nn.Linear or Conv1D layers, not {type(base).__name__}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features, self.fan_in_fan_out = features
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        # The adapter is float32 under a bf16/fp16 base (float64 under a float64 one): B +- eps z and
        # x·Aᵀ must not round an eps-sized perturbation away (docs/devices.md).
        dtype = adapter_dtype(base.weight.dtype)
        a = torch.empty(rank, self.in_features, dtype=torch.float32)
        # Same init as PEFT's LoRA A (kaiming uniform, a=sqrt(5)), seeded per layer.
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        # beside the base weight (made on the CPU, so that A has the same bits on every device)
        device = base.weight.device if base.weight.device.type != "meta" else torch.device("cpu")
        self.register_buffer("lora_A", a.to(device=device, dtype=dtype))
        self.register_buffer("lora_B", torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        self.copies: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        # The adapter path runs in the adapter's dtype: under a bf16/fp16 base, x·Aᵀ and the per-copy
        # product with B +- eps z in float32, and the sum with the base's output rounded once into its dtype.
        # (The casts are Python-level no-ops for a float32 base: the exported graph is unchanged.)
        a = self.lora_A
        xa = F.linear(x if x.dtype == a.dtype else x.to(a.dtype), a)  # once for the whole batch
        # Without copies the layer is plain LoRA: the same path with one copy. (B is never the weight
        # operand of a linear op: a backend such as XNNPACK would pack it as a constant at load time.)
        copies = self.lora_B.unsqueeze(0) if self.copies is None else self.copies
        c = copies.shape[0]
        if xa.dim() == 3:  # (rows, T, r), rows copy-major: copy i owns rows [i*rows/c, (i+1)*rows/c)
            # Split and merge axes explicitly (not reshape(c, -1, r)): the exported program keeps T
            # symbolic (one program for every sequence length), and a flat reshape over a symbolic
            # T adds a stride guard torch.export cannot prove. Same memory layout, same bmm.
            rows, t = xa.shape[0], xa.shape[1]
            xa = xa.reshape(c, rows // c, t, self.rank).flatten(1, 2)
            delta = torch.bmm(xa, copies.transpose(1, 2)).unflatten(1, (rows // c, t)).flatten(0, 1)
        else:
            lead = xa.shape[:-1]
            xa = xa.reshape(c, -1, self.rank)  # copy-major batch
            delta = torch.bmm(xa, copies.transpose(1, 2)).reshape(*lead, self.out_features)
        delta = delta * self.scaling
        if y.dtype == delta.dtype:
            return y + delta
        return (y.to(delta.dtype) + delta).to(y.dtype)

    def extra_repr(self) -> str:
        kind = ", fan_in_fan_out" if self.fan_in_fan_out else ""
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}{kind}"


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype of A, B (and the noise, the update) for a base of ``base_dtype``: at least float32."""
    return torch.promote_types(base_dtype, torch.float32) if base_dtype.is_floating_point else torch.float32


def _matches(name: str, targets: list[str]) -> bool:
    for t in targets:
        if name == t or name.endswith("." + t):
            return True
        if any(ch in t for ch in "*[]()|\\"):
            try:
                if re.fullmatch(t, name):
                    return True
            except re.error as e:
                raise MobizoError(f"--target-modules: {t!r} is not a valid regular expression ({e})") from e
    return False


def default_targets(model: nn.Module) -> list[str]:
    return archs.default_targets(model)


def inject(model: nn.Module, targets: Iterable[str] | None, rank: int, alpha: float, seed: int) -> list[str]:
    """Replace every targeted ``nn.Linear`` (or ``Conv1D``) with an :class:`MPLoRALinear`.

    Refuses a Hugging Face model that is not a causal LM; ``targets=None``: the family's defaults
    (:mod:`mobizo.archs`). Freezes all original parameters. Returns the adapted module names in a
    stable (sorted) order; that order defines each layer's noise stream id.
    """
    archs.check_causal_lm(model)
    targets = list(targets) if targets else default_targets(model)
    for p in model.parameters():
        p.requires_grad_(False)
    names = sorted(n for n, m in model.named_modules() if n and _matches(n, targets))
    bad = [n for n in names if archs.layer_features(model.get_submodule(n)) is None]
    if bad:
        kind = type(model.get_submodule(bad[0])).__name__
        raise MobizoError(f"target modules must be nn.Linear (or Conv1D) layers; {bad[0]} is {kind}")
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if archs.layer_features(m) is not None})
        raise MobizoError(
            f"--target-modules {','.join(targets)} matched no layer of the model (its linear layers: {', '.join(linear)})"
        )
    for i, name in enumerate(names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        gen = torch.Generator().manual_seed((seed * 1_000_003 + i) % (2**63))
        setattr(parent, child, MPLoRALinear(getattr(parent, child), rank, alpha, gen))
    return names


def lora_layers(model: nn.Module) -> list[tuple[str, MPLoRALinear]]:
    """(name, layer) of every MP-LoRA layer, in the sorted order used for noise streams."""
    return sorted(((n, m) for n, m in model.named_modules() if isinstance(m, MPLoRALinear)), key=lambda t: t[0])


def fan_in_fan_out(model: nn.Module) -> bool:
    """Whether the adapted layers are ``Conv1D`` (PEFT's ``fan_in_fan_out``, written into the adapter config)."""
    return any(layer.fan_in_fan_out for _, layer in lora_layers(model))


def make_trainable(model: nn.Module, train_a: bool = False) -> list[nn.Parameter]:
    """Turn B (and A if ``train_a``: plain LoRA) into autograd parameters for the FO baseline."""
    params = []
    for _, layer in lora_layers(model):
        names = ["lora_B"] + (["lora_A"] if train_a else [])
        for attr in names:
            value = getattr(layer, attr)
            if attr in layer._buffers:
                del layer._buffers[attr]
            p = nn.Parameter(value.detach().clone(), requires_grad=True)
            setattr(layer, attr, p)
            params.append(p)
    return params


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{module name + '.lora_A' / '.lora_B': tensor} for every MP-LoRA layer: copies on the CPU, in float32
    (what checkpoints and adapters hold, whatever the model's device; an adapter someone cast to a
    half type is widened back, exactly)."""
    state = {}
    for name, layer in lora_layers(model):
        for attr in ("lora_A", "lora_B"):
            t = getattr(layer, attr).detach()
            state[f"{name}.{attr}"] = t.to(device="cpu", dtype=adapter_dtype(t.dtype), copy=True)
    return state


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    layers = dict(lora_layers(model))
    expected = {f"{n}.lora_{w}" for n in layers for w in "AB"}
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise MobizoError(
            f"adapter does not fit this model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}"
        )
    with torch.no_grad():
        for key, value in state.items():
            name, _, attr = key.rpartition(".")
            target = getattr(layers[name], attr)
            if tuple(value.shape) != tuple(target.shape):
                raise MobizoError(
                    f"adapter tensor {key} has shape {tuple(value.shape)}, the model needs {tuple(target.shape)}"
                )
            target.copy_(value.to(target.dtype))


# ---------------------------------------------------------------- the PEFT-like face


@dataclass
class MPLoRAConfig:
    """An MP-LoRA (LoRA-FA) adapter: rank r, scaling alpha/r, the targeted modules (default: per
    architecture, :data:`DEFAULT_TARGETS`) and the seed of the frozen A matrices."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] | None = None
    seed: int = 0


def get_mplora_model(model: nn.Module, config: MPLoRAConfig | None = None) -> nn.Module:
    """Inject MP-LoRA layers into ``model`` (a Hugging Face causal LM) in place and return it.

    The result is still called like the original model (``model(input_ids=...)`` gives its usual
    output, with the adapter applied); :class:`mobizo.ZOStep` trains it and :func:`mobizo.save_adapter`
    writes the adapter in PEFT format. The adapted layer names are in ``model.mplora_layers``.
    """
    config = config or MPLoRAConfig()
    if lora_layers(model):
        raise MobizoError("the model already has MP-LoRA layers")
    model.mplora_layers = inject(model, config.target_modules, config.rank, config.alpha, config.seed)
    model.mplora_config = config
    return model
