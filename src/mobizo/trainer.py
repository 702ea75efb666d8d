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

from . import __version__
from .build import Run, assemble, build_engine, needs_weights
from .config import DEFAULTS, FIELDS, TrainConfig, flag, non_default
from .data import collate, collate_choices, step_indices
from .errors import MobizoError
from .evaluation import evaluate, main_metric, metric_score
from .progress import bar
from .rundir import ADAPTER, BEST, PROGRAM_DIR, RunDir, default_out, log_header
from .schedule import lr_at
from .step import step_good


class BadSteps(MobizoError):
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
    saved = state.get("config") or {}
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
    if cfg.optim.lr_schedule != "constant" and saved_steps is not None and cfg.optim.steps != saved_steps:
        raise MobizoError(
            f"--resume: with --lr-schedule {cfg.optim.lr_schedule} --steps shapes every step's lr; the run "
            f"in {out.path} used --steps {saved_steps}"
        )
    return cfg


def _fixed(trajectory: dict) -> dict:
    return {k: v for k, v in trajectory.items() if not FIELDS[k].metadata.get("recovery")}


def fresh_start() -> dict:
    """The loop's starting counters of a new run (:func:`restore` gives a resumed run's)."""
    return {"step": 0, "skipped_steps": 0, "last_loss": None}


def restore(run: Run, out: RunDir) -> dict:
    """Load ``out``'s checkpoint into ``run``'s engine (after checking it belongs to ``run``'s
    configuration); the loop's starting counters."""
    cfg = run.cfg
    adapter, _, state, opt_state = out.load_checkpoint()
    saved = state.get("config") or {}
    # a field the checkpoint predates (e.g. --quantize) had its default in that run
    if saved and _fixed({k: saved.get(k, DEFAULTS[k]) for k in cfg.trajectory()}) != _fixed(cfg.trajectory()):
        raise MobizoError(f"--resume: the checkpoint in {out.path} belongs to a different run configuration")
    if state["step"] > cfg.optim.steps:
        raise MobizoError(
            f"--resume: the checkpoint in {out.path} is at step {state['step']}, past --steps {cfg.optim.steps}"
        )
    run.engine.load_adapter_state(adapter)
    run.engine.load_optimizer_state(opt_state)
    return {"step": state["step"], "skipped_steps": state.get("skipped_steps", 0), "last_loss": state.get("last_loss")}


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
    cfg = cfg.replace(out=str(out.path))
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
    out.open(cfg.run.resume, cfg.run.overwrite, keep_program=own_program)
    start = restore(run, out) if cfg.run.resume else fresh_start()
    return Trainer(run, out, start, on_step).fit()


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
        self.last_eval, self.last_eval_step, self.start_eval = {}, None, None
        resume = self.cfg.run.resume
        header = {**log_header(self.cfg.trajectory(), run.targets), **(header_fields or {})}
        self.log = out.open_log(header, self.start_step if resume else None)
        self.best = self._best_so_far(self.log.kept) if resume else None  # {"step","metric","value","score"}

    # ------------------------------------------------------------ loop

    def fit(self) -> dict:
        cfg = self.cfg
        o, r = cfg.optim, cfg.run
        if not r.resume:
            self._checkpoint(0)  # a run killed at any point after this can be resumed
        if r.eval_at_start:
            self.start_eval = run_eval(self.run)
        progress = bar(
            o.steps, f"{cfg.engine.engine}/{o.estimator}", r.progress, initial=self.start_step, unit="step", lines=True
        )
        try:
            for step in range(self.start_step + 1, o.steps + 1):
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
                self.log.append(rec)
                if self.on_step is not None:
                    self.on_step(step, rec)
                if self.bad_run >= o.max_bad_steps:
                    self._stop()
                # Checkpoints never land inside a streak of bad steps: resuming redoes them (e.g. with a lower --lr).
                if r.save_every and step % r.save_every == 0 and step != o.steps and self.bad_run == 0:
                    self._checkpoint(step)
        finally:
            progress.close()
            self.log.close()
        if self.last_eval_step != self.step:
            self.last_eval = run_eval(self.run)
            if self.step > 0:
                self._consider_best(self.step, self.last_eval)
        result = self._summary("completed")
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
        lr = lr_at(step, o.lr, o.steps, o.lr_schedule, o.warmup_steps)  # logged: replay applies it as is
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
        }
        self.out.save_checkpoint(
            self.run.engine.adapter_state(),
            cfg.adapter.rank,
            cfg.adapter.alpha,
            cfg.model,
            state,
            self.run.engine.optimizer_state(),
            self.fan_in_fan_out,
        )
        self.last_good_ckpt = step

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
        """The best periodic eval among the kept records (resume), if its ``best/`` adapter exists."""
        if not self.out.has(BEST):
            return None
        key, best = f"eval_{self.metric}", None
        for rec in records:
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
            "seconds_per_step": self.total_time / self.n_timed if self.n_timed else None,
            "engine": cfg.engine.engine,
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
