"""``mobizo bench convergence``: loss and validation accuracy vs step and vs wall-clock.

P-RGE with q in {1, 2, 4, 8} at a fixed q x batch = 16 sequences per step (the paper's design),
plus the first-order baseline (AdamW on the same LoRA-FA adapter, batch 16), over several
seeds. All runs advance together, one step each in turn (run A step s, run B step s, ...), so
the wall-clock axis of every curve sees the same machine load. Built from the trainer's own
pieces (``prepare``, ``make_batch``, the engine's ``train_step``, ``run_eval``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import md_table, progress, set_threads

SEQUENCES_PER_STEP = 16
# Settings found to work on tiny + synthetic (benchmarks/README.md): P-RGE lr 4, eps 0.02; FO AdamW lr 1e-2.
ZO_LR, ZO_EPS, FO_LR = 4.0, 0.02, 1e-2


@dataclass
class ConvPlan:
    queries: list[int]
    seeds: list[int]
    steps: int
    eval_every: int
    eval_examples: int
    model: str = "tiny"
    task: str = "synthetic"
    data: str | None = None
    max_length: int = 64
    fo: bool = True


def plan(quick: bool, model="tiny", task="synthetic", data=None, seeds=None, steps=None) -> ConvPlan:
    if quick:
        p = ConvPlan(queries=[1, 4], seeds=[0, 1], steps=12, eval_every=6, eval_examples=32)
    else:
        p = ConvPlan(queries=[1, 2, 4, 8], seeds=[0, 1, 2], steps=600, eval_every=60, eval_examples=200)
    p.model, p.task, p.data = model or "tiny", task or "synthetic", data
    if seeds:
        p.seeds = list(range(seeds))
    if steps:
        p.steps = steps
        p.eval_every = max(1, min(p.eval_every, steps))
    return p


def contenders(p: ConvPlan) -> list[dict]:
    out = [
        dict(
            name=f"prge q={q}",
            estimator="prge",
            queries=q,
            batch_size=SEQUENCES_PER_STEP // q,
            lr=ZO_LR,
            eps=ZO_EPS,
            optimizer="sgd",
        )
        for q in p.queries
    ]
    if p.fo:
        out.append(
            dict(
                name="FO (AdamW)",
                estimator="fo",
                queries=1,
                batch_size=SEQUENCES_PER_STEP,
                lr=FO_LR,
                eps=ZO_EPS,
                optimizer="adamw",
            )
        )
    return out


def run_convergence(
    out: Path,
    quick: bool,
    threads: int,
    model="tiny",
    task="synthetic",
    data=None,
    seeds=None,
    steps=None,
    bar_enabled: bool = True,
) -> dict:
    from mobizo.build import build_run
    from mobizo.config import TrainConfig
    from mobizo.trainer import make_batch, run_eval

    p = plan(quick, model, task, data, seeds, steps)
    set_threads(threads)
    cons = contenders(p)
    bar = progress(len(cons) * len(p.seeds) * (p.steps + 1), "bench convergence", bar_enabled)
    runs = []
    try:
        for c in cons:
            for seed in p.seeds:
                bar.set_description(f"bench convergence: prepare {c['name']} seed {seed}")
                cfg = TrainConfig.from_flat(
                    model=p.model,
                    task=p.task,
                    data=p.data,
                    estimator=c["estimator"],
                    queries=c["queries"],
                    batch_size=c["batch_size"],
                    lr=c["lr"],
                    eps=c["eps"],
                    optimizer=c["optimizer"],
                    steps=p.steps,
                    rank=8,
                    alpha=16.0,
                    target_modules=["q_proj", "v_proj"],
                    seed=seed,
                    max_length=p.max_length,
                    eval_every=0,
                    save_every=0,
                    eval_examples=p.eval_examples,
                    progress=False,
                    device="cpu",  # a CPU benchmark (step times beside the ExecuTorch engine's)
                )
                run = build_run(cfg)
                ev = run_eval(run)
                runs.append(
                    {
                        "contender": c["name"],
                        "seed": seed,
                        "run": run,
                        "cfg": cfg,
                        "loss": [],
                        "seconds": [],
                        "evals": [{"step": 0, "seconds": 0.0, **_ev(ev)}],
                    }
                )
                bar.update(1)
        bar.set_description("bench convergence: training")
        for step in range(1, p.steps + 1):
            for r in runs:  # interleaved: every run takes its step s before any takes s+1
                run, cfg = r["run"], r["cfg"]
                batch = make_batch(run, step)
                t0 = time.perf_counter()
                res = run.engine.train_step(batch, step, cfg.optim.lr, cfg.optim.eps)
                r["seconds"].append(time.perf_counter() - t0)
                r["loss"].append(res.loss)
                bar.update(1)
            if step % p.eval_every == 0 or step == p.steps:
                for r in runs:
                    r["evals"].append({"step": step, "seconds": float(sum(r["seconds"])), **_ev(run_eval(r["run"]))})
    finally:
        bar.close()
    metric = runs[0]["run"].task.kind
    result = {
        "plan": {
            "queries": p.queries,
            "seeds": p.seeds,
            "steps": p.steps,
            "eval_every": p.eval_every,
            "eval_examples": p.eval_examples,
            "model": p.model,
            "task": p.task,
            "data": p.data,
            "max_length": p.max_length,
            "sequences_per_step": SEQUENCES_PER_STEP,
            "threads": threads,
            "zo": {
                "lr": ZO_LR,
                "eps": ZO_EPS,
                "estimator": "prge",
                "rank": 8,
                "alpha": 16,
                "target_modules": ["q_proj", "v_proj"],
                "objective": runs[0]["run"].objective,
            },
            "fo": {"optimizer": "adamw", "lr": FO_LR, "batch_size": SEQUENCES_PER_STEP},
        },
        "task_kind": metric,
        "contenders": cons,
        "runs": [
            {
                "contender": r["contender"],
                "seed": r["seed"],
                "loss": r["loss"],
                "seconds": r["seconds"],
                "evals": r["evals"],
            }
            for r in runs
        ],
    }
    result["summary"] = summary(result)
    return result


def _ev(ev: dict) -> dict:
    return {k: float(v) for k, v in ev.items() if isinstance(v, (int, float)) and k not in ("n", "truncated")}


def _metric(result) -> str:
    ev = result["runs"][0]["evals"][-1]
    for k in ("accuracy", "f1", "loss"):
        if k in ev:
            return k
    return "loss"


def summary(result) -> list[dict]:
    metric = _metric(result)
    out = []
    for c in result["contenders"]:
        rs = [r for r in result["runs"] if r["contender"] == c["name"]]
        final = np.array([r["evals"][-1][metric] for r in rs])
        best = np.array([max(e[metric] for e in r["evals"]) for r in rs])
        tail = max(1, len(rs[0]["loss"]) // 10)
        last_loss = np.array([np.mean(r["loss"][-tail:]) for r in rs])
        sps = np.array([np.median(r["seconds"]) for r in rs])
        total = np.array([sum(r["seconds"]) for r in rs])
        out.append(
            {
                "contender": c["name"],
                "q": c["queries"] if c["estimator"] != "fo" else None,
                "batch": c["batch_size"],
                "metric": metric,
                "final_mean": float(final.mean()),
                "final_std": float(final.std()),
                "final_min": float(final.min()),
                "final_max": float(final.max()),
                "best_mean": float(best.mean()),
                "train_loss_last10pct": float(last_loss.mean()),
                "seconds_per_step": float(np.median(sps)),
                "train_seconds": float(total.mean()),
                "seeds": len(rs),
            }
        )
    return out


def markdown(res: dict) -> str:
    p = res["plan"]
    metric = res["summary"][0]["metric"] if res["summary"] else "accuracy"
    lines = [
        "## Convergence",
        "",
        (
            f"Task `{p['task']}` on `{p['model']}`, {p['steps']} steps, seeds {p['seeds']}, "
            f"{p['sequences_per_step']} sequences per step (q x batch), eval on {p['eval_examples']} validation "
            f"examples every {p['eval_every']} steps. ZO: prge, lr {p['zo']['lr']}, eps {p['zo']['eps']}, rank 8, "
            f"alpha 16, q_proj/v_proj, objective {p['zo']['objective']}. FO: AdamW lr {p['fo']['lr']}, batch "
            f"{p['fo']['batch_size']}, same adapter (LoRA-FA). Runs interleaved step by step; "
            f"{p['threads']} thread(s)."
        ),
        "",
    ]
    rows = [
        [
            s["contender"],
            s["batch"],
            f"{s['final_mean']:.3f} ± {s['final_std']:.3f}",
            f"{s['final_min']:.3f} – {s['final_max']:.3f}",
            s["best_mean"],
            s["train_loss_last10pct"],
            s["seconds_per_step"],
            s["train_seconds"],
        ]
        for s in res["summary"]
    ]
    lines += [
        md_table(
            [
                "run",
                "batch",
                f"final {metric} (mean ± std)",
                "min – max",
                f"best {metric} (mean)",
                "train loss (last 10%)",
                "s/step",
                "train s",
            ],
            rows,
        ),
        "",
    ]
    return "\n".join(lines)


def _smooth(y, w):
    y = np.asarray(y, dtype=float)
    if w <= 1 or len(y) < w:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    head = c[1:w] / np.arange(1, w)
    return np.concatenate([head, (c[w:] - c[:-w]) / w])


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = _metric(res)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    window = max(1, res["plan"]["steps"] // 30)
    for i, c in enumerate(res["contenders"]):
        rs = [r for r in res["runs"] if r["contender"] == c["name"]]
        col = colors[i % len(colors)]
        loss = np.array([_smooth(r["loss"], window) for r in rs])
        secs = np.array([np.cumsum(r["seconds"]) for r in rs]).mean(0)
        steps = np.arange(1, loss.shape[1] + 1)
        for ax, x in ((axes[0, 0], steps), (axes[0, 1], secs)):
            ax.plot(x, loss.mean(0), color=col, label=c["name"])
            ax.fill_between(x, loss.min(0), loss.max(0), color=col, alpha=0.15)
        ev = np.array([[e[metric] for e in r["evals"]] for r in rs])
        ev_steps = [e["step"] for e in rs[0]["evals"]]
        ev_secs = np.array([[e["seconds"] for e in r["evals"]] for r in rs]).mean(0)
        for ax, x in ((axes[1, 0], ev_steps), (axes[1, 1], ev_secs)):
            ax.plot(x, ev.mean(0), marker="o", color=col, label=c["name"])
            ax.fill_between(x, ev.min(0), ev.max(0), color=col, alpha=0.15)
    axes[0, 0].set(xlabel="step", ylabel=f"train loss (moving avg {window})", title="train loss vs step")
    axes[0, 1].set(xlabel="training seconds (excl. eval)", ylabel="train loss", title="train loss vs wall-clock")
    axes[1, 0].set(xlabel="step", ylabel=f"validation {metric}", title=f"validation {metric} vs step")
    axes[1, 1].set(
        xlabel="training seconds (excl. eval)",
        ylabel=f"validation {metric}",
        title=f"validation {metric} vs wall-clock",
    )
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    p = res["plan"]
    fig.suptitle(
        f"{p['task']} on {p['model']}: {p['sequences_per_step']} sequences/step, mean and min–max over "
        f"{len(p['seeds'])} seeds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
