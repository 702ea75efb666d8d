"""Run a grid of ``mobizo train`` runs (one subprocess each) and keep one JSON result per run.

    PYTHONPATH=src python benchmarks/convergence/run.py --tasks-dir TASKS --out RESULTS \\
        --models /path/SmolLM2-135M-Instruct.Q4_1.gguf --tasks sentiment,language --rules sgd,fzoo,fo \\
        --lrs 1e-3,3e-3 --seeds 0,1 --steps 300 [--queries 4] [--batch-sizes 8] [--jobs 1] [--threads 1]

    # the lr sweep: short runs over each rule's lr grid on one task; writes RESULTS/sweep.json with the
    # best lr per rule, which a grid then takes with --best-lrs RESULTS/sweep.json
    PYTHONPATH=src python benchmarks/convergence/run.py --tasks-dir TASKS --out SWEEP --sweep --tasks sentiment

TASKS is a folder from make_tasks.py (its tasks.json names each task's data folder, template and label
words). Grid axes: model, task, rule (sgd momentum adam sign fzoo hizoo: ``--estimator prge
--optimizer RULE``; fo: ``--estimator fo --optimizer adamw``, first-order LoRA-FA; fo-sgd), lr, seed,
steps, q, batch. Every run evaluates at the start, every ``--eval-every`` steps and at the end.

A result RESULTS/runs/<id>.json holds the curve: per eval, the step, the forward rows so far, the
training seconds so far (the sum of the logged per-step times: model loading and evaluation are not
counted) and the eval metrics; also the zero-shot, final and best metric and s/step. A run whose
result says ``completed`` (or ``stopped``: it diverged, which is a result too), with the same
``--eval-every`` and ``--eval-examples``, is not run again; anything else is re-run from scratch. The mobizo run directories are kept in RESULTS/work/.

Forward rows: a step's batch has R rows, built by mobizo's own batch code from the run's config
(``mobizo.trainer.make_batch`` on the run's examples, tokenizer and seed): R = batch for answer-scored
(prompt/completion) tasks and for classification / multiple choice whose candidates are all one token
(the shared-prompt layout), else batch x candidates. The step's forwards run R rows per copy of B:
prge / prge-outer / mezo run 2q copies (+1 unperturbed copy for hizoo), ``--data-mode split`` gives each
direction its 1/q of the rows (``mobizo.step.forward_plan`` and the step's row copying are asked, not
re-derived). fo runs one forward of R rows plus a backward (counted in ``backward_rows``, not in ``rows``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ZO_RULES = ("sgd", "momentum", "adam", "sign", "fzoo", "hizoo")
FO_RULES = {"fo": "adamw", "fo-sgd": "sgd"}
RULES = ZO_RULES + tuple(FO_RULES)
DEFAULT_RULES = ZO_RULES + ("fo",)
EPS = 1e-2
# Starting points only (SGD's from benchmarks/real/sweep.md on SmolLM2, q=4, batch 8; the others scaled by how
# each rule sizes its step); run --sweep and pass its file with --best-lrs for the real grid.
DEFAULT_LRS = {
    "sgd": 1e-2,
    "momentum": 1e-3,
    "adam": 1e-3,
    "sign": 1e-4,
    "fzoo": 1e-3,
    "hizoo": 1e-2,
    "fo": 1e-3,
    "fo-sgd": 1e-1,
}
# the --sweep grids: a decade and a half around the starting point, in half-decade steps
SWEEP_LRS = {r: [float(f"{lr * f:.3g}") for f in (0.1, 0.3, 1.0, 3.0, 10.0)] for r, lr in DEFAULT_LRS.items()}
SWEEP_STEPS = 80
DONE = ("completed", "stopped")


def fail(msg: str):
    sys.exit(f"run.py: {msg}")


def floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"expected comma-separated numbers, got {text!r}")


def ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"expected comma-separated integers, got {text!r}")


def names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def model_tag(model: str) -> str:
    return "tiny" if model == "tiny" else Path(model).name.removesuffix(".gguf")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)


# ----------------------------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Spec:
    model: str
    task: str
    rule: str
    lr: float
    seed: int
    steps: int
    q: int  # 0 for fo (no directions)
    batch: int
    eps: float = EPS
    extra: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        parts = [self.task, model_tag(self.model), self.rule, f"lr{self.lr:g}", f"q{self.q}", f"b{self.batch}"]
        parts += [f"n{self.steps}", f"s{self.seed}"]
        if self.eps != EPS:
            parts.append(f"eps{self.eps:g}")
        if self.extra:
            parts.append("x" + hashlib.sha256(" ".join(self.extra).encode()).hexdigest()[:8])
        return slug("--".join(parts))

    def grid(self) -> dict:
        return {
            "model": self.model,
            "model_tag": model_tag(self.model),
            "task": self.task,
            "rule": self.rule,
            "lr": self.lr,
            "seed": self.seed,
            "steps": self.steps,
            "q": self.q,
            "batch": self.batch,
            "eps": self.eps,
            "extra": list(self.extra),
        }


def rule_flags(rule: str) -> list[str]:
    if rule in FO_RULES:
        return ["--estimator", "fo", "--optimizer", FO_RULES[rule]]
    return ["--estimator", "prge", "--optimizer", rule]


@dataclass
class Options:
    tasks: dict  # name -> tasks.json entry
    tasks_dir: Path
    out: Path
    eval_every: int
    eval_examples: int
    threads: int
    python: str = sys.executable
    lock: threading.Lock = field(default_factory=threading.Lock)


def command(spec: Spec, o: Options, run_dir: Path) -> list[str]:
    t = o.tasks[spec.task]
    cmd = [o.python, "-m", "mobizo", "train", "--model", spec.model, "--task", "custom"]
    cmd += ["--data", str((o.tasks_dir / t["data"]).resolve())]
    if t.get("template"):
        cmd += ["--template", t["template"]]
    if t.get("label_words"):
        cmd += ["--label-words", t["label_words"]]
    cmd += rule_flags(spec.rule)
    cmd += ["--lr", repr(spec.lr), "--eps", repr(spec.eps), "--seed", str(spec.seed), "--steps", str(spec.steps)]
    if spec.q:
        cmd += ["--queries", str(spec.q)]
    cmd += ["--batch-size", str(spec.batch), "--eval-every", str(o.eval_every), "--eval-examples", str(o.eval_examples)]
    cmd += ["--eval-at-start", "--save-every", "0", "--threads", str(o.threads), "--no-progress"]
    cmd += ["--out", str(run_dir), "--overwrite", *spec.extra]
    return cmd


# ----------------------------------------------------------------------------------------------- rows


BATCH_FIELDS = (  # what decides a step's batch (its rows): not the rule, the lr or q
    "model",
    "task",
    "data",
    "template",
    "label_words",
    "seed",
    "batch_size",
    "train_examples",
    "max_length",
    "truncation",
    "objective",
)


_ASSEMBLED: dict[str, object] = {}  # the assembled runs (tokenizer + examples) of this process, by config


def batch_rows(config: dict, steps: int) -> list[int]:
    """Rows of the batch of each step 1..steps, from mobizo's own batch builder on the run's config."""
    from types import SimpleNamespace

    from mobizo.util import quiet_third_party

    quiet_third_party()  # torchao / pytree import chatter
    from mobizo.build import assemble
    from mobizo.config import TrainConfig
    from mobizo.engines import Shapes
    from mobizo.trainer import make_batch

    keep = {k: config[k] for k in BATCH_FIELDS if k in config}
    cfg = TrainConfig.from_flat(**keep, eval_examples=1, progress=False, threads=1)
    # the seed and the batch size only pick the steps' examples, unless the seed also samples the training set
    loaded = {k: v for k, v in keep.items() if k != "batch_size" and (k != "seed" or keep.get("train_examples"))}
    key = json.dumps(loaded, sort_keys=True)
    if key not in _ASSEMBLED:  # loading a GGUF's tokenizer takes ~10-30 s: once per model and task
        run = assemble(cfg, weights=False, inject_adapter=False)  # tokenizer and examples; no weights needed
        run.engine = SimpleNamespace(shapes=Shapes())  # the eager engine's free shapes
        _ASSEMBLED[key] = run
    run = _ASSEMBLED[key]
    run.cfg = cfg
    return [make_batch(run, s).rows for s in range(1, steps + 1)]


def copy_rows(config: dict, rows: int) -> tuple[int, int]:
    """(forward rows, backward rows) of one step whose batch has ``rows`` rows."""
    if config["estimator"] == "fo":
        return rows, rows
    import torch

    from mobizo.step import _copy_rows, forward_plan
    from mobizo.zo_optim import rule

    plan = forward_plan(config["estimator"], config["queries"], center=rule(config["optimizer"]).center)
    split = config.get("data_mode") == "split"
    probe = torch.zeros(rows, 1)
    return sum(_copy_rows(probe, copies, config["queries"], split).shape[0] for copies in plan), 0


def data_digest(data: str | None) -> str | None:
    """sha256 over the files of a task's data folder (or file)."""
    if not data:
        return None
    p = Path(data)
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
        if f.is_file():
            h.update(f"{f.relative_to(p) if p.is_dir() else f.name}\n".encode() + f.read_bytes())
    return h.hexdigest()


class RowsCache:
    """Batch rows per step, per batch-deciding config (``BATCH_FIELDS``), kept in OUT/rows-cache.json."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, config: dict, steps: int) -> list[int]:
        key = {k: config.get(k) for k in BATCH_FIELDS}
        key["data_sha256"] = data_digest(config.get("data"))  # a rebuilt task under the same path is another key
        key = json.dumps(key, sort_keys=True)
        if len(self.data.get(key, [])) < steps:
            self.data[key] = batch_rows(config, steps)
            self.path.write_text(json.dumps(self.data))
        return self.data[key][:steps]


# ----------------------------------------------------------------------------------------------- results


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_metrics(record: dict, prefix: str = "") -> dict:
    keys = ("accuracy", "loss", "f1", "exact_match", "perplexity")
    return {k: record[prefix + k] for k in keys if isinstance(record.get(prefix + k), (int, float))}


def higher_is_better(metric: str) -> bool:
    return metric not in ("loss", "perplexity")


def collect(spec: Spec, run_dir: Path, rows_cache: RowsCache, kind: str | None = None) -> dict:
    """The result of a finished run from its metrics.jsonl and summary.json."""
    log = read_jsonl(run_dir / "metrics.jsonl")
    header, steps = log[0], [r for r in log[1:] if "step" in r]
    config = header["config"]
    summary = json.loads((run_dir / "summary.json").read_text())
    metric = summary["metric"]
    base = rows_cache.get(config, len(steps)) if steps else []
    fwd = [copy_rows(config, r) for r in base]
    curve = [{"step": 0, "rows": 0, "backward_rows": 0, "seconds": 0.0, **eval_metrics(summary["eval_start"] or {})}]
    rows = back = 0
    secs = 0.0
    for rec, (f, b) in zip(steps, fwd):
        rows, back, secs = rows + f, back + b, secs + rec["seconds"]
        m = eval_metrics(rec, "eval_")
        if m:
            curve.append({"step": rec["step"], "rows": rows, "backward_rows": back, "seconds": secs, **m})
    final = summary.get("eval") or {}
    if summary["status"] == "completed" and curve[-1]["step"] != summary["final_step"]:
        # the end-of-run eval of a run whose last step was not an eval step
        curve.append({"step": summary["final_step"], "rows": rows, "backward_rows": back, "seconds": secs})
        curve[-1].update(eval_metrics(final))
    trained = [p for p in curve[1:] if isinstance(p.get(metric), (int, float)) and math.isfinite(p[metric])]
    pick = max if higher_is_better(metric) else min
    best = pick(trained, key=lambda p: p[metric]) if trained else None
    step_secs = [r["seconds"] for r in steps]
    return {
        "id": spec.id,
        "status": summary["status"],
        "error": summary.get("error"),
        "grid": spec.grid(),
        "kind": kind,
        "metric": metric,
        "higher_is_better": higher_is_better(metric),
        "zero_shot": eval_metrics(summary["eval_start"] or {}),
        "final": {"step": summary["final_step"], **eval_metrics(final)},
        "best": None if best is None else {"step": best["step"], metric: best[metric]},
        "curve": curve,
        "rows_per_step": {
            "batch_rows": sorted(set(base)),
            "forward_rows": sorted({f for f, _ in fwd}),
            "backward_rows": sorted({b for _, b in fwd}),
            "how": "mobizo make_batch rows x forward_plan copies (see run.py's docstring)",
        },
        "seconds_per_step": summary.get("seconds_per_step"),
        "median_step_seconds": statistics.median(step_secs) if step_secs else None,
        "train_loss": [r["loss"] for r in steps],
        "skipped_steps": summary.get("skipped_steps"),
        "config": config,
        "mobizo_version": summary.get("mobizo_version"),
    }


def strict_json(obj) -> str:
    """JSON without NaN / Infinity (a diverged run's losses become null)."""

    def clean(x):
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), indent=1, allow_nan=False)


def result_path(o: Options, spec: Spec) -> Path:
    return o.out / "runs" / f"{spec.id}.json"


def load_result(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_one(spec: Spec, o: Options, rows_cache: RowsCache, index: str) -> dict:
    path = result_path(o, spec)
    old = load_result(path)
    evals = {"eval_every": o.eval_every, "eval_examples": o.eval_examples}
    # a result with other eval points (a --sweep's start/end evals) is no curve for this grid: run it again
    if old and old.get("status") in DONE and all(old.get(k) == v for k, v in evals.items()):
        print(f"{index} {spec.id}: done before ({old['status']})", flush=True)
        return old
    run_dir = o.out / "work" / spec.id
    log_path = o.out / "logs" / f"{spec.id}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(spec, o, run_dir)
    env = {**os.environ, "OMP_NUM_THREADS": str(o.threads), "MKL_NUM_THREADS": str(o.threads)}
    print(f"{index} {spec.id}: running", flush=True)
    load0, t0 = os.getloadavg(), time.time()
    with open(log_path, "w") as log:
        log.write(shlex.join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.time() - t0
    extra = {
        **evals,
        "command": cmd,
        "returncode": rc,
        "wall_seconds": wall,
        "threads": o.threads,
        "loadavg": {"start": load0, "end": os.getloadavg()},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "log": str(log_path),
    }
    if (run_dir / "summary.json").is_file() and (run_dir / "metrics.jsonl").is_file():
        with o.lock:  # the rows cache is shared by the worker threads
            res = collect(spec, run_dir, rows_cache, o.tasks[spec.task].get("kind"))
    else:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        res = {"id": spec.id, "status": "failed", "error": tail[0], "grid": spec.grid()}
    res.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(strict_json(res))
    tmp.replace(path)  # a result file is whole or absent
    f = res.get("final", {}).get(res.get("metric"))
    what = f"final {res['metric']} {f:.4f}" if isinstance(f, float) else res.get("error") or ""
    print(f"{index} {spec.id}: {res['status']} in {wall:.0f} s, {what}", flush=True)
    return res


# ----------------------------------------------------------------------------------------------- sweep


def pick_best_lr(runs: list[dict], higher_better: bool) -> float | None:
    """The lr whose run ends best: the final main metric (higher or lower is better), ties to the larger lr;
    runs that did not complete or ended on a non-finite value never win. ``runs``: [{"lr", "status", "final"}]."""
    ok = [r for r in runs if r["status"] == "completed" and isinstance(r["final"], (int, float))]
    ok = [r for r in ok if math.isfinite(r["final"])]
    if not ok:
        return None
    sign = 1.0 if higher_better else -1.0
    return max(ok, key=lambda r: (sign * r["final"], r["lr"]))["lr"]


def write_sweep(results: list[dict], out: Path) -> dict:
    by_rule: dict[str, list[dict]] = {}
    for r in results:
        by_rule.setdefault(r["grid"]["rule"], []).append(r)
    doc = {"rules": {}, "best_lrs": {}}
    for rule, rs in by_rule.items():
        metric = next((r["metric"] for r in rs if "metric" in r), "accuracy")
        higher = higher_is_better(metric)
        runs = [
            {"lr": r["grid"]["lr"], "status": r["status"], "final": (r.get("final") or {}).get(metric)}
            for r in sorted(rs, key=lambda r: r["grid"]["lr"])
        ]
        best = pick_best_lr(runs, higher)
        doc["rules"][rule] = {"metric": metric, "higher_is_better": higher, "best_lr": best, "runs": runs}
        if best is not None:
            doc["best_lrs"][rule] = best
    g = results[0]["grid"] if results else {}
    doc.update({k: g.get(k) for k in ("task", "model", "steps", "seed", "q", "batch", "eps")})
    (out / "sweep.json").write_text(json.dumps(doc, indent=1))
    lines = [f"lr sweep: task {g.get('task')}, model {g.get('model')}, {g.get('steps')} steps, seed {g.get('seed')}"]
    for rule, d in doc["rules"].items():
        vals = ", ".join(
            f"{r['lr']:g}: {r['final']:.4f}" if isinstance(r["final"], float) else f"{r['lr']:g}: {r['status']}"
            for r in d["runs"]
        )
        lines.append(f"  {rule:9s} best lr {d['best_lr']}  ({d['metric']}: {vals})")
    print("\n".join(lines), flush=True)
    return doc


# ----------------------------------------------------------------------------------------------- main


def lr_table(args) -> dict[str, list[float]]:
    """Per rule: the lrs to run (--lrs for all, then --rule-lr, then --best-lrs, each overriding the last)."""
    table = {r: ([lr] if not args.sweep else list(SWEEP_LRS[r])) for r, lr in DEFAULT_LRS.items()}
    if args.lrs:
        table = {r: floats(args.lrs) for r in table}
    for item in args.rule_lr or []:
        rule, _, values = item.partition("=")
        if rule not in RULES or not values:
            fail(f"--rule-lr wants RULE=LR[,LR...] with RULE one of {', '.join(RULES)}, got {item!r}")
        table[rule] = floats(values)
    if args.best_lrs:
        doc = json.loads(Path(args.best_lrs).read_text())
        for rule, lr in doc.get("best_lrs", doc).items():
            table[rule] = [float(lr)]
    return table


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tasks-dir", type=Path, required=True, help="folder from make_tasks.py (with tasks.json)")
    ap.add_argument("--out", type=Path, required=True, help="results folder (runs/, logs/, work/)")
    ap.add_argument("--models", default="tiny", help="comma-separated: a .gguf file, a model directory or tiny")
    ap.add_argument("--tasks", default=None, help="comma-separated task names of tasks.json (default: all)")
    ap.add_argument("--rules", default=",".join(DEFAULT_RULES), help=f"comma-separated, of {', '.join(RULES)}")
    ap.add_argument("--lrs", default=None, help="comma-separated lrs for every rule (default: per rule, see run.py)")
    ap.add_argument("--rule-lr", action="append", metavar="RULE=LR[,LR]", help="lrs of one rule (repeatable)")
    ap.add_argument("--best-lrs", default=None, help="sweep.json from --sweep: each rule at its best lr")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", default=None, help=f"comma-separated (default 500; --sweep: {SWEEP_STEPS})")
    ap.add_argument("--queries", "-q", default="4", help="comma-separated q (ignored by fo)")
    ap.add_argument("--batch-sizes", default="8")
    ap.add_argument("--eps", type=float, default=EPS)
    ap.add_argument("--eval-every", type=int, default=None, help="default 50; --sweep: only at the start and end")
    ap.add_argument(
        "--eval-examples",
        type=int,
        default=0,
        help="0 (default): the whole validation split, the same examples for every seed",
    )
    ap.add_argument("--threads", type=int, default=1, help="threads per run (OMP_NUM_THREADS and --threads)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (they are CPU bound: jobs x threads <= cores)")
    ap.add_argument("--train-args", default="", help='more `mobizo train` flags, e.g. "--max-length 64"')
    ap.add_argument("--sweep", action="store_true", help="short runs over each rule's lr grid; writes sweep.json")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    index = args.tasks_dir / "tasks.json"
    if not index.is_file():
        fail(f"no {index} (build the tasks with make_tasks.py)")
    tasks = json.loads(index.read_text())
    task_names = names(args.tasks) if args.tasks else list(tasks)
    for t in task_names:
        if t not in tasks:
            fail(f"unknown task {t!r} (tasks.json has {', '.join(tasks)})")
    rules = names(args.rules)
    for r in rules:
        if r not in RULES:
            fail(f"unknown rule {r!r} (choose from {', '.join(RULES)})")
    models = names(args.models)
    steps = ints(args.steps) if args.steps else [SWEEP_STEPS if args.sweep else 500]
    seeds = ints(args.seeds)
    if args.sweep:
        if len(task_names) != 1 or len(models) != 1:
            fail("--sweep runs on one task and one model (--tasks NAME --models M)")
        seeds, steps = seeds[:1], steps[:1]
    lrs = lr_table(args)
    extra = tuple(shlex.split(args.train_args))
    specs, seen = [], set()
    for model in models:
        for task in task_names:
            for rule in rules:
                for q in ints(args.queries):
                    for b in ints(args.batch_sizes):
                        for n in steps:
                            for lr in lrs[rule]:
                                for seed in seeds:
                                    s = Spec(model, task, rule, lr, seed, n, 0 if rule in FO_RULES else q, b)
                                    s = Spec(**{**s.__dict__, "eps": args.eps, "extra": extra})
                                    if s not in seen:  # fo has no q: one run for every q
                                        seen.add(s)
                                        specs.append(s)
    eval_every = args.eval_every if args.eval_every is not None else (0 if args.sweep else 50)
    o = Options(tasks, args.tasks_dir, args.out, eval_every, args.eval_examples, args.threads)
    if args.dry_run:
        for s in specs:
            print(shlex.join(command(s, o, args.out / "work" / s.id)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    rows_cache = RowsCache(args.out / "rows-cache.json")
    n = len(specs)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_one, s, o, rows_cache, f"[{i}/{n}]") for i, s in enumerate(specs, 1)]
        results = [f.result() for f in futures]
    failed = [r for r in results if r["status"] not in DONE]
    if args.sweep:
        write_sweep(results, args.out)
    print(f"{n - len(failed)} of {n} runs finished; results in {args.out / 'runs'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
