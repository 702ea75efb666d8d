"""The training loop of one process: batch -> engine step -> metrics / eval / checkpoint.

:func:`train` is a single-process run: check the run directory, resolve ``--resume`` (flags not
given keep the saved run's values, :func:`resolve_resume`), assemble the run (:mod:`mobizo.build`),
load the checkpoint (:func:`restore`), then :class:`Trainer` steps it. All files go through
:class:`mobizo.rundir.RunDir`; all validation happens before anything is written.

This module knows nothing of distributed training. Whether a run is one process or a rank of a
process group is decided above it, by :func:`mobizo.api.run_training` (what ``mobizo train`` and
:func:`mobizo.train` call); :mod:`mobizo.distributed` drives the same :class:`Trainer` on every rank
through its public hooks: a :class:`~mobizo.rundir.RunDir` that writes nothing on ranks other than 0,
extra header and summary fields, :meth:`Trainer.write_failure`, and :func:`resolve_resume` /
:func:`restore` for ``--resume``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from . import __version__
from .build import Run, assemble, build_engine, needs_weights
from .checkpoint import read_rollback
from .config import DEFAULTS, FIELDS, TrainConfig, flag, legacy_trajectory, non_default
from .data import collate, collate_choices, step_indices
from .divergence import FACTOR, LR_CUT, MAX_ROLLBACKS, PATIENCE, Monitor
from .errors import MobizoError
from .evaluation import evaluate, main_metric, metric_score
from .progress import bar
from .rundir import ADAPTER, BEST, CHECKPOINT, PROGRAM_DIR, RunDir, default_out, log_header
from .schedule import lr_at
from .step import step_good


class BadSteps(MobizoError):
    pass


class Diverged(MobizoError):
    pass


def make_batch(run: Run, step: int):
    """The batch of training ``step`` (a pure function of the seed and the step)."""
    cfg = run.cfg
    idx = step_indices(len(run.train), cfg.optim.batch_size, step, cfg.seed)
    shapes = run.engine.shapes
    if run.objective != "answer":
        exs = [run.train[i] for i in idx]
        return collate_choices(
            [[run.encoder(e.prompt, c) for c in e.candidates] for e in exs],
            [e.label for e in exs],
            run.choices,
            run.tokenizer.pad_token_id,
            cfg.data.max_length,
            length=shapes.length,
            answer_len=shapes.answer_len,
            examples=shapes.rows,
        )
    return collate(
        [run.encoder.example(run.train[i]) for i in idx],
        run.tokenizer.pad_token_id,
        cfg.data.max_length,
        length=shapes.length,
        answer_len=shapes.answer_len,
        rows=shapes.rows,
    )


def run_eval(run: Run, progress: bool = False) -> dict:
    d = run.cfg.data
    return evaluate(
        run.engine,
        run.task.kind,
        run.validation,
        run.encoder,
        run.tokenizer.pad_token_id,
        d.max_length,
        d.eval_batch_size,
        d.max_new_tokens,
        progress=progress,
    )


# ---------------------------------------------------------------- resume


def resolve_resume(cfg: TrainConfig, given: set[str], out: RunDir) -> TrainConfig:
    """With --resume, fields not given take the saved run's values; a given trajectory field that differs
    is an error, except lr / eps / max_grad (a recovery after the divergence guard stopped a run: every
    step's lr is logged, so `mobizo replay` still rebuilds the adapter), which change with a warning."""
    state = out.read_state()
    saved = legacy_trajectory(state.get("config") or {})
    settings = state.get("settings") if isinstance(state.get("settings"), dict) else {}
    updates = {
        k: v for k, v in settings.items() if k in FIELDS and FIELDS[k].metadata.get("setting") and k not in given
    }
    for k, v in saved.items():
        if k not in FIELDS or not FIELDS[k].metadata.get("trajectory"):
            continue
        mine = cfg.flat()[k]
        if k in given and mine != v:
            if not FIELDS[k].metadata.get("recovery"):
                raise MobizoError(f"--resume: the run in {out.path} used {flag(k)} {v}, not {mine}")
            print(f"mobizo: warning: resuming with {flag(k)} {mine} (the run used {v})", file=sys.stderr)
            continue
        updates[k] = v
    cfg = cfg.replace(**updates)
    saved_steps = settings.get("steps")
    if cfg.schedule() != "constant" and saved_steps is not None and cfg.optim.steps != saved_steps:
        raise MobizoError(
            f"--resume: with --lr-schedule {cfg.schedule()} --steps shapes every step's lr; the run "
            f"in {out.path} used --steps {saved_steps} (a run to extend later needs --lr-schedule constant)"
        )
    return cfg


def _fixed(trajectory: dict) -> dict:
    return {k: v for k, v in trajectory.items() if not FIELDS[k].metadata.get("recovery")}


def fresh_start() -> dict:
    """The loop's starting counters of a new run (:func:`restore` gives a resumed run's)."""
    return {"step": 0, "skipped_steps": 0, "last_loss": None}


# what a checkpoint's state.json keeps of the loop besides the step (restored by --resume)
LOOP_STATE = ("skipped_steps", "last_loss", "monitor", "lr_scale", "rollbacks", "eval_start", "best")


def restore(run: Run, out: RunDir) -> dict:
    """Load ``out``'s checkpoint into ``run``'s engine (after checking it belongs to ``run``'s
    configuration); the loop's starting counters."""
    cfg = run.cfg
    adapter, _, state, opt_state = out.load_checkpoint()
    saved = legacy_trajectory(state.get("config") or {})
    # a field the checkpoint predates (e.g. --quantize) had its default in that run
    if saved and _fixed({k: saved.get(k, DEFAULTS[k]) for k in cfg.trajectory()}) != _fixed(cfg.trajectory()):
        raise MobizoError(f"--resume: the checkpoint in {out.path} belongs to a different run configuration")
    if state["step"] > cfg.optim.steps:
        raise MobizoError(
            f"--resume: the checkpoint in {out.path} is at step {state['step']}, past --steps {cfg.optim.steps}"
        )
    run.engine.load_adapter_state(adapter)
    run.engine.load_optimizer_state(opt_state)
    start = {**fresh_start(), "step": state["step"], **{k: state[k] for k in LOOP_STATE if k in state}}
    if isinstance(state.get("rollback"), dict):  # the earlier healthy point a divergence would return to
        tensors = read_rollback(out / CHECKPOINT)
        part = {
            w: {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(w + ".")}
            for w in ("adapter", "optimizer")
        }
        start["snapshot"] = {**state["rollback"], "adapter": part["adapter"], "optimizer": part["optimizer"] or None}
    return start


# ---------------------------------------------------------------- the entry point


def train(cfg: TrainConfig, given: set[str] | None = None, on_step=None, **objects) -> dict:
    """Train per ``cfg`` in this one process; returns the summary (also written to ``OUT/summary.json``).

    ``given``: the fields the user set (the CLI passes its flags); by default those that differ
    from their defaults. ``objects``: ``model``/``tokenizer``/``train``/``validation`` to use
    instead of loading them (see :func:`mobizo.build.assemble`). ``on_step(step, record)`` is called
    after every step with its metrics record. Under torchrun, :func:`mobizo.api.run_training` runs
    :func:`mobizo.distributed.train` instead.
    """
    cfg.validate()
    if cfg.engine.fixed_length and cfg.engine.engine != "executorch":  # (valid for `mobizo export`, not here)
        raise MobizoError("--fixed-length applies to --engine executorch only")
    out = RunDir(cfg.run.out or default_out(cfg.data.task, cfg.optim.estimator))
    out.check(cfg.run.resume, cfg.run.overwrite)
    if cfg.run.resume:
        cfg = resolve_resume(cfg, non_default(cfg) if given is None else set(given), out).validate()
    cfg = cfg.replace(out=str(out.path)).resolved()  # (after --resume: a resumed run keeps its rule and lr)
    existed = out.path.exists()
    e = cfg.engine
    # The run directory's program/ is in use when the run exports into it (or points --program at it).
    own_program = e.engine == "executorch" and (
        not e.program or Path(e.program).resolve() == (out / PROGRAM_DIR).resolve()
    )
    try:
        run = assemble(cfg, weights=needs_weights(cfg), **objects)
        build_engine(run, out / PROGRAM_DIR)
    except BaseException:
        if not existed and out.path.is_dir() and not any(out.path.iterdir()):
            out.path.rmdir()  # nothing half-written
        raise
    probe = None
    if cfg.optim.lr == "auto":
        try:
            lr, probe = probe_lr(run)
        except BaseException:
            if not existed and out.path.is_dir() and not any(out.path.iterdir()):
                out.path.rmdir()
            raise
        run.cfg = cfg = cfg.replace(lr=lr)  # what the run logs, checkpoints and resumes with
    out.open(cfg.run.resume, cfg.run.overwrite, keep_program=own_program)
    start = restore(run, out) if cfg.run.resume else fresh_start()
    return Trainer(run, out, start, on_step, summary_fields={"lr_probe": probe} if probe else None).fit()


# --lr auto: a short probe around the rule's default learning rate (zo_optim.DEFAULT_LR)
PROBE_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0)
PROBE_STEPS = 20
PROBE_EXAMPLES = 64


def probe_lr(run: Run) -> tuple[float, list[dict]]:
    """``--lr auto``: train ``PROBE_STEPS`` steps from the starting adapter at each of a few learning rates
    around the rule's usual one, measure the loss on the first ``PROBE_EXAMPLES`` validation examples
    after each, and keep the learning rate with the lowest (ties: the larger lr); the adapter and the rule's
    state are put back before the run starts. Every candidate's result is printed and kept in the summary
    (``lr_probe``). Costs ``len(PROBE_FACTORS) x PROBE_STEPS`` steps and as many small evals."""
    from .zo_optim import default_lr

    cfg, engine = run.cfg, run.engine
    if not run.validation:
        raise MobizoError("--lr auto measures each candidate on the validation split, and this run has none")
    base = default_lr(cfg.optim.estimator == "fo", cfg.rule())
    candidates = [float(f"{base * f:.3g}") for f in PROBE_FACTORS]
    examples = run.validation[:PROBE_EXAMPLES]
    adapter, optimizer = engine.adapter_state(), engine.optimizer_state()
    table = [{"lr": 0.0, "loss": _probe_loss(run, examples)}]  # the starting point
    quiet = not cfg.run.progress
    if not quiet:
        print(
            f"mobizo: --lr auto: {PROBE_STEPS} steps at each of {candidates} (loss at the start "
            f"{table[0]['loss']:.4f})",
            file=sys.stderr,
        )
    for lr in candidates:
        skipped = 0
        for step in range(1, PROBE_STEPS + 1):
            res = engine.train_step(make_batch(run, step), step, lr, cfg.optim.eps)
            skipped += not step_good(res, cfg.optim.max_grad)
        loss = _probe_loss(run, examples) if not skipped else math.nan
        table.append({"lr": lr, "loss": loss, "skipped_steps": skipped})
        engine.load_adapter_state(adapter)
        engine.load_optimizer_state(optimizer)
        if not quiet:
            print(
                f"mobizo: --lr auto: lr {lr:g}: loss {loss:.4f}" + (f" ({skipped} steps skipped)" if skipped else ""),
                file=sys.stderr,
            )
    tried = [t for t in table[1:] if math.isfinite(t["loss"])]
    better = [t for t in tried if t["loss"] < table[0]["loss"]]
    if better:
        chosen = min(better, key=lambda t: (t["loss"], -t["lr"]))["lr"]
    else:  # nothing helped within the probe: the most cautious candidate
        chosen = candidates[0]
        print(
            f"mobizo: warning: --lr auto: no candidate lowered the loss within {PROBE_STEPS} steps; using the "
            f"smallest, {chosen:g}",
            file=sys.stderr,
        )
    if not quiet:
        print(f"mobizo: --lr auto: lr {chosen:g}", file=sys.stderr)
    return chosen, table


def _probe_loss(run: Run, examples) -> float:
    """What the step minimizes, on held-out ``examples``: the cross-entropy over the candidates' scores
    (classification and multiple choice, the choice objective: the gold label word's full-vocabulary loss
    can rise while its rank improves), else the answer loss per token (a generation task is not decoded)."""
    from .evaluation import choice_scores, score_pairs

    d, pad = run.cfg.data, run.tokenizer.pad_token_id
    if run.objective != "answer":
        scored = choice_scores(run.engine, run.task.kind, examples, run.encoder, pad, d.max_length, d.eval_batch_size)
        ce = [-torch.log_softmax(score, 0)[ex.label] for (score, _, _), ex in zip(scored, examples)]
        return float(torch.stack(ce).mean())
    pairs = [(e.prompt, e.answer) for e in examples]
    sums, counts = score_pairs(run.engine, run.encoder, pairs, pad, d.max_length, d.eval_batch_size)
    return float(sums.sum() / counts.sum().clamp(min=1))


class Trainer:
    """Steps a :class:`Run` from ``start`` to ``--steps``: metrics, evals, best adapter, checkpoints, summary.

    Every file goes through ``out``: a :class:`~mobizo.rundir.RunDir` made with ``writes=False`` (a
    distributed rank other than 0) makes the trainer write nothing. ``header_fields`` are added to the
    metrics.jsonl header and ``summary_fields`` to every summary (the distributed mode and world size).
    """

    def __init__(
        self,
        run: Run,
        out: RunDir,
        start: dict,
        on_step=None,
        header_fields: dict | None = None,
        summary_fields: dict | None = None,
    ):
        self.run, self.cfg, self.out, self.on_step = run, run.cfg, out, on_step
        self.summary_fields = dict(summary_fields or {})
        self.kind = run.task.kind
        self.fan_in_fan_out = run.fan_in_fan_out()  # Conv1D layers (GPT-2): PEFT must know
        self.metric = main_metric(self.kind)
        self.start_step = self.step = start["step"]
        self.skipped = start["skipped_steps"]
        self.last_loss = start["last_loss"] if start["last_loss"] is not None else math.nan
        self.last_good_ckpt = self.start_step
        self.bad_run, self.total_time, self.n_timed = 0, 0.0, 0
        self.last_eval, self.last_eval_step, self.start_eval = {}, None, start.get("eval_start")
        # divergence (mobizo.divergence): the smoothed loss, the lr scale rollbacks left, and the last
        # healthy state to roll back to (kept in memory at each checkpoint while the loss is healthy)
        self.monitor = Monitor.of(start.get("monitor"))
        self.lr_scale = float(start.get("lr_scale", 1.0))
        self.rollbacks = list(start.get("rollbacks") or [])
        self.warned, self.snapshot = False, start.get("snapshot")  # (a resumed run's, kept in its checkpoint)
        resume = self.cfg.run.resume
        header = {**log_header(self.cfg.trajectory(), run.targets), **(header_fields or {})}
        self.log = out.open_log(header, self.start_step if resume else None)
        self.best = None  # {"step", "metric", "value", "score"}
        if resume:
            self.best = start.get("best") or self._best_so_far(self.log.kept)

    # ------------------------------------------------------------ loop

    def fit(self) -> dict:
        cfg = self.cfg
        o, r = cfg.optim, cfg.run
        if not r.resume:
            self._checkpoint(0)  # a run killed at any point after this can be resumed
        if r.eval_at_start and self.start_step == 0 and self.start_eval is None:
            # the starting point is a candidate for best/, and the end is compared with it
            self.start_eval = run_eval(self.run)
            self._consider_best(0, self.start_eval)
            self._checkpoint(0)
        if self.snapshot is None and self.monitor.healthy:
            self.snapshot = self._snap(self.start_step)
        progress = bar(
            o.steps, f"{cfg.engine.engine}/{o.estimator}", r.progress, initial=self.start_step, unit="step", lines=True
        )
        try:
            step = self.start_step
            while step < o.steps:
                step += 1
                self.step = step
                rec = self._train_step(step)
                if step == o.steps or (r.eval_every and step % r.eval_every == 0):
                    self.last_eval, self.last_eval_step = run_eval(self.run), step
                    rec.update(
                        {
                            f"eval_{k}": v
                            for k, v in self.last_eval.items()
                            if k not in ("n", "truncated", "seconds", "examples_per_second")
                        }
                    )
                    self._consider_best(step, self.last_eval)
                progress.set_postfix(
                    {
                        "loss": f"{self.last_loss:.4f}",
                        **({self.metric: f"{self.last_eval[self.metric]:.4f}"} if self.last_eval else {}),
                    }
                )
                progress.update(1)
                diverged = rec.pop("_diverged", False)
                self.log.append(rec)
                if self.on_step is not None:
                    self.on_step(step, rec)
                if self.bad_run >= o.max_bad_steps:
                    self._stop()
                if diverged:
                    back = self._on_divergence(step)
                    if back != step:
                        progress.update(back - step)
                        step = back
                        continue
                # Checkpoints never land inside a streak of bad steps (resuming redoes them, e.g. with a lower
                # --lr), nor while the loss is above the divergence threshold: the last one is a healthy one.
                healthy = self.monitor.healthy or r.divergence == "off"
                if r.save_every and step % r.save_every == 0 and step != o.steps and self.bad_run == 0 and healthy:
                    self.snapshot = self._snap(step)
                    self._checkpoint(step)
        finally:
            progress.close()
            self.log.close()
        if self.last_eval_step != self.step:
            self.last_eval = run_eval(self.run)
            if self.step > 0:
                self._consider_best(self.step, self.last_eval)
        result = self._summary("completed")
        if self._improved() is False and metric_score(self.kind, self.last_eval) < metric_score(
            self.kind, self.start_eval
        ):
            start, end = self.start_eval[self.metric], self.last_eval[self.metric]
            best = self.best or {}
            print(
                f"mobizo: warning: the run ended worse than it began: {self.metric} {start:.4f} at the start, "
                f"{end:.4f} at step {self.step}; best/ holds step {best.get('step')}'s adapter ({self.metric} "
                f"{best.get('value', float('nan')):.4f})",
                file=sys.stderr,
            )
        self._checkpoint(self.step)
        self.out.save_adapter(
            ADAPTER,
            self.run.engine.adapter_state(),
            cfg.adapter.rank,
            cfg.adapter.alpha,
            cfg.model,
            self.fan_in_fan_out,
        )
        self.out.write_summary(result)
        return result

    def _train_step(self, step: int) -> dict:
        cfg = self.cfg
        batch = make_batch(self.run, step)
        t0 = time.perf_counter()
        o = cfg.optim
        # logged: replay applies it as is (lr_scale: what divergence rollbacks left of it)
        lr = lr_at(step, o.lr, o.steps, o.lr_schedule, o.warmup_steps) * self.lr_scale
        res = self.run.engine.train_step(batch, step, lr, o.eps)
        dt = time.perf_counter() - t0
        self.total_time += dt
        self.n_timed += 1
        rec = {
            "step": step,
            "loss": res.loss,
            "projected_grads": res.projected_grads,
            "lr": lr,
            "eps": o.eps,
            "seconds": dt,
            **res.extra,
        }
        if step_good(res, cfg.optim.max_grad):
            self.bad_run = 0
            self.last_loss = res.loss
            if cfg.run.divergence != "off" and self.monitor.update(res.loss):
                rec["_diverged"] = True  # (not logged: the loop acts on it)
        else:  # the step left B untouched (in-graph guard); count it
            self.bad_run += 1
            self.skipped += 1
            rec["skipped"] = True
        return rec

    # ------------------------------------------------------------ files

    def _checkpoint(self, step: int) -> None:
        self.log.sync()  # the log always covers the checkpoint, even after a power cut
        cfg = self.cfg
        state = {
            "step": step,
            "config": cfg.trajectory(),
            "mobizo_version": __version__,
            "skipped_steps": self.skipped,
            "last_loss": self.last_loss,
            "settings": cfg.settings(),
            "monitor": self.monitor.state(),
            "lr_scale": self.lr_scale,
            "rollbacks": self.rollbacks,
            "eval_start": self.start_eval,
            "best": self.best,
        }
        # A checkpoint that is not the rollback point itself (a run's last step, say) keeps that point's tensors,
        # so that a resumed run rolls back where the uninterrupted one would
        snap, rollback = self.snapshot, None
        if snap is not None and snap["step"] != step:
            state["rollback"] = {k: snap[k] for k in ("step", "monitor", "skipped", "last_loss")}
            rollback = {f"adapter.{k}": v for k, v in snap["adapter"].items()}
            rollback.update({f"optimizer.{k}": v for k, v in (snap["optimizer"] or {}).items()})
        self.out.save_checkpoint(
            self.run.engine.adapter_state(),
            cfg.adapter.rank,
            cfg.adapter.alpha,
            cfg.model,
            state,
            self.run.engine.optimizer_state(),
            self.fan_in_fan_out,
            rollback,
        )
        self.last_good_ckpt = step

    # ------------------------------------------------------------ divergence

    def _snap(self, step: int) -> dict | None:
        """What a rollback restores: the adapter and rule state at ``step`` and the loop's counters. None for the
        first-order baseline (its torch optimizer state is not kept apart): a divergence stops it instead."""
        if self.cfg.optim.estimator == "fo":
            return None
        engine = self.run.engine
        return {
            "step": step,
            "adapter": engine.adapter_state(),
            "optimizer": engine.optimizer_state(),
            "monitor": self.monitor.state(),
            "skipped": self.skipped,
            "last_loss": self.last_loss,
        }

    def _on_divergence(self, step: int) -> int:
        """Act on a diverged run per ``--divergence`` (:mod:`mobizo.divergence`); the step to continue after."""
        m = self.monitor
        what = (
            f"the training loss diverged by step {step}: its moving average {m.average:.4g} stayed above "
            f"{m.threshold():.4g} ({FACTOR:g}x its lowest, {m.lowest:.4g}) for {PATIENCE} steps"
        )
        policy = self.cfg.run.divergence
        if policy == "warn":
            if not self.warned:
                print(f"mobizo: warning: {what}", file=sys.stderr)
                self.warned = True
            return step
        snap = self.snapshot
        if policy == "stop" or snap is None or len(self.rollbacks) >= MAX_ROLLBACKS:
            tried = f" after {len(self.rollbacks)} rollbacks" if self.rollbacks else ""
            msg = (
                f"training stopped at step {step}{tried}: {what}; last good checkpoint: step "
                f"{snap['step'] if snap else self.last_good_ckpt} (lower --lr and start again, or --resume "
                "with a lower --lr)"
            )
            self.out.write_summary(self._summary("diverged", msg))
            raise Diverged(msg)
        engine = self.run.engine
        engine.load_adapter_state(snap["adapter"])
        engine.load_optimizer_state(snap["optimizer"])
        self.monitor = Monitor.of(snap["monitor"])
        self.skipped, self.last_loss, self.bad_run = snap["skipped"], snap["last_loss"], 0
        self.lr_scale *= LR_CUT
        self.rollbacks.append({"at_step": step, "to_step": snap["step"], "lr_scale": self.lr_scale})
        self.log.rewind(snap["step"])  # the undone steps are redone (replay reads the log)
        print(
            f"mobizo: warning: {what}; rolled back to step {snap['step']} with the learning rate x{self.lr_scale:g} "
            f"(rollback {len(self.rollbacks)} of at most {MAX_ROLLBACKS})",
            file=sys.stderr,
        )
        self.step = snap["step"]
        self._checkpoint(snap["step"])  # a kill from here resumes the rolled-back run
        return snap["step"]

    def _consider_best(self, step: int, metrics: dict) -> None:
        """Keep ``best/`` (PEFT format) for the highest main metric; ties keep the earlier step."""
        score = metric_score(self.kind, metrics)
        if not math.isfinite(score) or (self.best is not None and score <= self.best["score"]):
            return
        self.best = {"step": step, "metric": self.metric, "value": metrics[self.metric], "score": score}
        a = self.cfg.adapter
        self.out.save_adapter(
            BEST, self.run.engine.adapter_state(), a.rank, a.alpha, self.cfg.model, self.fan_in_fan_out
        )

    def _best_so_far(self, records: list[dict]) -> dict | None:
        """The best eval among the start's and the kept records' (resume), if its ``best/`` adapter exists."""
        if not self.out.has(BEST):
            return None
        key, best = f"eval_{self.metric}", None
        start = [{"step": 0, key: self.start_eval[self.metric]}] if self.start_eval else []
        for rec in start + records:
            if isinstance(rec.get(key), (int, float)):
                score = metric_score(self.kind, {self.metric: rec[key]})
                if best is None or score > best["score"]:
                    best = {"step": rec["step"], "metric": self.metric, "value": rec[key], "score": score}
        return best

    def _summary(self, status: str, error: str | None = None) -> dict:
        cfg, ev = self.cfg, self.last_eval or {}
        s = {
            "status": status,
            "final_step": self.step,
            "final_loss": self.last_loss,
            "eval": ev,
            "eval_start": self.start_eval,
            "metric": self.metric,
            f"eval_{self.metric}": ev.get(self.metric),
            "eval_accuracy": ev.get("accuracy"),
            "eval_loss": ev.get("loss"),
            "best": None if self.best is None else {k: v for k, v in self.best.items() if k != "score"},
            "truncated": self.run.truncated,
            "skipped_steps": self.skipped,
            "improved": self._improved(),
            "rollbacks": self.rollbacks,
            "seconds_per_step": self.total_time / self.n_timed if self.n_timed else None,
            "engine": cfg.engine.engine,
            "device": None if self.run.device is None else str(self.run.device),  # this invocation's (not resumed)
            "estimator": cfg.optim.estimator,
            "out": str(self.out.path),
            "config": cfg.trajectory(),
            "mobizo_version": __version__,
        }
        if error:
            s["error"] = error
            s["last_checkpoint_step"] = self.last_good_ckpt
        s.update(self.summary_fields)
        return s

    def _improved(self) -> bool | None:
        """Whether the last eval beats the starting one (None without both)."""
        if not self.start_eval or not self.last_eval:
            return None
        return metric_score(self.kind, self.last_eval) > metric_score(self.kind, self.start_eval)

    def write_failure(self, error: str, step: int) -> None:
        """Write ``summary.json`` with status ``failed`` for a run stopped from outside the loop (a failed
        collective): ``error`` is the one-line reason, ``step`` the last step whose update was applied."""
        self.step = step
        self.out.write_summary(self._summary("failed", error))

    def _stop(self) -> None:
        msg = (
            f"training stopped at step {self.step}: {self.bad_run} consecutive bad steps (non-finite loss or |g| > "
            f"--max-grad, or an update that would overflow B); last good checkpoint: step {self.last_good_ckpt} in "
            f"{self.out / 'checkpoint'} (resume it with --resume and a lower --lr or --eps)"
        )
        self.out.write_summary(self._summary("stopped", msg))
        raise BadSteps(msg)
