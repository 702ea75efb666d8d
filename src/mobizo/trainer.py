"""The training loop: data -> batch -> engine step -> metrics / eval / checkpoint.

All validation (model, task, data, adapters, output directory) happens in
:func:`prepare` before anything is written, so bad input never leaves a
half-written ``--out``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .checkpoint import (
    atomic_write_text,
    clean_stale,
    clear_dir,
    load_checkpoint,
    read_state,
    resolve_dir,
    save_adapter,
    save_checkpoint,
)
from .data import Encoder, collate, collate_choices, step_indices
from .errors import MobizoError
from .evaluate import evaluate, main_metric, metric_score
from .step import ESTIMATORS, ZOConfig, step_is_good

# Fields that define the trajectory: a resumed run must use the same values.
TRAJECTORY_FIELDS = (
    "model", "task", "data", "template", "label_words", "estimator", "queries", "batch_size", "data_mode",
    "lr", "eps", "weight_decay", "max_grad", "rank", "alpha", "target_modules", "seed", "max_length",
    "optimizer", "train_a", "engine", "train_examples", "truncation", "objective",
)  # fmt: skip
# Trajectory fields a resumed run may change (a recovery after the divergence guard stopped a run):
# the update of every step is logged with its own lr, so `mobizo replay` still rebuilds the adapter.
RECOVERY_FIELDS = ("lr", "eps", "max_grad")
# Other flags a resumed run takes from the checkpoint when not given (they do not change the updates).
SETTINGS_FIELDS = ("steps", "max_bad_steps", "eval_every", "save_every", "eval_examples", "eval_batch_size",
                   "program", "max_new_tokens", "trust_remote_code")  # fmt: skip
LOG_FORMAT = 1  # version of the metrics.jsonl header record


@dataclass
class TrainConfig:
    model: str = "tiny"
    task: str = "synthetic"
    data: str | None = None
    template: str | None = None
    label_words: str | None = None
    estimator: str = "prge"
    queries: int = 4
    batch_size: int = 16
    data_mode: str = "repeat"
    lr: float = 1e-3
    eps: float = 1e-3
    weight_decay: float = 0.0
    max_grad: float = float("inf")
    max_bad_steps: int = 3
    steps: int = 1000
    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] | None = None
    seed: int = 0
    max_length: int = 128
    truncation: str = "left"
    objective: str = "auto"
    optimizer: str = "sgd"
    train_a: bool = False
    engine: str = "eager"
    program: str | None = None  # --engine executorch: a directory from `mobizo export` (default: export into --out)
    eval_every: int = 100
    eval_at_start: bool = False
    eval_examples: int | None = 500
    train_examples: int | None = None
    eval_batch_size: int = 32
    max_new_tokens: int = 32
    save_every: int = 100
    out: str | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    trust_remote_code: bool = False
    extra: dict = field(default_factory=dict)

    def trajectory(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: d[k] for k in TRAJECTORY_FIELDS}

    def settings(self) -> dict:
        return {k: getattr(self, k) for k in SETTINGS_FIELDS}


@dataclass
class Run:
    """Everything a training run needs, validated."""

    cfg: TrainConfig
    model: torch.nn.Module
    tokenizer: object
    task: object
    train: list
    validation: list
    encoder: Encoder
    engine: object
    targets: list[str]
    objective: str = "answer"
    choices: int = 0
    truncated: dict = field(default_factory=dict)  # split -> examples whose prompts are cut to fit
    answer_len: int = 0  # longest answer (any candidate) in tokens: the exported answer window K


def check_config(cfg: TrainConfig) -> None:
    if cfg.estimator not in ESTIMATORS:
        raise MobizoError(f"unknown estimator {cfg.estimator!r} (choose from {', '.join(ESTIMATORS)})")
    for name in ("queries", "batch_size", "steps", "rank", "max_length", "eval_batch_size", "max_bad_steps",
                 "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise MobizoError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("lr", "eps", "alpha"):
        v = getattr(cfg, name)
        if not math.isfinite(v) or v <= 0:
            raise MobizoError(f"--{name} must be a positive number, got {v}")
    if cfg.eval_every < 0 or cfg.save_every < 0:
        raise MobizoError("--eval-every and --save-every must be >= 0")
    if cfg.objective not in ("auto", "answer", "choice"):
        raise MobizoError(f"unknown --objective {cfg.objective!r} (choose from auto, answer, choice)")
    if not cfg.max_grad > 0:  # NaN fails too
        raise MobizoError(f"--max-grad must be a positive number, got {cfg.max_grad}")
    if not math.isfinite(cfg.weight_decay) or cfg.weight_decay < 0:
        raise MobizoError(f"--weight-decay must be a finite number >= 0, got {cfg.weight_decay}")
    if not 0 <= cfg.seed < 2**63:
        raise MobizoError(f"--seed must be in [0, 2**63), got {cfg.seed}")
    for name in ("eval_examples", "train_examples"):
        v = getattr(cfg, name)
        if v is not None and v < 0:
            raise MobizoError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
    if cfg.truncation not in ("left", "error"):
        raise MobizoError(f"--truncation must be left or error, got {cfg.truncation!r}")
    if cfg.engine not in ("eager", "executorch"):
        raise MobizoError(f"unknown --engine {cfg.engine!r} (choose from eager, executorch)")
    if cfg.estimator != "fo":
        ZOConfig(cfg.estimator, cfg.queries, cfg.seed, cfg.data_mode).check_batch(cfg.batch_size)


def resolve_objective(requested: str, kind: str, examples) -> tuple[str, int]:
    """(step objective, candidates per example). ``auto`` trains classification and multiple-choice
    tasks on the candidates (MeZO's train-as-classification) and everything else on the answer."""
    has_choices = kind in ("classification", "multiple_choice")
    if requested == "answer" or (requested == "auto" and not has_choices):
        return "answer", 0
    if not has_choices:
        raise MobizoError(f"--objective choice needs a classification or multiple-choice task, not {kind}")
    choices = max(len(e.candidates) for e in examples)
    return ("choice-sum" if kind == "classification" else "choice-mean"), choices


def zo_config(cfg: TrainConfig, objective: str, choices: int) -> ZOConfig:
    return ZOConfig(
        cfg.estimator, cfg.queries, cfg.seed, cfg.data_mode, cfg.weight_decay, cfg.max_grad, objective, choices
    )


def load_task_data(cfg: TrainConfig, need_train: bool = True):
    from .tasks import get_task

    task = get_task(cfg.task, data=cfg.data, template=cfg.template, label_words=cfg.label_words)
    train = task.load("train", cfg.train_examples, cfg.seed) if need_train else []
    validation = task.load("validation", cfg.eval_examples, cfg.seed)
    return task, train, validation


def check_lengths(encoder: Encoder, examples, max_length: int, truncation: str, what: str) -> int:
    """Encode everything once (fails fast on bad text); count prompts that must be truncated."""
    long = 0
    for ex in examples:
        encs = [encoder(ex.prompt, c) for c in ex.candidates] or [encoder.example(ex)]
        for e in encs:
            if len(e.answer_ids) + 1 > max_length:
                raise MobizoError(f"{what}: an answer of {len(e.answer_ids)} tokens does not fit --max-length {max_length}")
        if any(len(e.prompt_ids) + len(e.answer_ids) > max_length for e in encs):
            long += 1
            if truncation == "error":
                raise MobizoError(
                    f"{what}: a prompt of {len(encs[0].prompt_ids)} tokens is longer than --max-length {max_length} "
                    "allows (raise --max-length or use --truncation left)"
                )
    return long


def build_engine(cfg: TrainConfig, model, out: Path | None, objective: str, choices: int, answer_len: int):
    if cfg.engine == "executorch":
        import tempfile

        from .engines.executorch import ExecuTorchEngine, export_program, identity, manifest_for
        from .models import weights_hash

        if cfg.estimator == "fo":
            raise MobizoError("--engine executorch trains with zeroth-order estimators; use --engine eager for fo")
        manifest = manifest_for(model, cfg.model, zo_config(cfg, objective, choices), cfg.batch_size, cfg.max_length,
                                answer_len, cfg.eval_batch_size, cfg.rank, cfg.alpha, weights_hash(model))  # fmt: skip
        program_dir = Path(cfg.program) if cfg.program else None
        if program_dir is None:
            program_dir = (out / "program") if out is not None else Path(tempfile.mkdtemp(prefix="mobizo-program-"))
            if not (program_dir / "train.pte").is_file():
                export_program(model, manifest, program_dir)
        return ExecuTorchEngine(program_dir, identity(manifest))
    from .engines.eager import EagerEngine

    zo = zo_config(cfg, objective, choices) if cfg.estimator != "fo" else None
    return EagerEngine(
        model, cfg.estimator, zo, cfg.optimizer, cfg.train_a, cfg.weight_decay, objective=objective, choices=choices
    )


def prepare(cfg: TrainConfig, out: Path | None = None) -> Run:
    from .models import load_model
    from .mplora import inject

    check_config(cfg)
    task, train, validation = load_task_data(cfg)
    if task.kind == "generation" and cfg.max_new_tokens >= cfg.max_length:
        raise MobizoError(
            f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in --max-length {cfg.max_length}"
        )
    model, tokenizer = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    train, validation = task.finalize(train, tokenizer), task.finalize(validation, tokenizer)
    targets = inject(model, cfg.target_modules, cfg.rank, cfg.alpha, cfg.seed)
    encoder = Encoder(tokenizer)
    truncated = {}
    for what, exs in (("train", train), ("validation", validation)):
        truncated[what] = warn_truncated(encoder, exs, cfg.max_length, cfg.truncation, what)
    objective, choices = resolve_objective(cfg.objective, task.kind, train)
    answer_len = max(
        len(encoder(ex.prompt, c).answer_ids) for ex in train + validation for c in (ex.candidates or [ex.answer])
    )
    engine = build_engine(cfg, model, out, objective, choices, answer_len)
    if task.kind == "generation" and not hasattr(engine, "next_token_logits"):
        raise MobizoError(f"task {task.name} evaluates by generating text, which the {engine.name} engine cannot do; "
                          "use --engine eager")  # fmt: skip
    return Run(cfg, model, tokenizer, task, train, validation, encoder, engine, targets, objective, choices, truncated,
               answer_len)


def warn_truncated(encoder: Encoder, examples, max_length: int, truncation: str, what: str) -> int:
    """:func:`check_lengths` plus a warning on stderr with the count; returns the count."""
    n = check_lengths(encoder, examples, max_length, truncation, what)
    if n:
        print(f"mobizo: warning: {n} of {len(examples)} {what} examples exceed --max-length {max_length}; "
              "their prompts are truncated from the left", file=sys.stderr)  # fmt: skip
    return n


def export(cfg: TrainConfig, out_dir: str, xnnpack: bool = True):
    """``mobizo export``: the ExecuTorch training program for ``cfg``'s model, task shapes and step."""
    from .engines.executorch import export_program, manifest_for
    from .models import weights_hash

    if cfg.estimator == "fo":
        raise MobizoError("mobizo export builds the zeroth-order step; the fo baseline is exported by the benchmarks")
    target = Path(out_dir)
    if target.exists() and any(target.iterdir()) and not cfg.overwrite:
        raise MobizoError(f"--out {target} is not empty (use --overwrite to replace it)")
    run = prepare(dataclasses.replace(cfg, engine="eager"))
    zo = zo_config(cfg, run.objective, run.choices)
    manifest = manifest_for(run.model, cfg.model, zo, cfg.batch_size, cfg.max_length, run.answer_len,
                            cfg.eval_batch_size, cfg.rank, cfg.alpha, weights_hash(run.model))  # fmt: skip
    return export_program(run.model, manifest, target, xnnpack=xnnpack)


def make_batch(run: Run, step: int):
    cfg = run.cfg
    idx = step_indices(len(run.train), cfg.batch_size, step, cfg.seed)
    shapes = run.engine.shapes
    if run.objective != "answer":
        exs = [run.train[i] for i in idx]
        return collate_choices(
            [[run.encoder(e.prompt, c) for c in e.candidates] for e in exs],
            [e.label for e in exs],
            run.choices,
            run.tokenizer.pad_token_id,
            cfg.max_length,
            length=shapes.length,
            answer_len=shapes.answer_len,
            examples=shapes.rows,
        )
    return collate(
        [run.encoder.example(run.train[i]) for i in idx],
        run.tokenizer.pad_token_id,
        cfg.max_length,
        length=shapes.length,
        answer_len=shapes.answer_len,
        rows=shapes.rows,
    )


def run_eval(run: Run) -> dict:
    return evaluate(
        run.engine,
        run.task.kind,
        run.validation,
        run.encoder,
        run.tokenizer.pad_token_id,
        run.cfg.max_length,
        run.cfg.eval_batch_size,
        run.cfg.max_new_tokens,
    )


class BadSteps(MobizoError):
    pass


RUN_MARKERS = ("metrics.jsonl", "summary.json", "checkpoint", "adapter", ".checkpoint.old", ".adapter.old")


def _looks_like_run(out: Path) -> bool:
    """Whether ``out`` holds a mobizo run (so --overwrite may delete it) rather than someone's files."""
    names = [e.name for e in out.iterdir()]
    return any(n in RUN_MARKERS or n.endswith(".pte") for n in names) or all(
        n.startswith(".") and (".tmp-" in n or ".trash-" in n) for n in names
    )


def _check_out(cfg: TrainConfig) -> Path | None:
    """Validate --out before anything is loaded or written."""
    if cfg.out is None:
        if cfg.resume:
            raise MobizoError("--resume needs --out (the directory of the run to continue)")
        return None
    if not str(cfg.out).strip():
        raise MobizoError("--out must not be empty")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise MobizoError(f"--out {out} exists and is not a directory")
    if out.exists():
        if not os.access(out, os.W_OK | os.X_OK):
            raise MobizoError(f"--out {out} is not writable")
    else:
        parent = out.absolute().parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise MobizoError(f"cannot create --out {out}: {parent} is not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise MobizoError(f"cannot create --out {out}: {parent} is not writable")
    if cfg.resume:
        if not out.is_dir() or resolve_dir(out / "checkpoint") is None:
            raise MobizoError(
                f"--resume: no checkpoint in {out} (a run killed before its first checkpoint has nothing to "
                "resume: start it again with --overwrite)"
            )
    elif out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise MobizoError(
                f"--out {out} is not empty (use --resume to continue that run or --overwrite to replace it)"
            )
        if not _looks_like_run(out):
            raise MobizoError(f"--overwrite: {out} does not look like a mobizo run directory; not deleting it")
    return out


def resolve_resume(cfg: TrainConfig, given: set[str]) -> TrainConfig:
    """With --resume, unspecified flags take the saved run's values; conflicting ones are an error.

    Only :data:`RECOVERY_FIELDS` (lr, eps, max_grad) may be changed, with a warning.
    """
    if not cfg.resume:
        return cfg
    out = _check_out(cfg)
    d = resolve_dir(out / "checkpoint")
    try:
        state = read_state(d)
    except MobizoError as e:
        raise MobizoError(f"--resume: {e}") from e
    saved = state.get("config") or {}
    settings = state.get("settings") if isinstance(state.get("settings"), dict) else {}
    updates = {k: v for k, v in settings.items() if k in SETTINGS_FIELDS and k not in given}
    for k, v in saved.items():
        if k not in TRAJECTORY_FIELDS:
            continue
        if k in given and getattr(cfg, k) != v:
            flag = f"--{k.replace('_', '-')}"
            if k not in RECOVERY_FIELDS:
                raise MobizoError(f"--resume: the run in {out} used {flag} {v}, not {getattr(cfg, k)}")
            print(f"mobizo: warning: resuming with {flag} {getattr(cfg, k)} (the run used {v})", file=sys.stderr)
            continue
        updates[k] = v
    return dataclasses.replace(cfg, **updates)


def train(cfg: TrainConfig, on_step=None) -> dict:
    """Train per ``cfg``; returns the summary (also written to ``out/summary.json``).

    ``on_step(step, record)`` is called after every step with its metrics record.
    """
    out = _check_out(cfg)
    if out is not None and cfg.resume:
        clean_stale(out)
    run = prepare(cfg, out)
    start = {"step": 0, "skipped_steps": 0, "last_loss": None}
    if cfg.resume:
        adapter, _, state, opt_state = load_checkpoint(out / "checkpoint")
        saved = state.get("config") or {}

        def fixed(d: dict) -> dict:
            return {k: d.get(k) for k in TRAJECTORY_FIELDS if k not in RECOVERY_FIELDS}

        if saved and fixed(saved) != fixed(cfg.trajectory()):
            raise MobizoError(f"--resume: the checkpoint in {out} belongs to a different run configuration")
        if state["step"] > cfg.steps:
            raise MobizoError(f"--resume: the checkpoint in {out} is at step {state['step']}, past --steps {cfg.steps}")
        run.engine.load_adapter_state(adapter)
        run.engine.load_optimizer_state(opt_state)
        start.update({k: state[k] for k in start if k in state})
    if out is not None:
        if cfg.overwrite and not cfg.resume and out.exists():
            # the checkpoint goes first: a kill midway never leaves a checkpoint without its log
            clear_dir(out, first=("checkpoint", ".checkpoint.old", "adapter", ".adapter.old", "summary.json"))
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MobizoError(f"cannot create --out {out}: {e.strerror or e}") from e
    return _loop(run, out, start, on_step)


def _log_header(run: Run) -> dict:
    """First line of metrics.jsonl: what `mobizo replay` needs besides the per-step records."""
    return {
        "mobizo_log": LOG_FORMAT,
        "config": run.cfg.trajectory(),
        "layers": list(run.targets),
        "mobizo_version": __version__,
    }


def _read_metrics(path: Path, upto: int) -> list[str]:
    """The header and the step records up to ``upto`` (a line cut by a kill is dropped)."""
    if not path.exists():
        return []
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if not isinstance(rec, dict):
            continue
        if ("mobizo_log" in rec and not keep) or (isinstance(rec.get("step"), int) and rec["step"] <= upto):
            keep.append(line)
    return keep


def _best_so_far(lines: list[str], kind: str, out: Path | None) -> dict | None:
    """The best periodic eval among kept metrics records (resume), if its ``best/`` adapter exists."""
    if out is None or resolve_dir(out / "best") is None:
        return None
    name, best = main_metric(kind), None
    for line in lines:
        rec = json.loads(line)
        if f"eval_{name}" in rec:
            score = metric_score(kind, {name: rec[f"eval_{name}"]})
            if best is None or score > best["score"]:
                best = {"step": rec["step"], "metric": name, "value": rec[f"eval_{name}"], "score": score}
    return best


def _finite_or_none(x: float):
    return x if math.isfinite(x) else None


def step_good(res, max_grad: float) -> bool:
    """Host-side verdict of the divergence guard, computed exactly like the in-graph one (float32)."""
    grads = torch.tensor(res.projected_grads, dtype=torch.float32)
    losses = torch.tensor(res.losses if res.losses else [res.loss], dtype=torch.float32)
    return step_is_good(losses, grads, max_grad)


def _loop(run: Run, out: Path | None, start: dict, on_step=None) -> dict:
    from tqdm import tqdm

    cfg = run.cfg
    start_step = start["step"]
    kind = run.task.kind
    metric = main_metric(kind)
    metrics_path = out / "metrics.jsonl" if out else None
    best = None  # {"step", "metric", "value", "score"} of the best eval during training
    if metrics_path is not None:
        # Steps after the checkpoint will be redone: drop their records. Keep (or write) the header.
        lines = _read_metrics(metrics_path, start_step) if cfg.resume else []
        if not lines or "mobizo_log" not in json.loads(lines[0]):
            lines.insert(0, json.dumps(_log_header(run)))
        atomic_write_text(metrics_path, "".join(line + "\n" for line in lines))
        best = _best_so_far(lines, kind, out) if cfg.resume else None
    # Line-buffered: every record reaches the file in one write, so a kill never leaves more than
    # a partial last line (which readers drop).
    metrics_file = metrics_path.open("a", encoding="utf-8", buffering=1) if metrics_path else None
    last_eval: dict = {}
    last_eval_step = None
    last_loss = start["last_loss"] if start["last_loss"] is not None else float("nan")
    skipped = start["skipped_steps"]
    bad_run, total_time, n_timed = 0, 0.0, 0
    last_good_ckpt = start_step if out is not None else None

    def save_ckpt(step: int) -> None:
        nonlocal last_good_ckpt
        if out is None:
            return
        if metrics_file and not metrics_file.closed:
            # The log always covers the checkpoint (replay and resume rely on it), even after a power cut.
            metrics_file.flush()
            os.fsync(metrics_file.fileno())
        state = {
            "step": step,
            "config": cfg.trajectory(),
            "mobizo_version": __version__,
            "skipped_steps": skipped,
            "last_loss": _finite_or_none(last_loss),
            "settings": cfg.settings(),
        }
        save_checkpoint(
            out / "checkpoint", run.engine.adapter_state(), cfg.rank, cfg.alpha, cfg.model, state,
            run.engine.optimizer_state(),
        )  # fmt: skip
        last_good_ckpt = step

    def consider_best(step: int, metrics: dict) -> None:
        """Keep ``best/`` (PEFT format) for the highest main metric; ties keep the earlier step."""
        nonlocal best
        score = metric_score(kind, metrics)
        if not math.isfinite(score) or (best is not None and score <= best["score"]):
            return
        best = {"step": step, "metric": metric, "value": metrics[metric], "score": score}
        if out is not None:
            save_adapter(out / "best", run.engine.adapter_state(), cfg.rank, cfg.alpha, cfg.model)

    def summary(step: int, final_eval: dict | None, status: str, error: str | None = None) -> dict:
        final_eval = final_eval or {}
        s = {
            "status": status,
            "final_step": step,
            "final_loss": last_loss,
            "eval": final_eval,
            "eval_start": start_eval,
            "metric": metric,
            f"eval_{metric}": final_eval.get(metric),
            "eval_accuracy": final_eval.get("accuracy"),
            "eval_loss": final_eval.get("loss"),
            "best": None if best is None else {k: v for k, v in best.items() if k != "score"},
            "truncated": run.truncated,
            "skipped_steps": skipped,
            "seconds_per_step": total_time / n_timed if n_timed else None,
            "engine": cfg.engine,
            "estimator": cfg.estimator,
            "config": cfg.trajectory(),
            "mobizo_version": __version__,
        }
        if error:
            s["error"] = error
            s["last_checkpoint_step"] = last_good_ckpt
        return s

    if out is not None and not cfg.resume:
        save_ckpt(0)  # a run killed at any point after this can be resumed
    start_eval = run_eval(run) if cfg.eval_at_start else None
    bar = tqdm(
        range(start_step + 1, cfg.steps + 1),
        initial=start_step,
        total=cfg.steps,
        disable=not cfg.progress,
        desc=f"{cfg.engine}/{cfg.estimator}",
        dynamic_ncols=True,
    )
    step = start_step
    try:
        for step in bar:
            batch = make_batch(run, step)
            t0 = time.perf_counter()
            res = run.engine.train_step(batch, step, cfg.lr, cfg.eps)
            dt = time.perf_counter() - t0
            total_time += dt
            n_timed += 1
            rec = {"step": step, "loss": res.loss, "projected_grads": res.projected_grads,
                   "lr": cfg.lr, "eps": cfg.eps, "seconds": dt}  # fmt: skip
            if step_good(res, cfg.max_grad):
                bad_run = 0
                last_loss = res.loss
            else:  # the step left B untouched (in-graph guard); count it
                bad_run += 1
                skipped += 1
                rec["skipped"] = True
            if step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
                last_eval, last_eval_step = run_eval(run), step
                rec.update({f"eval_{k}": v for k, v in last_eval.items() if k not in ("n", "truncated")})
                consider_best(step, last_eval)
                bar.set_postfix({"loss": f"{last_loss:.4f}", metric: f"{last_eval[metric]:.4f}"})
            else:
                bar.set_postfix(loss=f"{last_loss:.4f}")
            if metrics_file:
                metrics_file.write(json.dumps(rec) + "\n")
            if on_step is not None:
                on_step(step, rec)
            if bad_run >= cfg.max_bad_steps:
                where = f"step {last_good_ckpt} in {out / 'checkpoint'}" if last_good_ckpt is not None else "none"
                msg = (
                    f"training stopped at step {step}: {bad_run} consecutive bad steps (non-finite loss or "
                    f"|g| > --max-grad); last good checkpoint: {where} (resume it with --resume and a lower "
                    "--lr or --eps)"
                )
                if out is not None:
                    stopped = summary(step, last_eval, "stopped", msg)
                    atomic_write_text(out / "summary.json", json.dumps(stopped, indent=1))
                raise BadSteps(msg)
            # Checkpoints never land inside a streak of bad steps: resuming redoes them (e.g. with a lower --lr).
            if cfg.save_every and step % cfg.save_every == 0 and step != cfg.steps and bad_run == 0:
                save_ckpt(step)
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    final_eval = last_eval if last_eval_step == step else run_eval(run)
    if last_eval_step != step and step > 0:
        consider_best(step, final_eval)
    result = summary(step, final_eval, "completed")
    if out is not None:
        save_ckpt(step)
        save_adapter(out / "adapter", run.engine.adapter_state(), cfg.rank, cfg.alpha, cfg.model)
        atomic_write_text(out / "summary.json", json.dumps(result, indent=1))
    return result
