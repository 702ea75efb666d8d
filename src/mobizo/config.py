"""The run configuration: one :class:`TrainConfig` made of small parts, each field with its help text.

The command line is generated from these dataclasses (:func:`add_arguments`), so a flag, its
default, its type and its help live in one place. Every field name is unique across the parts, which
gives each setting one flat name: the ``--flag`` (``lr`` -> ``--lr``), the key in ``metrics.jsonl``'s
header and in ``state.json``, and the keyword of :meth:`TrainConfig.from_flat`.

* :class:`DataArgs`: the task and how its examples become sequences;
* :class:`AdapterArgs`: the MP-LoRA adapter (rank, alpha, target modules);
* :class:`OptimArgs`: the estimator and its update (q, lr, eps, guard, steps);
* :class:`QuantArgs`: the frozen base's quantization (:mod:`mobizo.quantize`);
* :class:`EngineArgs`: who runs the step (eager PyTorch or an ExecuTorch program), and where (device, dtype);
* :class:`RunArgs`: the run directory and its cadence (eval, checkpoints, resume).

``model``, ``seed`` and ``trust_remote_code`` sit on :class:`TrainConfig` itself: every command needs them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import MobizoError

ESTIMATORS = ("prge", "prge-outer", "mezo", "fo")
ZO_RULES = ("sgd", "momentum", "adam", "sign", "fzoo", "hizoo")  # mobizo.zo_optim.RULES
FO_OPTIMIZERS = ("sgd", "adamw")
ENGINES = ("eager", "executorch")
DEVICES = ("cpu", "cuda", "mps")  # mobizo.devices
DTYPES = ("float32", "bfloat16", "float16")
DIST_MODES = ("queries", "data", "federated")
DEFAULT_MAX_LENGTH = 128  # --max-length when not given, unless the model has fewer positions (build.assemble)


def opt(
    default: Any,
    help: str,
    *,
    choices=None,
    short: str | None = None,
    meta: str | None = None,
    trajectory: bool = False,
    recovery: bool = False,
    setting: bool = False,
    minimum: float | None = None,
    auto: bool = False,
):
    """A config field. ``trajectory``: it shapes the updates (a resumed run must keep it; ``recovery``
    ones may change, with a warning); ``setting``: a resumed run keeps it unless it is given again;
    ``auto``: a number, or the word ``auto`` (the run chooses it)."""
    md = dict(
        help=help,
        choices=choices,
        short=short,
        meta=meta,
        trajectory=trajectory,
        recovery=recovery,
        setting=setting,
        minimum=minimum,
        auto=auto,
    )
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=md)
    return field(default=default, metadata=md)


@dataclass
class DataArgs:
    task: str = opt(
        "synthetic",
        "task name: synthetic, sst2, rte, boolq, wic, wsc, multirc, mrpc, qqp, qnli, wnli, "
        "cb, copa, winogrande, arc-easy, arc-challenge, squad, drop, custom (prompt/completion, chat, or "
        "multiple-choice records with 'choices'), custom-cls (docs/tasks.md)",
        trajectory=True,
    )
    data: str | None = opt(None, "directory or file with the task's train/validation data", trajectory=True)
    template: str | None = opt(
        None,
        'prompt template of a custom classification or multiple-choice task, e.g. "Review: {text} Sentiment:"',
        trajectory=True,
    )
    label_words: str | None = opt(
        None,
        "comma-separated label words (custom classification, or to override a benchmark's), e.g. bad,good",
        trajectory=True,
    )
    max_length: int | None = opt(
        None,
        f"max tokens per sequence (prompt + answer) (default: {DEFAULT_MAX_LENGTH}, or the model's positions if fewer)",
        trajectory=True,
        minimum=2,
    )
    truncation: str = opt(
        "left",
        "prompts longer than --max-length: cut from the left, or fail",
        choices=("left", "error"),
        trajectory=True,
    )
    train_examples: int | None = opt(
        None, "sample this many training examples (default: all)", trajectory=True, minimum=1
    )
    eval_examples: int | None = opt(500, "validation examples to evaluate (0 = all)", setting=True, minimum=0)
    eval_batch_size: int = opt(
        32,
        "rows per eval forward (an ExecuTorch program's score method takes at most --batch-size of them: its "
        "memory is held beside the training step's)",
        setting=True,
        minimum=1,
    )
    max_new_tokens: int = opt(32, "generation tasks: max tokens generated per answer", setting=True, minimum=1)


@dataclass
class AdapterArgs:
    rank: int = opt(8, "LoRA rank r", trajectory=True, minimum=1)
    alpha: float = opt(16.0, "LoRA alpha; the adapter is scaled by alpha/r", trajectory=True)
    target_modules: list[str] | None = opt(  # noqa: RUF009 - opt() is a dataclasses.field
        None,
        "comma-separated module names (suffix match, or a regex); default: per architecture",
        meta="NAMES",
        trajectory=True,
    )


@dataclass
class OptimArgs:
    estimator: str = opt(
        "prge",
        "prge: one forward over 2q copies; prge-outer: two forwards over q copies; mezo: "
        "2q sequential forwards; fo: backprop baseline on the same adapter",
        choices=ESTIMATORS,
        trajectory=True,
    )
    queries: int = opt(4, "query directions q per step", short="-q", trajectory=True, minimum=1)
    # Defaults from the lr/eps sweep on SmolLM2-135M (docs/real-models.md): they beat zero-shot
    # there with no tuning. A randomly initialised model (the built-in tiny) needs far larger steps.
    batch_size: int = opt(8, "examples per step", trajectory=True, minimum=1)
    data_mode: str = opt(
        "repeat",
        "repeat: every direction sees the whole batch; split: direction i sees the i-th 1/q of it",
        choices=("repeat", "split"),
        trajectory=True,
    )
    objective: str = opt(
        "auto",
        "answer: answer-token cross-entropy; choice: cross-entropy over the candidates' "
        "scores; auto: choice for classification / multiple choice",
        choices=("auto", "answer", "choice"),
        trajectory=True,
    )
    lr: float | str | None = opt(
        None,
        "learning rate (default: the update rule's: fzoo 0.03, sgd 0.01, momentum 0.001, adam 0.01, sign 0.01, "
        "hizoo 0.01; fo: sgd 0.01, adamw 0.001); auto: a short probe of a few learning rates at the start picks it "
        "(docs/optimizers.md)",
        trajectory=True,
        recovery=True,
        auto=True,
    )
    lr_schedule: str | None = opt(
        None,
        "learning-rate schedule over --steps (after the warmup); default: the update rule's (cosine for fzoo, "
        "constant for the others)",
        choices=("constant", "linear", "cosine"),
        trajectory=True,
    )
    warmup_steps: int = opt(0, "steps of linear warmup from 0 to --lr", trajectory=True, minimum=0)
    eps: float = opt(1e-2, "perturbation scale: B +- eps z_i", trajectory=True, recovery=True)
    weight_decay: float = opt(0.0, "weight decay on B", trajectory=True, minimum=0)
    max_grad: float | None = opt(
        None, "skip steps with a |projected gradient| above this (default: no bound)", trajectory=True, recovery=True
    )
    max_bad_steps: int = opt(3, "stop after this many consecutive skipped steps", setting=True, minimum=1)
    steps: int = opt(1000, "total training steps (with --resume: continue up to this)", setting=True, minimum=1)
    optimizer: str | None = opt(
        None,
        "update rule. Zeroth-order: fzoo (default: each direction's projection normalised by the step's spread), "
        "sgd (MeZO's), momentum, adam, sign, hizoo (diagonal curvature; one more copy per forward); fo: sgd "
        "(default) or adamw (docs/optimizers.md)",
        choices=ZO_RULES + FO_OPTIMIZERS[1:],
        trajectory=True,
    )
    beta1: float = opt(0.9, "momentum / adam: decay of the first moment", trajectory=True, minimum=0)
    beta2: float = opt(0.999, "adam: decay of the second moment", trajectory=True, minimum=0)
    hessian_smoothing: float = opt(
        1e-6, "hizoo: weight of each step's curvature estimate in the running diagonal", trajectory=True
    )
    train_a: bool = opt(False, "fo only: train A too (plain LoRA instead of LoRA-FA)", trajectory=True)


@dataclass
class QuantArgs:
    quantize: str = opt(
        "none",
        "quantize the frozen base's linear layers (the adapter stays float32): 8da8w / 8da4w: "
        "int8 / int4 weights with int8 dynamic activations (XNNPACK kernels in ExecuTorch); int8 / "
        "4w: weight-only (eager only); docs/quantization.md",
        choices=("none", "int8", "8da8w", "8da4w", "4w"),
        trajectory=True,
    )
    group_size: int | None = opt(
        None,
        "4-bit schemes: input features per quantization scale (0 = one per output "
        "channel; default 32); 8-bit schemes scale per output channel",
        trajectory=True,
        minimum=0,
    )
    quantize_embeddings: bool = opt(False, "also quantize the input embedding table and the LM head", trajectory=True)


@dataclass
class EngineArgs:
    engine: str = opt(
        "eager", "who runs the step: eager PyTorch, or the ExecuTorch runtime", choices=ENGINES, trajectory=True
    )
    program: str | None = opt(
        None,
        "--engine executorch: a program directory from 'mobizo export' (default: "
        "export into OUT/program, or reuse the one there when it matches)",
        setting=True,
    )
    reexport: bool = opt(False, "--engine executorch: export OUT/program afresh even if the one there matches")
    device: str | None = opt(
        None,
        "--engine eager: where the model runs: cpu, cuda (under torchrun each process uses cuda:LOCAL_RANK) or "
        "mps (default: cuda if available, else mps, else cpu). The noise, B's update and all saved tensors stay "
        "float32 on the CPU, so a run replays and resumes on any device (docs/devices.md)",
        choices=DEVICES,
    )
    dtype: str = opt(
        "float32",
        "--engine eager: dtype of the frozen base's weights and activations; with bfloat16 / float16 the "
        "adapter (A, B, the noise), the losses and B's update stay float32 (docs/devices.md)",
        choices=DTYPES,
        trajectory=True,
    )
    fixed_length: bool = opt(
        False,
        "--engine executorch / export: trace the program for exactly --max-length "
        "tokens instead of any length up to it: about half the export time, but every batch "
        "is then padded to --max-length (slower steps when prompts are shorter; "
        "docs/executorch.md)",
    )
    dist_mode: str = opt(
        "queries",
        "under torchrun (WORLD_SIZE > 1): queries: each process runs its share of the q "
        "directions on the same batch; data: each process runs all q directions on its shard of "
        "the batch; federated: each process trains on its own --data (a {rank} in the path is "
        "replaced by the process's rank) and only the g values are exchanged (docs/scaling-out.md)",
        choices=DIST_MODES,
        setting=True,
    )


@dataclass
class RunArgs:
    out: str | None = opt(None, "run directory (default: runs/<task>-<estimator>-<time>)")
    resume: bool = opt(False, "continue the run in --out up to --steps (flags not given keep the run's values)")
    overwrite: bool = opt(False, "replace the mobizo run in --out (only the entries mobizo wrote are removed)")
    eval_every: int = opt(100, "evaluate every N steps (0 = only at the end)", setting=True, minimum=0)
    eval_at_start: bool = opt(
        True,
        "evaluate before the first step too: the starting point is a candidate for best/, and the summary says "
        "whether the run ended better than it began (--no-eval-at-start: skip it)",
    )
    divergence: str = opt(
        "rollback",
        "when the smoothed training loss climbs far above its minimum and stays there: rollback (to the last "
        "healthy checkpoint, with half the learning rate), stop, warn, or off (docs/reliability.md)",
        choices=("rollback", "stop", "warn", "off"),
        setting=True,
    )
    save_every: int = opt(100, "checkpoint every N steps (0 = only at the end)", setting=True, minimum=0)
    progress: bool = opt(True, "progress bars and status lines on stderr")
    threads: int | None = opt(
        None,
        "intra-op threads of PyTorch and the ExecuTorch runtime, and the export's "
        "lowering workers (default: the physical cores this process may use, or "
        "OMP_NUM_THREADS)",
        minimum=1,
    )


PARTS = {
    "data": DataArgs,
    "adapter": AdapterArgs,
    "optim": OptimArgs,
    "quant": QuantArgs,
    "engine": EngineArgs,
    "run": RunArgs,
}
TOP = ("model", "seed", "trust_remote_code")


@dataclass
class TrainConfig:
    model: str = opt(
        "tiny",
        "local Hugging Face model directory, a .gguf file (llama.cpp; dequantized to float at load), or 'tiny' "
        "(the built-in random model)",
        trajectory=True,
    )
    seed: int = opt(0, "run seed: the adapter's A, the noise, the data order", trajectory=True, minimum=0)
    trust_remote_code: bool = opt(False, "allow model code from the model directory", setting=True)
    data: DataArgs = field(default_factory=DataArgs)
    adapter: AdapterArgs = field(default_factory=AdapterArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    quant: QuantArgs = field(default_factory=QuantArgs)
    engine: EngineArgs = field(default_factory=EngineArgs)
    run: RunArgs = field(default_factory=RunArgs)

    # ------------------------------------------------------------ flat view

    @classmethod
    def from_flat(cls, **values) -> TrainConfig:
        """``TrainConfig.from_flat(model="tiny", lr=4.0, queries=2)``: fields by their flat names."""
        return cls().replace(**values)

    def replace(self, **values) -> TrainConfig:
        """A copy with fields replaced by their flat names (unknown names are an error)."""
        top = {k: values.pop(k) for k in TOP if k in values}
        parts = {}
        for part, cls in PARTS.items():
            names = {f.name for f in dataclasses.fields(cls)}
            mine = {k: values.pop(k) for k in list(values) if k in names}
            parts[part] = dataclasses.replace(getattr(self, part), **mine) if mine else getattr(self, part)
        if values:
            raise MobizoError(f"unknown config field(s): {', '.join(sorted(values))}")
        return dataclasses.replace(self, **top, **parts)

    def flat(self) -> dict:
        """Every field by its flat name."""
        out = {k: getattr(self, k) for k in TOP}
        for part in PARTS:
            out.update(dataclasses.asdict(getattr(self, part)))
        return out

    def rule(self) -> str:
        """The update rule: ``--optimizer``, else the estimator's default (fzoo for zeroth-order, sgd for fo)."""
        from .zo_optim import DEFAULT_RULE

        return self.optim.optimizer or ("sgd" if self.optim.estimator == "fo" else DEFAULT_RULE)

    def schedule(self) -> str:
        """The lr schedule: ``--lr-schedule``, else the rule's default."""
        from .zo_optim import default_schedule

        return self.optim.lr_schedule or default_schedule(self.optim.estimator == "fo", self.rule())

    def resolved(self) -> TrainConfig:
        """The run's rule, lr and lr schedule spelled out (not given: the rule's defaults), so that logs
        and checkpoints never hold a default whose meaning a later version could change."""
        from .zo_optim import default_lr

        o, rule, schedule = self.optim, self.rule(), self.schedule()
        lr = default_lr(o.estimator == "fo", rule) if o.lr is None else o.lr
        if (o.optimizer, o.lr, o.lr_schedule) == (rule, lr, schedule):
            return self
        return self.replace(optimizer=rule, lr=lr, lr_schedule=schedule)

    def trajectory(self) -> dict:
        """The fields that shape the updates (saved in the log header and the checkpoint)."""
        return {k: v for k, v in self.flat().items() if FIELDS[k].metadata.get("trajectory")}

    def settings(self) -> dict:
        return {k: v for k, v in self.flat().items() if FIELDS[k].metadata.get("setting")}

    # ------------------------------------------------------------ checks

    def validate(self) -> TrainConfig:
        """Every value in range and every flag meaningful for the chosen estimator / engine / task."""
        flat = self.flat()
        for name, value in flat.items():
            f = FIELDS[name]
            lo, choices = f.metadata.get("minimum"), f.metadata.get("choices")
            if value is None:
                continue
            if choices and value not in choices:
                raise MobizoError(f"{flag(name)} must be one of {', '.join(choices)}, got {value!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise MobizoError(f"{flag(name)} must be a finite number, got {value}")
            if lo is not None and value < lo:
                raise MobizoError(f"{flag(name)} must be >= {lo:g}, got {value}")
        if flat["lr"] is None:
            pass  # the rule's default (resolved)
        elif flat["lr"] == "auto":
            if self.run.resume:
                raise MobizoError("--lr auto chooses the lr of a new run; a resumed run keeps its own (omit --lr)")
        elif not isinstance(flat["lr"], (int, float)) or isinstance(flat["lr"], bool):
            raise MobizoError(f"--lr must be a positive number or auto, got {flat['lr']!r}")
        for name in ("lr", "eps", "alpha"):
            if name == "lr" and flat[name] in (None, "auto"):
                continue
            if not flat[name] > 0:
                raise MobizoError(f"{flag(name)} must be a positive number, got {flat[name]}")
        if flat["max_grad"] is not None and not flat["max_grad"] > 0:
            raise MobizoError(f"--max-grad must be a positive number, got {flat['max_grad']}")
        if self.seed >= 2**63:
            raise MobizoError(f"--seed must be in [0, 2**63), got {self.seed}")
        o, e, r = self.optim, self.engine, self.run
        from .schedule import check_schedule

        check_schedule(self.schedule(), o.warmup_steps, o.steps)
        if r.resume and r.overwrite:
            raise MobizoError("--resume and --overwrite exclude each other (continue the run, or replace it)")
        if r.out is not None and not str(r.out).strip():
            raise MobizoError("--out must not be empty")
        if o.estimator != "fo":
            if o.train_a:
                raise MobizoError(f"--train-a applies to --estimator fo only, not {o.estimator}")
            if o.optimizer not in (None, *ZO_RULES):
                raise MobizoError(
                    f"--optimizer {o.optimizer} is a first-order optimizer; zeroth-order estimators take "
                    f"{', '.join(ZO_RULES)}"
                )
            self.zo_config().check_batch(o.batch_size)
        elif o.optimizer not in (None, *FO_OPTIMIZERS):
            raise MobizoError(f"--optimizer {o.optimizer} is a zeroth-order rule; --estimator fo takes sgd or adamw")
        elif e.engine == "executorch":
            raise MobizoError("--engine executorch trains with zeroth-order estimators; use --engine eager for fo")
        if e.engine != "executorch":
            for name in ("program", "reexport"):
                if flat[name]:
                    raise MobizoError(f"{flag(name)} applies to --engine executorch only")
        elif e.program and e.reexport:
            raise MobizoError("--reexport exports into OUT/program; it cannot be combined with --program")
        from .devices import check_cpu_float32

        if e.engine == "executorch":
            check_cpu_float32(e.device, e.dtype, "--engine executorch")
        else:
            self.check_device()
        from .quantize import check_scheme

        q = self.quant
        if q.quantize != "none" and e.dtype != "float32":
            raise MobizoError(
                f"--quantize {q.quantize} quantizes a float32 base; it cannot be combined with --dtype {e.dtype}"
            )
        check_scheme(q.quantize, q.group_size, q.quantize_embeddings, executorch=e.engine == "executorch")
        return self

    def check_device(self):
        """The eager engine's device (``--device``, or the best available), checked to be here and to run
        ``--dtype`` (a few-op probe); returns it as a ``torch.device``."""
        from .devices import check_dtype, resolve

        device = resolve(self.engine.device)
        check_dtype(device, self.engine.dtype)
        if self.quant.quantize != "none" and device.type != "cpu":
            raise MobizoError(
                f"--quantize {self.quant.quantize} runs on the CPU only (mobizo's quantized bases are tested with "
                f"the CPU kernels); use --device cpu, not {device.type}"
            )
        return device

    def zo_config(self, objective: str = "answer", choices: int = 0):
        from .step import ZOConfig

        o = self.optim
        return ZOConfig(
            o.estimator,
            o.queries,
            self.seed,
            o.data_mode,
            o.weight_decay,
            math.inf if o.max_grad is None else o.max_grad,
            objective,
            choices,
            o.optimizer or "sgd",
            o.beta1,
            o.beta2,
            o.hessian_smoothing,
        )


def _collect_fields() -> dict[str, dataclasses.Field]:
    out = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in TOP:
            out[f.name] = f
    for cls in PARTS.values():
        for f in dataclasses.fields(cls):
            assert f.name not in out, f"config field {f.name} defined twice"
            out[f.name] = f
    return out


FIELDS = _collect_fields()
DEFAULTS = TrainConfig().flat()


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _float_or_auto(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def _csv_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def add_arguments(parser: argparse.ArgumentParser, names, overrides: dict | None = None) -> None:
    """Add ``--flag``s for the config fields ``names`` (flat names) to ``parser``.

    Every flag defaults to "not given" (``None`` in the namespace, or absent for booleans), so
    :func:`given` can tell what the user typed: resume semantics depend on it.
    """
    overrides = overrides or {}
    for name in names:
        f = FIELDS[name]
        md = {**f.metadata, **overrides.get(name, {})}
        default = DEFAULTS[name]
        help_text = md["help"]
        if default is not None and not isinstance(default, bool):
            help_text += f" (default: {','.join(default) if isinstance(default, list) else default})"
        flags = [flag(name)] + ([md["short"]] if md.get("short") else [])
        if name == "progress":
            parser.add_argument(
                "--no-progress",
                dest="progress",
                action="store_false",
                default=None,
                help="no progress bars or status lines",
            )
            continue
        if isinstance(default, bool):
            parser.add_argument(*flags, dest=name, action="store_true", default=None, help=help_text)
            if default:  # on unless turned off
                parser.add_argument(
                    "--no-" + flags[0][2:],
                    dest=name,
                    action="store_false",
                    default=None,
                    help=f"the opposite of {flags[0]}",
                )
            continue
        kind = str(f.type)
        if md.get("auto"):
            typ = _float_or_auto
        elif "list" in kind:
            typ = _csv_list
        elif kind.startswith("int"):
            typ = int
        elif kind.startswith("float"):
            typ = float
        else:
            typ = str
        parser.add_argument(
            *flags, dest=name, type=typ, default=None, choices=md.get("choices"), metavar=md.get("meta"), help=help_text
        )


def given(args: argparse.Namespace, names=None) -> dict:
    """The config fields the user gave on the command line (``--eval-examples 0`` means all)."""
    names = FIELDS if names is None else names
    out = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if out.get("eval_examples") == 0:
        out["eval_examples"] = None
    return out


def legacy_trajectory(saved: dict) -> dict:
    """A saved run's trajectory fields as this version reads them: a run from before the update rules
    saved no ``optimizer``, or null, and trained with sgd (ZO-SGD, or fo's sgd) at a constant lr unless
    it named a schedule; since the defaults are written out (:meth:`TrainConfig.resolved`) a null cannot
    mean anything else."""
    if not saved:
        return saved
    return {
        **saved,
        "optimizer": saved.get("optimizer") or "sgd",
        "lr_schedule": saved.get("lr_schedule") or "constant",
    }


def non_default(cfg: TrainConfig) -> set[str]:
    """Flat names whose value differs from the default: what a Python caller 'gave'."""
    return {k for k, v in cfg.flat().items() if v != DEFAULTS[k]}


# Groups of flags per command.
MODEL_FLAGS = ("model", "trust_remote_code") + tuple(f.name for f in dataclasses.fields(QuantArgs))
DATA_FLAGS = tuple(f.name for f in dataclasses.fields(DataArgs))
ADAPTER_FLAGS = tuple(f.name for f in dataclasses.fields(AdapterArgs))
# what an exported program bakes in (lr, eps and the lr schedule are the step's inputs, not the program's)
STEP_FLAGS = ("estimator", "queries", "batch_size", "data_mode", "objective", "weight_decay", "max_grad", "seed")
STEP_FLAGS += ("optimizer", "beta1", "beta2", "hessian_smoothing")
TRAIN_FLAGS = (
    MODEL_FLAGS
    + ("seed",)
    + DATA_FLAGS
    + ADAPTER_FLAGS
    + tuple(f.name for f in dataclasses.fields(OptimArgs))
    + tuple(f.name for f in dataclasses.fields(EngineArgs))
    + tuple(f.name for f in dataclasses.fields(RunArgs))
)
EXPORT_FLAGS = MODEL_FLAGS + DATA_FLAGS + ADAPTER_FLAGS + STEP_FLAGS + ("threads", "fixed_length", "device", "dtype")
