"""What an exported training program was built for: ``manifest.json`` beside ``train.pte``.

The manifest records the model, the sha256 of its base weights, the step's
configuration and shapes, the adapter layout, the tool versions and the
sha256 + size of the ``.pte``, so a mismatched or corrupted program is refused
with one clear line before the runtime sees it.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ... import __version__
from ...errors import MobizoError
from ...mplora import fan_in_fan_out, lora_layers
from ...step import ZOConfig

PROGRAM = "train.pte"
MANIFEST = "manifest.json"
METHODS = ("train_step", "score", "get_adapter", "set_adapter")
TOKENIZER = "tokenizer"  # the run's tokenizer, carried beside the program (Manifest.tokenizer)


@dataclass
class Manifest:
    model: str
    base_weights_sha256: str
    estimator: str
    queries: int
    seed: int
    data_mode: str
    weight_decay: float
    max_grad: float | None  # None: no bound (strict JSON has no infinity)
    objective: str
    choices: int
    batch_size: int  # examples per step
    max_length: int  # T
    answer_len: int  # K
    eval_rows: int
    rank: int
    alpha: float
    target_modules: list[str]
    adapter_shapes: dict[str, list[int]]
    xnnpack: bool = True
    # choice objective with one-token candidates: rows are examples (prompt only) and the labels input
    # is (rows, choices) candidate token ids read at the last position (mobizo.step.choice_losses)
    shared_prompt: bool = False
    # the sequence length is symbolic in train_step and score: any T <= max_length runs (batches are
    # padded to their own longest row, as in the eager engine); max_length sizes the memory plan.
    # False (--fixed-length, bundles, or a model whose code pins the length): exactly max_length
    dynamic_length: bool = True
    # the frozen base's quantization (mobizo.quantize): scheme, resolved group size, embeddings too
    quantize: str = "none"
    group_size: int | None = None
    quantize_embeddings: bool = False
    # --target-modules as asked (None: the architecture's default), which with the base weights and
    # this mobizo version determines target_modules: a run on the program is checked against it
    target_spec: list[str] | None = None
    fan_in_fan_out: bool = False  # the adapted layers are Conv1D (GPT-2): PEFT's flag in the adapter config
    # ``prefill`` / ``decode`` methods (generation over a KV cache of max_length positions, see .generate);
    # prefill_chunk: prompt tokens per prefill call
    generate: bool = False
    prefill_chunk: int = 0
    # the ZO update rule (mobizo.zo_optim) and its constants; a stateful rule's state is in mutable
    # buffers, read and set by the get_state / set_state methods
    optimizer: str = "sgd"
    beta1: float = 0.9
    beta2: float = 0.999
    hessian_smoothing: float = 1e-6
    # the rule's state tensors as get_state / set_state take them: [{"name", "shape", "init"}] (the native
    # trainer reads this, so that what a rule keeps is written down once, in mobizo.zo_optim)
    state: list[dict] = field(default_factory=list)
    # train_step's outputs after (losses, projected_grads), each (q,) and logged under its name
    step_extras: list[str] = field(default_factory=list)
    # the run's tokenizer, saved beside the program (a directory name; "" when not carried): a run on
    # the program loads it instead of the model's config and tokenizer (see ProgramBase)
    tokenizer: str = ""
    versions: dict = field(default_factory=dict)
    # seconds per export stage (tracing, lowering, serializing): a record of how it was made
    export_seconds: dict = field(default_factory=dict)
    pte_sha256: str = ""
    pte_bytes: int = 0

    @property
    def rows(self) -> int:
        """Rows of the train_step inputs (examples x candidates for the per-candidate choice objective)."""
        return self.batch_size * (self.choices if self.objective != "answer" and not self.shared_prompt else 1)

    @property
    def label_width(self) -> int:
        """Columns of the ``labels`` input: the answer window K, or the candidates with a shared prompt."""
        return self.choices if self.shared_prompt else self.answer_len

    def zo_config(self) -> ZOConfig:
        return ZOConfig(
            self.estimator,
            self.queries,
            self.seed,
            self.data_mode,
            self.weight_decay,
            math.inf if self.max_grad is None else self.max_grad,
            self.objective,
            self.choices,
            self.optimizer,
            self.beta1,
            self.beta2,
            self.hessian_smoothing,
        )

    @property
    def state_names(self) -> list[str]:
        """``<layer>.zo_<s>`` of the rule's state tensors, in the order get_state / set_state take them."""
        return [s["name"] for s in self.state]


def versions() -> dict:
    from importlib.metadata import version

    import executorch  # noqa: F401

    return {
        "mobizo": __version__,
        "torch": torch.__version__,
        "executorch": version("executorch"),
        "python": platform.python_version(),
    }


def read_manifest(program_dir: Path) -> Manifest:
    path = Path(program_dir) / MANIFEST
    if not path.is_file():
        raise MobizoError(f"{program_dir} has no {MANIFEST} (export a program with 'mobizo export')")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Manifest(**raw)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise MobizoError(f"{path}: malformed manifest ({e})") from e


def check_manifest(m: Manifest, expected: dict) -> None:
    """Refuse a program built for something else: one line naming the first difference."""
    have = asdict(m)
    for key, want in expected.items():
        if have.get(key) != want:
            raise MobizoError(f"program was built with {key}={have.get(key)!r}, this run needs {want!r} (re-export it)")
    cur = versions()
    for key in ("mobizo", "torch", "executorch"):
        if m.versions.get(key) != cur[key]:
            raise MobizoError(f"program was built with {key} {m.versions.get(key)}, this is {cur[key]} (re-export it)")


@dataclass
class ProgramBase:
    """The base model as its exported program describes it: what a run on the program needs of the
    model (the adapter's layout, PEFT's ``fan_in_fan_out``) without the architecture or the weights.

    It stands in for the model in a run on a given program (:func:`mobizo.build.assemble`), so that
    the run never imports the model's code: building even a weightless Hugging Face architecture
    imports transformers' config and modeling modules and, through them, ``torch._dynamo``
    (~155 MiB resident before anything runs). The identity check still holds: the program's
    adapter layout follows from what the run is checked on (base weights, ``target_spec``, rank,
    seed, mobizo version)."""

    adapter_shapes: dict[str, list[int]]
    fan_in_fan_out: bool = False

    @classmethod
    def of(cls, m: Manifest) -> ProgramBase:
        return cls(dict(m.adapter_shapes), m.fan_in_fan_out)


def rule_state(rule, adapter_shapes: dict[str, list[int]]) -> list[dict]:
    """:attr:`Manifest.state` of an update rule (:class:`mobizo.zo_optim.RuleConfig`) over these layers."""
    spec = rule.spec
    return [
        {"name": f"{n}.{b}", "shape": [1] if b == "zo_t" else list(shape), "init": 0.0 if b == "zo_t" else spec.init}
        for n, shape in adapter_shapes.items()
        for b in spec.buffers()
    ]


def adapter_layout(model) -> tuple[dict[str, list[int]], bool]:
    """({adapted module: B's shape}, fan_in_fan_out) of a model with MP-LoRA layers, or of a :class:`ProgramBase`."""
    if isinstance(model, ProgramBase):
        return dict(model.adapter_shapes), model.fan_in_fan_out
    return {n: list(layer.lora_B.shape) for n, layer in lora_layers(model)}, fan_in_fan_out(model)


def manifest_for(
    model,
    model_name,
    zo: ZOConfig,
    batch_size,
    max_length,
    answer_len,
    eval_rows,
    rank,
    alpha,
    base_hash,
    shared_prompt: bool | None = None,
    quantization: dict | None = None,
    target_spec: list[str] | None = None,
    fixed_length: bool = False,
    generate: bool = True,
):
    """``shared_prompt=None``: share the prompt exactly when it is exact (choice objective, every
    candidate one token: ``answer_len == 1``). ``model``: with MP-LoRA layers, or a :class:`ProgramBase`.
    ``fixed_length``: trace for exactly ``max_length`` tokens (a quicker export, no symbolic length).
    ``generate``: add the ``prefill`` / ``decode`` methods."""
    from .generate import prefill_chunk

    shapes, fan = adapter_layout(model)
    if shared_prompt is None:
        shared_prompt = zo.objective != "answer" and answer_len == 1
    if shared_prompt and (zo.objective == "answer" or answer_len != 1):
        raise MobizoError("a shared-prompt program needs the choice objective and one-token candidates")
    return Manifest(
        model=model_name,
        base_weights_sha256=base_hash,
        estimator=zo.estimator,
        queries=zo.queries,
        seed=zo.seed,
        data_mode=zo.data_mode,
        weight_decay=zo.weight_decay,
        max_grad=zo.max_grad if math.isfinite(zo.max_grad) else None,
        optimizer=zo.optimizer,
        beta1=zo.beta1,
        beta2=zo.beta2,
        hessian_smoothing=zo.hessian_smoothing,
        state=rule_state(zo.rule, shapes),
        step_extras=["curvature"] if zo.rule.spec.center else [],
        objective=zo.objective,
        choices=zo.choices,
        batch_size=batch_size,
        max_length=max_length,
        answer_len=answer_len,
        eval_rows=eval_rows,
        rank=rank,
        alpha=alpha,
        target_modules=list(shapes),
        adapter_shapes=shapes,
        target_spec=None if target_spec is None else list(target_spec),
        fan_in_fan_out=fan,
        shared_prompt=shared_prompt,
        dynamic_length=max_length > 2 and not fixed_length,
        generate=generate,
        prefill_chunk=prefill_chunk(max_length) if generate else 0,
        **(quantization or {}),
    )


def identity(m: Manifest) -> dict:
    """The manifest fields a run must agree on."""
    d = asdict(m)
    # the weights' sha256 names the model; dynamic_length is how the export could trace it, not a choice of the
    # run; whether it generates is checked where generation is asked for (it does not change training)
    for k in (
        "model",
        "xnnpack",
        "dynamic_length",
        "generate",
        "prefill_chunk",
        "tokenizer",
        "versions",
        "export_seconds",
        "pte_sha256",
        "pte_bytes",
    ):
        d.pop(k)
    return d
