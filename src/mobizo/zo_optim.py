"""ZO update rules: what a step does with its projected gradients. One piece of code per rule, run by
:meth:`mobizo.step.ZOStep.update` (so by the eager engine, the exported program and the native trainer
that runs it, torchrun's modes) and by ``mobizo replay``.

A step has q directions z_i (per adapted layer, from :mod:`mobizo.perturb`) and their projected
gradients g_i = (L(B + eps z_i) - L(B - eps z_i)) / 2eps. With ĝ = mean_i g_i z_i (+ wd * B):

========== ===================================================== ==============================
rule       update of B (per element)                              state per layer
========== ===================================================== ==============================
sgd        B -= lr ĝ  (MeZO's ZO-SGD)                             none
momentum   m = beta1 m + ĝ;  B -= lr m  (heavy ball)              m
adam       m = beta1 m + (1 - beta1) ĝ;  v = beta2 v + (1 - beta2) ĝ²;  t += 1;
           B -= lr (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + 1e-8)       m, v, t
sign       B -= lr sign(ĝ)                                        none
fzoo       B -= lr mean_i (g_i / rms(g)) z_i: each direction's    none
           projection divided by the spread of the step's
           projections (FZOO: normalised by the std of the
           batched losses), a normalised-SGD step
hizoo      perturb along h^(-1/2) z_i; ĝ = mean_i g_i h^(-1/2) z_i; B -= lr ĝ;    h (diagonal
           h = (1 - a) h + a mean_i c_i h z_i², c_i = |L+_i + L-_i - 2 L0| / 2eps²  curvature, starts at 1)
========== ===================================================== ==============================

HiZOO needs the unperturbed loss L0: it rides in the same batched forward as one more copy of the
batch (B itself), and its curvature scalars c_i are returned by the step and logged, so that
``mobizo replay`` rebuilds h, and B with it, from the log alone. Every other rule's state is a function
of the logged g_i and lr and the regenerated z_i. A step the divergence guard rejects changes neither
B nor the state.

State tensors live in buffers of each MP-LoRA layer (``zo_m``, ``zo_v``, ``zo_h``, ``zo_t``), so they
are mutable buffers of the exported program, saved in checkpoints and restored on ``--resume``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import MobizoError

RULES = ("sgd", "momentum", "adam", "sign", "fzoo", "hizoo")
# Each rule's learning rate when --lr is not given, and the centre of --lr auto's probe: the best lr of an
# 80-step sweep on a 5-class task with SmolLM2-135M (LoRA-FA rank 8 on q/v, q=4, batch 8; the table in
# docs/optimizers.md), or the grid point below it where the next lr up diverged (sgd, momentum): a
# default must survive other models and tasks. The rules differ by orders of magnitude: sign and fzoo
# move every element of B by about lr per step whatever the loss's scale, so their lr carries over
# between models; sgd's, momentum's and hizoo's steps scale with the loss's gradient.
DEFAULT_LR = {"sgd": 1e-2, "momentum": 1e-3, "adam": 1e-2, "sign": 1e-2, "fzoo": 3e-2, "hizoo": 1e-2}
FO_DEFAULT_LR = {"sgd": 1e-2, "adamw": 1e-3}  # --estimator fo's optimizers
DEFAULT_RULE = "fzoo"  # the zeroth-order default: scale-free steps learn on every benchmark task and model
# Each rule's --lr-schedule when none is given. A normalised step does not shrink as the gradient does,
# so at a constant lr fzoo hovers around the optimum it reached early (SmolLM2, 300 steps: 0.853 at
# step 100, 0.803 at 300); decayed over --steps it keeps the early speed and settles (0.857 at 200).
DEFAULT_SCHEDULE = {"fzoo": "cosine"}


def default_lr(first_order: bool, optimizer: str) -> float:
    """The learning rate of ``optimizer`` (a ZO rule, or fo's sgd / adamw) when --lr is not given."""
    return (FO_DEFAULT_LR if first_order else DEFAULT_LR)[optimizer]


def default_schedule(first_order: bool, optimizer: str) -> str:
    """The --lr-schedule of ``optimizer`` when none is given."""
    return "constant" if first_order else DEFAULT_SCHEDULE.get(optimizer, "constant")


ADAM_DELTA = 1e-8  # Adam's denominator floor
RMS_FLOOR = 1e-30  # fzoo: a step whose projections are all 0 moves nothing (0 / floor)


@dataclass(frozen=True)
class Rule:
    name: str
    state: tuple[str, ...] = ()  # per-layer tensors shaped like B
    counter: bool = False  # a step count (Adam's bias correction): one (1,) tensor per layer
    center: bool = False  # needs the unperturbed loss L0 (an extra copy in the forward)
    init: float = 0.0  # initial value of the state tensors

    def buffers(self) -> tuple[str, ...]:
        """Names of the state buffers on each layer, in the order the program's get_state returns them."""
        return tuple(f"zo_{s}" for s in self.state) + (("zo_t",) if self.counter else ())


SPECS = {
    "sgd": Rule("sgd"),
    "momentum": Rule("momentum", ("m",)),
    "adam": Rule("adam", ("m", "v"), counter=True),
    "sign": Rule("sign"),
    "fzoo": Rule("fzoo"),
    "hizoo": Rule("hizoo", ("h",), center=True, init=1.0),
}


def rule(name: str) -> Rule:
    if name not in SPECS:
        raise MobizoError(f"unknown ZO update rule {name!r} (choose from {', '.join(RULES)})")
    return SPECS[name]


@dataclass(frozen=True)
class RuleConfig:
    """A rule and its constants (all of them shape the trajectory: logged, checked on --resume)."""

    name: str = "sgd"
    beta1: float = 0.9  # momentum, adam
    beta2: float = 0.999  # adam
    hessian_smoothing: float = 1e-6  # hizoo: a, the weight of each step's curvature in h

    def __post_init__(self):
        rule(self.name)
        for what, v in (("--beta1", self.beta1), ("--beta2", self.beta2)):
            if not 0 <= v < 1:
                raise MobizoError(f"{what} must be in [0, 1), got {v}")
        if not 0 < self.hessian_smoothing <= 1:
            raise MobizoError(f"--hessian-smoothing must be in (0, 1], got {self.hessian_smoothing}")

    @property
    def spec(self) -> Rule:
        return SPECS[self.name]


def ensure_state(layers, config: RuleConfig) -> None:
    """Give every layer the rule's state buffers (zeros, HiZOO's h ones) unless it has them."""
    spec = config.spec
    for layer in layers:
        b = layer.lora_B
        for s in spec.state:
            if not hasattr(layer, f"zo_{s}"):
                layer.register_buffer(f"zo_{s}", torch.full_like(b, spec.init))
        if spec.counter and not hasattr(layer, "zo_t"):
            layer.register_buffer("zo_t", torch.zeros(1, dtype=b.dtype))


def state_of(layers, names: list[str], config: RuleConfig) -> dict[str, torch.Tensor]:
    """{``<layer>.zo_<s>``: tensor} of every state buffer (empty for a stateless rule)."""
    return {
        f"{n}.{b}": getattr(layer, b).detach().clone() for n, layer in zip(names, layers) for b in config.spec.buffers()
    }


def check_state(state: dict | None, shapes: dict[str, tuple], rule_name: str, where: str) -> None:
    """One line unless ``state`` holds exactly the tensors ``shapes`` names, of those shapes, all finite."""
    if state is None:
        raise MobizoError(f"{where}: no optimizer state for --optimizer {rule_name} (a checkpoint of another rule?)")
    if set(state) != set(shapes):
        extra, missing = sorted(set(state) - set(shapes)), sorted(set(shapes) - set(state))
        raise MobizoError(
            f"{where}: the optimizer state does not fit --optimizer {rule_name} "
            f"(missing {missing[:2]}, unexpected {extra[:2]})"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(shapes[k]):
            raise MobizoError(f"{where}: optimizer state {k} has shape {tuple(v.shape)}, needs {tuple(shapes[k])}")
        if not bool(torch.isfinite(v).all()):
            raise MobizoError(f"{where}: optimizer state {k} has non-finite values (the checkpoint is corrupted)")


def load_state(layers, names: list[str], config: RuleConfig, state: dict[str, torch.Tensor] | None, where: str) -> None:
    """Set the state buffers from ``state`` (a checkpoint's), checked: the same names, shapes, finite."""
    want = state_of(layers, names, config)
    check_state(state, {k: tuple(v.shape) for k, v in want.items()}, config.name, where)
    with torch.no_grad():
        for n, layer in zip(names, layers):
            for b in config.spec.buffers():
                getattr(layer, b).copy_(state[f"{n}.{b}"].to(getattr(layer, b).dtype))


def directions(layers, zs, config: RuleConfig):
    """The directions B is perturbed along: z, or HiZOO's h^(-1/2) z."""
    if config.name != "hizoo":
        return zs
    return [z * torch.rsqrt(layer.zo_h).unsqueeze(0) for layer, z in zip(layers, zs)]


def curvature(plus, minus, center, eps):
    """HiZOO's c_i = |L+_i + L-_i - 2 L0| / (2 eps²), one per direction."""
    return (plus + minus - 2 * center).abs() / (2 * eps * eps)


def proposals(layers, zs, dirs, grads, lr, config: RuleConfig, weight_decay: float = 0.0, curv=None):
    """New values of every layer's B and state buffers, not yet applied: a list per layer of
    [(buffer name, new tensor), ...] with ``lora_B`` first. ``zs``: the raw directions, ``dirs``: the
    perturbation directions (:func:`directions`), ``grads``: (q,) projected gradients."""
    name = config.name
    if name == "fzoo":
        rms = torch.sqrt((grads * grads).mean()).clamp(min=RMS_FLOOR)
        grads = grads / rms
    out = []
    for layer, z, d in zip(layers, zs, dirs):
        g = grads.to(z.dtype).reshape(-1, 1, 1)
        b = layer.lora_B
        ghat = (g * d).mean(0)
        if weight_decay:
            ghat = ghat + weight_decay * b
        news = []
        if name in ("sgd", "fzoo", "hizoo"):
            step = ghat
        elif name == "sign":
            step = torch.sign(ghat)
        elif name == "momentum":
            m = config.beta1 * layer.zo_m + ghat
            news.append(("zo_m", m))
            step = m
        else:  # adam
            b1, b2 = config.beta1, config.beta2
            m = b1 * layer.zo_m + (1 - b1) * ghat
            v = b2 * layer.zo_v + (1 - b2) * ghat * ghat
            t = layer.zo_t + 1
            mhat = m / (1 - torch.pow(torch.full_like(t, b1), t))
            vhat = v / (1 - torch.pow(torch.full_like(t, b2), t))
            news += [("zo_m", m), ("zo_v", v), ("zo_t", t)]
            step = mhat / (torch.sqrt(vhat) + ADAM_DELTA)
        if name == "hizoo":
            a = config.hessian_smoothing
            c = curv.to(z.dtype).reshape(-1, 1, 1)
            h = layer.zo_h
            news.append(("zo_h", (1 - a) * h + a * (c * h.unsqueeze(0) * z * z).mean(0)))
        out.append([("lora_B", b - lr * step), *news])
    return out


def finite_and_bounded(proposed, limit: float):
    """0-d bool: every proposed B within ``limit`` in magnitude (NaN fails) and every state finite."""
    checks = []
    for news in proposed:
        for attr, new in news:
            checks.append((new.abs() <= limit).all() if attr == "lora_B" else torch.isfinite(new).all())
    return torch.stack(checks).all()
