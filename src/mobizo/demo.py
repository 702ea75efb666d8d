"""``mobizo demo``: evaluate, fine-tune with P-RGE, evaluate again, on the built-in tiny model and task.

One leg per engine (eager PyTorch, then the stock ExecuTorch runtime), the same
seed, data and hyperparameters; a before/after table and ``demo.json``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .api import run_training
from .config import TrainConfig
from .util import dumps

# Tuned for the random-init tiny model on the synthetic task (see README "Demo").
DEMO = dict(
    model="tiny",
    task="synthetic",
    estimator="prge",
    optimizer="sgd",  # (its lr: the random-init model needs far larger steps than a pretrained one)
    queries=4,
    batch_size=8,
    lr=4.0,
    eps=0.02,
    rank=8,
    alpha=16.0,
    seed=0,
    max_length=48,
    eval_examples=500,
    eval_every=0,
    save_every=0,
)
DEMO_STEPS = 600
ENGINES = ("eager", "executorch")


def run_demo(out: str | None = None, steps: int | None = None, engines=None, progress: bool = True) -> dict:
    import torch

    # The tiny model gains nothing from intra-op threads, and on a busy 2-core machine OpenMP
    # threads waiting on each other make a 20 ms step take up to a second: run the eager leg on one.
    torch.set_num_threads(1)
    engines = list(engines or ENGINES)
    steps = steps or DEMO_STEPS
    with tempfile.TemporaryDirectory(prefix="mobizo-demo-") as tmp:
        root = Path(out) if out else Path(tmp)
        legs = []
        for engine in engines:
            cfg = TrainConfig.from_flat(
                **DEMO,
                steps=steps,
                engine=engine,
                eval_at_start=True,
                progress=progress,
                out=str(root / engine),
                overwrite=True,
            )
            s = run_training(cfg)
            legs.append(
                {
                    "engine": engine,
                    "estimator": cfg.optim.estimator,
                    "queries": cfg.optim.queries,
                    "steps": s["final_step"],
                    "accuracy_before": s["eval_start"]["accuracy"],
                    "accuracy_after": s["eval"]["accuracy"],
                    "loss_before": s["eval_start"]["loss"],
                    "loss_after": s["eval"]["loss"],
                    "seconds_per_step": s["seconds_per_step"],
                }
            )
        result = {"model": "tiny", "task": "synthetic", "legs": legs}
        print(format_table(legs))
        if out:
            root.mkdir(parents=True, exist_ok=True)
            (root / "demo.json").write_text(dumps(result, indent=1), encoding="utf-8")
    return result


def format_table(legs: list[dict]) -> str:
    head = "| engine | accuracy before | accuracy after | loss before | loss after | s/step |"
    rows = [head, "|---|---|---|---|---|---|"]
    for leg in legs:
        rows.append(
            f"| {leg['engine']} | {leg['accuracy_before']:.3f} | {leg['accuracy_after']:.3f} | "
            f"{leg['loss_before']:.3f} | {leg['loss_after']:.3f} | {leg['seconds_per_step']:.4f} |"
        )
    return "\n".join(rows)
