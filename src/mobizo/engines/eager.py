"""The eager PyTorch engine: calls :class:`mobizo.step.ZOStep` (or the FO baseline) directly.

It runs on whatever device the model is on (``--device``, :mod:`mobizo.devices`): batches go there,
and what comes back (scores, logits, the adapter, the optimizer's state) comes back as CPU tensors.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

from ..devices import to_device
from ..errors import MobizoError
from ..mplora import adapter_state, load_adapter_state, make_trainable
from ..step import AnswerLoss, ZOConfig, ZOStep, answer_losses, choice_losses, lm_logits
from ..zo_optim import load_state, state_of
from . import Shapes, StepOutput

OPTIMIZERS = ("sgd", "adamw")


class EagerEngine:
    name = "eager"

    def __init__(
        self,
        model: torch.nn.Module,
        estimator: str | None,
        zo: ZOConfig | None = None,
        optimizer: str = "sgd",
        train_a: bool = False,
        weight_decay: float = 0.0,
        objective: str = "answer",
        choices: int = 0,
    ):
        self.model = model
        self.device = model_device(model)
        self.estimator = estimator
        self.shapes = Shapes()
        self.optimizer = None
        if estimator == "fo":
            if optimizer not in OPTIMIZERS:
                raise MobizoError(f"unknown --optimizer {optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
            params = make_trainable(model, train_a)
            cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW
            self.optimizer = cls(params, lr=0.0, weight_decay=weight_decay)
            self.loss = AnswerLoss(model, objective, choices)
        elif estimator is not None:  # None: an engine that only scores (eval)
            self.step = ZOStep(model, zo or ZOConfig(estimator=estimator))

    def _placed(self, batch):
        """``batch`` with its tensors on the model's device (itself on the CPU)."""
        if self.device.type == "cpu":
            return batch
        moved = {
            f.name: to_device(v, self.device)
            for f in dataclasses.fields(batch)
            if isinstance(v := getattr(batch, f.name), torch.Tensor)
        }
        return dataclasses.replace(batch, **moved)

    def train_step(self, batch, step: int, lr: float, eps: float) -> StepOutput:
        batch = self._placed(batch)
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss(batch.input_ids, batch.attention_mask, batch.labels, batch.gold, shared=batch.shared)
            if torch.isfinite(loss):  # the divergence guard: a non-finite loss leaves the adapter untouched
                loss.backward()
                self.optimizer.step()
            return StepOutput(loss=float(loss))
        with torch.no_grad():
            losses, grads, *curvature = self.step(
                batch.input_ids,
                batch.attention_mask,
                batch.labels,
                torch.tensor(step, dtype=torch.int64),
                torch.tensor(lr, dtype=torch.float32),
                torch.tensor(eps, dtype=torch.float32),
                batch.gold,
                shared=batch.shared,
            )
        extra = {"curvature": curvature[0].tolist()} if curvature else {}  # HiZOO's, logged for replay
        return StepOutput(
            loss=float(losses.mean()), projected_grads=grads.tolist(), losses=losses.tolist(), extra=extra
        )

    @torch.no_grad()
    def score(self, batch):
        b = self._placed(batch)
        return tuple(t.cpu() for t in answer_losses(self.model, b.input_ids, b.attention_mask, b.labels))

    @torch.no_grad()
    def score_choices(self, batch):
        """Shared-prompt batch (:func:`mobizo.data.collate_choices`): (examples, choices) CE and counts."""
        b = self._placed(batch)
        return tuple(t.cpu() for t in choice_losses(self.model, b.input_ids, b.attention_mask, b.labels))

    @torch.no_grad()
    def next_token_logits(self, input_ids, attention_mask):
        """Logits (rows, vocab), float32 on the CPU, for the token after each left-padded row (greedy generation)."""
        input_ids, attention_mask = to_device(input_ids, self.device), to_device(attention_mask, self.device)
        last = torch.tensor([input_ids.shape[1] - 1], device=self.device)
        return lm_logits(self.model, input_ids, attention_mask, last)[:, -1].float().cpu()

    @property
    def max_positions(self) -> int | None:
        """Positions the model can embed (its config's limit): a prompt and its continuation must fit them."""
        from ..models import max_positions

        return max_positions(self.model)

    def decoder(self, input_ids, attention_mask) -> KVDecoder:
        """Greedy decoding state with a KV cache, started on left-padded prompts (see :class:`KVDecoder`)."""
        return KVDecoder(self.model, input_ids, attention_mask)

    def adapter_state(self):
        """The adapter as float32 CPU tensors (whatever the device and the base's dtype)."""
        return adapter_state(self.model)

    def load_adapter_state(self, state) -> None:
        load_adapter_state(self.model, state)

    def optimizer_state(self):
        """FO: the torch optimizer's state dict; ZO: the update rule's state tensors (None if stateless); CPU tensors."""
        if self.optimizer is not None:
            return _to_cpu(self.optimizer.state_dict())
        step = getattr(self, "step", None)
        if step is None or not step.config.rule.spec.buffers():
            return None
        return {k: v.cpu() for k, v in state_of(step.update_layers(), step.layer_names, step.config.rule).items()}

    def load_optimizer_state(self, state) -> None:
        if self.optimizer is not None:
            if state is not None:
                self.optimizer.load_state_dict(state)
            return
        step = getattr(self, "step", None)
        if step is not None and step.config.rule.spec.buffers():
            load_state(step._layers(), step.layer_names, step.config.rule, state, "--resume")


def model_device(model) -> torch.device:
    """The device of a model's weights (the CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to_cpu(obj):
    """A torch optimizer's state dict with its tensors on the CPU (``load_state_dict`` moves them back)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class KVDecoder:
    """Incremental decoding with a KV cache: the prompts run once, then one token per row per step.

    ``logits`` (rows, vocab) predicts each row's next token; ``step(tokens)`` appends one token per
    row and returns the new ``logits``; ``keep(rows)`` drops finished rows from the batch (and the
    cache). Positions continue from each row's own length, so left padding is never attended to and
    the logits are those of an uncached forward over the whole sequence. The model and its cache stay
    on the model's device; ``logits`` are float32 CPU tensors (the sampler's seeded generator is the CPU's).
    """

    @torch.no_grad()
    def __init__(self, model, input_ids, attention_mask):
        from transformers import DynamicCache

        self.model = model
        self.device = model_device(model)
        input_ids, attention_mask = to_device(input_ids, self.device), to_device(attention_mask, self.device)
        self.mask = attention_mask
        self.cache = DynamicCache()
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        self.next_pos = attention_mask.sum(-1, keepdim=True)
        # the cache is updated in place; transformers names the argument ``cache`` since 5.x (``past_key_values``
        # before, still accepted with a deprecation warning)
        self.cache_arg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_arg: self.cache},
        )
        self.logits = out.logits[:, -1].float().cpu()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = to_device(tokens.reshape(-1, 1).to(torch.long), self.device)
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)], dim=1)
        out = self.model(
            input_ids=tokens,
            attention_mask=self.mask,
            position_ids=self.next_pos,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_arg: self.cache},
        )
        self.next_pos = self.next_pos + 1
        self.logits = out.logits[:, -1].float().cpu()
        return self.logits

    def keep(self, rows: list[int]) -> None:
        idx = torch.tensor(rows, dtype=torch.long)
        on_device = to_device(idx, self.device)
        self.cache.reorder_cache(on_device)
        self.mask, self.next_pos, self.logits = self.mask[on_device], self.next_pos[on_device], self.logits[idx]
