"""The ZO training step: one module used by the eager engine, the benchmarks and the ExecuTorch export.

:class:`ZOStep` performs a whole P-RGE step in ``forward``:

1. make z_i for every adapted layer and direction i from (seed, step) (:mod:`mobizo.perturb`);
2. for each forward pass of the estimator's plan, give every layer its perturbed copies
   ``B + sign * eps * z_i`` (MP-LoRA) and run the model once over the copy-major batch;
3. per-copy masked token losses (logits only at the answer positions);
4. projected gradients g_i = (L+_i - L-_i) / (2 eps);
5. in-place update B <- B - lr * (mean_i g_i z_i + wd * B), unless the divergence guard
   rejects the step (non-finite losses or g, |g| > max_grad, or an update that overflows B);

and returns (losses, g). The estimators differ only in how copies are grouped
into forward passes, so with the same seed they compute the same update:

* ``prge``: one pass with 2q copies (+eps z_0 .. +eps z_{q-1}, -eps z_0 .. -eps z_{q-1});
* ``prge-outer``: two passes with q copies (all +, then all -);
* ``mezo``: 2q passes with one copy each (+z_0, -z_0, +z_1, ...): MeZO when q=1.

Everything is static-shape tensor code with B in buffers, so ``torch.export``
captures the step (including the buffer update) as a single graph.

On a device other than the CPU (``--device cuda``/``mps``, :mod:`mobizo.devices`) only step 2-3 run
there: z is made on the CPU and moved to the device once per step, the losses come back, and steps
4-5 run on float32 CPU copies of B and the rule's state (:class:`HostLayer`), which are then copied
to the device. So B's trajectory is the CPU's bit for bit given the same losses: ``mobizo replay``
(on the CPU) rebuilds a GPU run's adapter exactly, and a run resumes on either device.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .devices import to_device
from .errors import MobizoError
from .mplora import MPLoRALinear, lora_layers
from .perturb import layers_noise
from .zo_optim import RuleConfig, curvature, directions, ensure_state, finite_and_bounded, proposals

ZO_ESTIMATORS = ("prge", "prge-outer", "mezo")
# "answer": mean cross-entropy of the answer tokens. "choice-sum" / "choice-mean": cross-entropy
# over the candidates' total / per-token log-likelihoods (MeZO's train_as_classification).
OBJECTIVES = ("answer", "choice-sum", "choice-mean")
ESTIMATORS = ZO_ESTIMATORS + ("fo",)
DATA_MODES = ("repeat", "split")


@dataclass(frozen=True)
class ZOConfig:
    estimator: str = "prge"
    queries: int = 4
    seed: int = 0
    data_mode: str = "repeat"
    weight_decay: float = 0.0
    max_grad: float = float("inf")  # |g| above this (or non-finite losses) -> the step is skipped in-graph
    objective: str = "answer"
    choices: int = 0  # candidates per example (rows per example) for the choice objectives
    # the update rule and its constants (mobizo.zo_optim)
    optimizer: str = "sgd"
    beta1: float = 0.9
    beta2: float = 0.999
    hessian_smoothing: float = 1e-6

    @property
    def rule(self) -> RuleConfig:
        return RuleConfig(self.optimizer, self.beta1, self.beta2, self.hessian_smoothing)

    def __post_init__(self):
        if self.estimator not in ZO_ESTIMATORS:
            raise MobizoError(f"unknown ZO estimator {self.estimator!r} (choose from {', '.join(ZO_ESTIMATORS)})")
        if self.queries < 1:
            raise MobizoError(f"--queries must be >= 1, got {self.queries}")
        if self.objective not in OBJECTIVES:
            raise MobizoError(f"unknown objective {self.objective!r} (choose from {', '.join(OBJECTIVES)})")
        if self.objective != "answer" and self.choices < 2:
            raise MobizoError("the choice objective needs at least two candidates per example")
        if self.data_mode not in DATA_MODES:
            raise MobizoError(f"unknown --data-mode {self.data_mode!r} (choose from {', '.join(DATA_MODES)})")
        _ = self.rule  # validates the rule and its constants

    def check_batch(self, batch_size: int) -> None:
        if self.data_mode == "split" and batch_size % self.queries:
            raise MobizoError(
                f"--data-mode split needs --batch-size divisible by --queries ({batch_size} % {self.queries} != 0)"
            )


CENTER = (0, 0.0)  # the unperturbed copy (B + 0 * z_0 = B), for rules that need L0 (HiZOO)


def forward_plan(estimator: str, q: int, directions=None, center: bool = False) -> list[list[tuple[int, float]]]:
    """Forward passes, each a list of (direction, sign) copies in batch order (of ``directions``, default all q);
    ``center``: one more copy with B unperturbed (:data:`CENTER`), in the first pass (mezo: a pass of its own)."""
    dirs = range(q) if directions is None else directions
    plus = [(i, 1.0) for i in dirs]
    minus = [(i, -1.0) for i in dirs]
    mid = [CENTER] if center else []
    if estimator == "prge":
        return [plus + minus + mid]
    if estimator == "prge-outer":
        return [plus + mid, minus]
    if estimator == "mezo":
        return [[c] for i in dirs for c in ((i, 1.0), (i, -1.0))] + ([mid] if center else [])
    raise MobizoError(f"unknown ZO estimator {estimator!r}")


def answer_losses(model: nn.Module, input_ids, attention_mask, labels):
    """Per-row summed cross-entropy over the answer window and per-row token counts.

    Only the K positions that predict answer tokens are projected to the
    vocabulary (``logits_to_keep``), never the whole sequence.
    """
    T, K = input_ids.shape[1], labels.shape[1]
    logits = lm_logits(model, input_ids, attention_mask, torch.arange(T - K - 1, T - 1))
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).reshape(labels.shape)
    valid = labels != -100
    ce = torch.where(valid, ce, torch.zeros_like(ce))
    return ce.sum(-1), valid.sum(-1)


@functools.cache
def _forward_takes(cls: type) -> frozenset[str] | None:
    """Keyword arguments ``cls.forward`` names, or None when it takes ``**kwargs`` (then: anything)."""
    try:
        params = inspect.signature(cls.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def lm_logits(model: nn.Module, input_ids, attention_mask, keep: torch.Tensor):
    """Logits (rows, len(keep), vocab) at sequence positions ``keep`` of left-padded rows.

    Passes ``position_ids`` counted from the mask (left padding must not shift RoPE or learned
    positions), ``logits_to_keep`` (the LM head runs on ``keep`` only) and ``use_cache=False``
    to models whose forward takes them; a model that does not gets its logits sliced afterwards.
    """
    takes = _forward_takes(type(model))
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    extra = {"position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0), "logits_to_keep": keep, "use_cache": False}
    kwargs.update({k: v for k, v in extra.items() if takes is None or k in takes})
    out = model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if logits.shape[1] != keep.shape[0]:  # the model ignored logits_to_keep
        logits = logits[:, keep]
    return logits


def choice_losses(model: nn.Module, input_ids, attention_mask, candidates, normalized: bool = True):
    """Shared-prompt scoring: rows are prompts, ``candidates`` (rows, C) the candidates' single token ids.

    Returns (rows, C) cross-entropies ``-log p(candidate | prompt)``, all read from the logits at the
    last position (one LM-head row per prompt), and (rows, C) token counts (1, or 0 where a
    candidate is -100: a missing candidate or a filler row). For one-token candidates this equals
    :func:`answer_losses` over one row per (prompt, candidate): causal attention means the prompt's
    last position never sees the candidate token that follows it.

    ``normalized=False`` (the training step): ``-logit(candidate)`` instead, from the candidates' rows
    of the LM head only (:func:`candidate_logits`). The choice objectives are a softmax over the
    candidates, which cancels the log-softmax's normalizer, so the training loss is the same; the
    full head never runs, and the exported step holds no packed copy of it (the vocabulary-sized
    matrix is read only at the candidates' rows). Evaluation keeps the normalized log-probabilities.
    """
    valid = candidates != -100
    ids = torch.where(valid, candidates, torch.zeros_like(candidates))
    if normalized:
        T = input_ids.shape[1]
        logits = lm_logits(model, input_ids, attention_mask, torch.arange(T - 1, T))[:, -1]
    else:
        logits = candidate_logits(model, input_ids, attention_mask, ids)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    ce = -torch.log_softmax(logits, dim=-1).gather(1, ids) if normalized else -logits
    return torch.where(valid, ce, torch.zeros_like(ce)), valid.long()


class _CandidateHead(nn.Module):
    """Stands in for a model's LM head for one call: the logits of each row's candidate tokens only."""

    def __init__(self, head: nn.Linear, candidates: torch.Tensor):
        super().__init__()
        self.head, self.candidates, self.called = head, candidates, False

    def forward(self, hidden):  # (rows, k, hidden) -> (rows, k, C)
        self.called = True
        w = F.embedding(self.candidates, self.head.weight)  # (rows, C, hidden): a gather, no packed matrix
        out = torch.matmul(hidden, w.transpose(1, 2))
        if self.head.bias is not None:
            out = out + F.embedding(self.candidates, self.head.bias.unsqueeze(-1)).squeeze(-1).unsqueeze(1)
        return out


def plain_head(model: nn.Module) -> tuple[nn.Module, str, nn.Linear] | None:
    """(parent, attribute, head) when the model's LM head is a plain float ``nn.Linear`` (not quantized,
    not adapted), so that its candidates' rows can be read directly; else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear or not head.weight.is_floating_point():
        return None
    if any(c.__module__.startswith("torchao") for c in type(head.weight).__mro__):
        return None  # a quantized weight (--quantize-embeddings): rows are not plain slices of it
    for name, m in model.named_modules():
        if m is head:
            parent, _, attr = name.rpartition(".")
            return model.get_submodule(parent), attr, head
    return None


def candidate_logits(model: nn.Module, input_ids, attention_mask, candidates):
    """(rows, C) logits of each row's candidate token ids at the last position of left-padded rows,
    through the model's own forward (its final norm, logit scaling or soft-capping included) with the
    LM head swapped for the candidates' rows of it; the full logits' columns when the head is not a
    plain linear (quantized, adapted) or the model did not call it."""
    T = input_ids.shape[1]
    keep = torch.arange(T - 1, T)
    found = plain_head(model)
    if found is not None:
        parent, attr, head = found
        sub = _CandidateHead(head, candidates)
        setattr(parent, attr, sub)
        try:
            logits = lm_logits(model, input_ids, attention_mask, keep)
        finally:
            setattr(parent, attr, head)
        if sub.called and logits.shape[-1] == candidates.shape[1]:
            return logits[:, -1]
    return lm_logits(model, input_ids, attention_mask, keep)[:, -1].gather(1, candidates)


def row_losses(model: nn.Module, input_ids, attention_mask, labels, shared: bool = False, normalized: bool = True):
    """:func:`choice_losses` (shared prompt: ``labels`` holds candidate ids) or :func:`answer_losses`."""
    if shared:
        return choice_losses(model, input_ids, attention_mask, labels, normalized)
    return answer_losses(model, input_ids, attention_mask, labels)


def objective_loss(sums, counts, gold, objective: str = "answer", choices: int = 0):
    """Loss of each group (copy) of rows; ``sums``/``counts`` are (groups, rows), ``gold`` (groups, examples).

    For the choice objectives the rows of a group are example-major, ``choices`` per example: one row
    per (example, candidate), or with a shared prompt the flattened (examples, choices) scores.
    """
    if objective == "answer":
        return sums.sum(-1) / counts.sum(-1).clamp(min=1)
    groups = sums.shape[0]
    s, c = sums.reshape(groups, -1, choices), counts.reshape(groups, -1, choices)
    score = -s if objective == "choice-sum" else -s / c.clamp(min=1)
    score = torch.where(c > 0, score, torch.full_like(score, -1e4))  # filler candidates never win
    ce = F.cross_entropy(score.reshape(-1, choices), gold.reshape(-1), ignore_index=-100, reduction="none")
    valid = (gold != -100).reshape(groups, -1)
    ce = torch.where(valid, ce.reshape(groups, -1), torch.zeros_like(score[..., 0]))
    return ce.sum(-1) / valid.sum(-1).clamp(min=1)


def _copy_rows(t: torch.Tensor, copies: list[tuple[int, float]], queries: int, split: bool) -> torch.Tensor:
    """The copy-major batch of one pass: the whole batch per copy, or direction i's chunk in split mode."""
    if not split:
        return t.repeat(len(copies), *([1] * (t.dim() - 1)))
    chunks = t.chunk(queries, dim=0)
    return torch.cat([chunks[d] for d, _ in copies], dim=0)


def _directions(z: torch.Tensor, copies: list[tuple[int, float]], queries: int) -> torch.Tensor:
    """z's directions in the order of a pass's copies, as views/concats (no per-copy stack)."""
    if len(copies) > 1 and copies[-1] == CENTER:  # the unperturbed copy: any direction, times 0
        return torch.cat([_directions(z, copies[:-1], queries), z[:1]])
    dirs = [d for d, _ in copies]
    ordered = list(range(queries))
    if dirs == ordered:
        return z
    if dirs == ordered * 2:
        return torch.cat([z, z])
    if len(dirs) == 1:
        return z[dirs[0] : dirs[0] + 1]
    # a contiguous subset of the directions (one rank's share, see mobizo.distributed): once, or + then -
    a, n = dirs[0], len(dirs) // 2
    if dirs == list(range(a, a + len(dirs))):
        return z[a : a + len(dirs)]
    if dirs == list(range(a, a + n)) * 2:
        return torch.cat([z[a : a + n], z[a : a + n]])
    return torch.stack([z[d] for d in dirs])


@functools.cache
def _noise_thread():
    """One background thread that makes the next step's noise for models off the CPU."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(1, thread_name_prefix="mobizo-noise")


def host_update(device: torch.device) -> bool:
    """Whether a model on ``device`` gets its update from CPU copies of B (:class:`HostLayer`): off the CPU.
    (A test patches this to run that path on the CPU.)"""
    return device.type != "cpu"


class HostLayer:
    """A CPU copy of one MP-LoRA layer's B and update-rule state (``lora_B``, ``zo_*``): what the update
    changes when the model runs on another device (the update reads and writes these attributes only)."""

    def __init__(self, layer: MPLoRALinear, names: tuple[str, ...]):
        self.names = ("lora_B", *names)
        for name in self.names:
            setattr(self, name, getattr(layer, name).detach().to("cpu", copy=True))

    def mirror(self, layer: MPLoRALinear) -> None:
        """Copy the values to the device layer (exact: same dtype)."""
        for name in self.names:
            getattr(layer, name).copy_(getattr(self, name))


class ZOStep(nn.Module):
    """A whole zeroth-order step over a model with MP-LoRA layers (see module docstring)."""

    def __init__(self, model: nn.Module, config: ZOConfig, shared_prompt: bool = False):
        super().__init__()
        self.model = model
        self.config = config
        # rows are examples and ``labels`` the candidates' token ids (see :func:`choice_losses`)
        self.shared_prompt = shared_prompt
        self.layer_names = [n for n, _ in lora_layers(model)]
        if not self.layer_names:
            raise MobizoError("the model has no MP-LoRA layers (inject adapters first)")
        self.plan = forward_plan(config.estimator, config.queries, center=config.rule.spec.center)
        if config.rule.spec.center and config.data_mode == "split":
            raise MobizoError(
                f"--optimizer {config.optimizer} needs the whole batch's unperturbed loss; use --data-mode repeat"
            )
        ensure_state(self._layers(), config.rule)
        self._host: list[HostLayer] | None = None
        self._host_versions: list[int] = []
        self._ahead = None  # (step, future of its noise): the device path's prefetch (see noise)

    def _layers(self) -> list[MPLoRALinear]:
        return [self.model.get_submodule(n) for n in self.layer_names]

    def update_layers(self) -> list:
        """The layers whose B and rule state the update changes: the model's own on the CPU; on another
        device their float32 CPU copies (:class:`HostLayer`), remade from the model's whenever those were
        written by anything but the update (a loaded adapter or checkpoint: their version counters moved)."""
        layers = self._layers()
        if not host_update(layers[0].lora_B.device):
            return layers
        if self._host is None or self._host_versions != self._versions(layers):
            self._host = [HostLayer(layer, self.config.rule.spec.buffers()) for layer in layers]
            self._host_versions = self._versions(layers)
        return self._host

    def _versions(self, layers) -> list[int]:
        names = ("lora_B", *self.config.rule.spec.buffers())
        return [getattr(layer, n)._version for layer in layers for n in names]

    def directions(self, zs) -> list[torch.Tensor]:
        """The perturbation directions of the step's noise ``zs`` (:func:`mobizo.zo_optim.directions`)."""
        return directions(self.update_layers(), zs, self.config.rule)

    def noise(self, step) -> list[torch.Tensor]:
        """z for every layer: (q, out, r) each, from (seed, step, layer index). Made on the CPU whatever the
        model's device (the same bits everywhere); :meth:`losses` moves it.

        For a model on another device, step s+1's z is made on a CPU thread while step s runs there (z is
        a pure function of the step): the hashing costs ~0.15-0.4 us per element and core, comparable to an
        accelerator's whole step at large q (docs/devices.md)."""
        layers = self._layers()
        if not host_update(layers[0].lora_B.device):
            return self._noise(step)
        s = int(step)
        ahead, self._ahead = self._ahead, None
        zs = ahead[1].result() if ahead is not None and ahead[0] == s else self._noise(torch.tensor(s))
        self._ahead = (s + 1, _noise_thread().submit(self._noise, torch.tensor(s + 1)))
        return zs

    def _noise(self, step) -> list[torch.Tensor]:
        layers = self._layers()
        shapes = [tuple(layer.lora_B.shape) for layer in layers]
        return layers_noise(self.config.seed, step, shapes, self.config.queries, layers[0].lora_B.dtype)

    def forward(self, input_ids, attention_mask, labels, step, lr, eps, gold=None, shared: bool | None = None):
        zs = self.noise(step)
        dirs = self.directions(zs)
        plus, minus, *center = self.losses(dirs, input_ids, attention_mask, labels, eps, gold, shared=shared)
        return self.update(zs, plus, minus, lr, eps, center=center[0] if center else None, dirs=dirs)

    def losses(
        self, zs, input_ids, attention_mask, labels, eps, gold=None, directions=None, shared: bool | None = None
    ):
        """(L+, L-): the per-copy losses of ``directions`` (a range of direction indices; default all q),
        each (len(directions),), then the unperturbed loss L0 (0-d) when the rule needs it, without
        touching B. ``zs``: the step's perturbation directions (:meth:`noise`, through
        :func:`mobizo.zo_optim.directions`), all q of them. A subset runs only its own copies
        (:mod:`mobizo.distributed` splits the q directions over ranks)."""
        cfg = self.config
        q, split = cfg.queries, cfg.data_mode == "split"
        if split:
            cfg.check_batch(input_ids.shape[0] if gold is None else gold.shape[0])
        shared = self.shared_prompt if shared is None else shared
        if shared and cfg.objective == "answer":
            raise MobizoError("a shared-prompt batch needs a choice objective")
        layers = self._layers()
        # to the model's device, once per step (no-ops on the CPU, and in an exported graph)
        device = layers[0].lora_B.device
        zs = [to_device(z, device) for z in zs]
        input_ids, attention_mask, labels = (to_device(t, device) for t in (input_ids, attention_mask, labels))
        gold = None if gold is None else to_device(gold, device)
        dirs = list(range(q)) if directions is None else list(directions)
        center = cfg.rule.spec.center
        plan = self.plan if directions is None else forward_plan(cfg.estimator, q, dirs, center)
        loss_of: dict[tuple[int, float], torch.Tensor] = {}
        try:
            for copies in plan:
                signs = torch.tensor([s for _, s in copies], dtype=torch.float32)
                if isinstance(eps, torch.Tensor):
                    signs = to_device(signs, eps.device)
                coef = to_device((eps * signs).to(zs[0].dtype), device).reshape(-1, 1, 1)
                for layer, z in zip(layers, zs):
                    layer.copies = layer.lora_B.unsqueeze(0) + coef * _directions(z, copies, q)
                sums, counts = row_losses(
                    self.model,
                    _copy_rows(input_ids, copies, q, split),
                    _copy_rows(attention_mask, copies, q, split),
                    _copy_rows(labels, copies, q, split),
                    shared,
                    normalized=False,  # the choice objectives need only the candidates' logits
                )
                n = len(copies)
                gold_rows = None if gold is None else _copy_rows(gold, copies, q, split).reshape(n, -1)
                per_copy = objective_loss(
                    sums.reshape(n, -1), counts.reshape(n, -1), gold_rows, cfg.objective, cfg.choices
                )
                for j, c in enumerate(copies):
                    loss_of[c] = per_copy[j]
        finally:
            for layer in layers:
                layer.copies = None
        plus = torch.stack([loss_of[(i, 1.0)] for i in dirs])
        minus = torch.stack([loss_of[(i, -1.0)] for i in dirs])
        return (plus, minus, loss_of[CENTER]) if center else (plus, minus)

    def update(self, zs, plus, minus, lr, eps, grads=None, center=None, dirs=None):
        """g = (L+ - L-) / 2eps over all q directions (or the given ``grads``), the divergence guard and the
        rule's in-place update of B and its state: what :meth:`forward` does after :meth:`losses`.
        ``zs``: the step's noise; ``dirs``: the perturbation directions (default: from ``zs``); ``center``:
        the unperturbed loss (rules that need it). Returns (losses, g), plus HiZOO's curvature scalars."""
        cfg = self.config
        rule = cfg.rule
        layers = self.update_layers()
        # everything the update reads on the update layers' device: the CPU (no-ops there)
        host = layers[0].lora_B.device
        plus, minus, lr, eps, grads, center = (
            to_device(t, host) if isinstance(t, torch.Tensor) else t for t in (plus, minus, lr, eps, grads, center)
        )
        zs = [to_device(z, host) for z in zs]
        dirs = None if dirs is None else [to_device(d, host) for d in dirs]
        if grads is None:
            grads = (plus - minus) / (2 * eps)
        # Divergence guard, in-graph: a bad step (non-finite loss or g, or |g| > max_grad) leaves B untouched.
        ok = guard_ok(plus, minus, grads, cfg.max_grad)
        curv = None
        if rule.spec.center:
            curv = curvature(plus, minus, center, eps)
            ok = ok & torch.isfinite(curv).all()
            curv = torch.where(ok, curv, torch.zeros_like(curv))
        dirs = directions(layers, zs, rule) if dirs is None else dirs
        stateful = bool(rule.spec.buffers())
        applied = apply_rule(
            layers,
            zs,
            dirs,
            torch.where(ok, grads, torch.zeros_like(grads)),
            torch.where(ok, lr, 0.0),
            rule,
            cfg.weight_decay,
            curv,
            ok if stateful else None,
        )
        if isinstance(layers[0], HostLayer):  # the model's device gets the new B (and state) from the CPU copies
            model_layers = self._layers()
            for layer, copy in zip(model_layers, layers):
                copy.mirror(layer)
            self._host_versions = self._versions(model_layers)
        # An update that would have overflowed B was not applied either: report its g as NaN so the
        # host (and the log, and `mobizo replay`) count the step as skipped.
        out = torch.stack([plus, minus]), torch.where(applied, grads, torch.full_like(grads, float("nan")))
        return out if curv is None else (*out, curv)


# The largest |B| an update may produce. A LoRA B entry of this size makes the adapter's output
# dwarf the frozen layer's (activations are O(1)), and past ~1e19 squares overflow fp32 inside the
# model's norms, which then silently zero the hidden states (every loss equal, every g = 0). So an
# update beyond it is an overflow, whatever the lr: the guard refuses it.
B_LIMIT = 1e6


def apply_rule(layers, zs, dirs, grads, lr, rule: RuleConfig, weight_decay: float = 0.0, curv=None, ok=None):
    """The rule's update of every B and its state (:func:`mobizo.zo_optim.proposals`), in place. Shared by
    the step and ``mobizo replay``.

    All-or-nothing: if the new value of any B would be non-finite or beyond :data:`B_LIMIT` (an
    overflow), or a state would be non-finite, nothing changes; ``ok`` (0-d bool) also holds the state
    back on a step the guard rejected (B is held back by a zero lr). Returns whether the update was
    applied (0-d bool tensor).
    """
    proposed = proposals(layers, zs, dirs, grads, lr, rule, weight_decay, curv)
    applied = finite_and_bounded(proposed, B_LIMIT)
    keep_state = applied if ok is None else applied & ok
    for layer, news in zip(layers, proposed):
        for attr, new in news:
            current = getattr(layer, attr)
            current.copy_(torch.where(applied if attr == "lora_B" else keep_state, new, current))
    return applied


def guard_ok(plus, minus, grads, max_grad: float):
    """The divergence guard as a 0-d bool tensor: all losses and g finite, every |g| <= max_grad."""
    return (
        torch.isfinite(plus).all()
        & torch.isfinite(minus).all()
        & torch.isfinite(grads).all()
        & (grads.abs() <= max_grad).all()
    )


def step_is_good(losses, grads, max_grad: float = float("inf")) -> bool:
    """Host-side twin of the in-graph guard (same float32 comparisons), for logging and counting skipped steps."""
    losses = torch.as_tensor(losses, dtype=torch.float32).reshape(-1)
    grads = torch.as_tensor(grads, dtype=torch.float32).reshape(-1)
    return bool(guard_ok(losses, losses[:0], grads, max_grad))


def step_good(res, max_grad: float | None) -> bool:
    """:func:`step_is_good` of an engine's :class:`~mobizo.engines.StepOutput` (``max_grad`` None: no bound):
    the verdict the trainer logs and :mod:`mobizo.bundle` checks a program's steps with."""
    losses = res.losses if res.losses else [res.loss]
    return step_is_good(losses, res.projected_grads, math.inf if max_grad is None else max_grad)


class AnswerLoss(nn.Module):
    """The training objective of one batch (no perturbation): the first-order baseline's loss."""

    def __init__(self, model: nn.Module, objective: str = "answer", choices: int = 0, shared_prompt: bool = False):
        super().__init__()
        self.model = model
        self.objective, self.choices = objective, choices
        self.shared_prompt = shared_prompt

    def forward(self, input_ids, attention_mask, labels, gold=None, shared: bool | None = None):
        shared = self.shared_prompt if shared is None else shared
        sums, counts = row_losses(self.model, input_ids, attention_mask, labels, shared)
        g = None if gold is None else gold[None]
        return objective_loss(sums[None], counts[None], g, self.objective, self.choices)[0]
