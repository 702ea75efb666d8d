"""lr / eps sweep for ZO fine-tuning of a real model (P-RGE, MP-LoRA q/v, choice objective).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/real/sweep.py MODEL DATA OUT_DIR \
        --template 'Word: {text}\nClass:' --label-words A,B --steps 80 --grid 1e-3:1e-3,1e-2:1e-2,...

The model is loaded once; every configuration starts from B = 0 with the same seed (same batches,
same noise directions) and is evaluated on the same validation examples before (zero-shot) and
after. Writes OUT_DIR/sweep.json, sweep.md (table) and sweep.png (training loss, eval loss).
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--template", default="Word: {text}\nSentiment:")
    ap.add_argument("--label-words", default="negative,positive")
    ap.add_argument(
        "--grid",
        default="1e-3:1e-3,1e-2:1e-3,1e-2:1e-2,3e-2:1e-2,1e-1:1e-2,3e-1:1e-2",
        help="comma-separated lr:eps pairs",
    )
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-examples", type=int, default=300)
    ap.add_argument("--estimator", default="prge")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from mobizo.util import quiet_third_party

    quiet_third_party()
    import torch

    torch.set_num_threads(1)
    from mobizo.build import build_run
    from mobizo.config import TrainConfig
    from mobizo.trainer import make_batch, run_eval

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig.from_flat(
        model=args.model,
        task="custom",
        data=args.data,
        template=args.template,
        label_words=args.label_words,
        estimator=args.estimator,
        queries=args.queries,
        batch_size=args.batch_size,
        max_length=32,
        eval_examples=args.eval_examples,
        eval_batch_size=32,
        seed=args.seed,
        progress=False,
    )
    run = build_run(cfg)
    zero = {k: v for k, v in run.engine.adapter_state().items()}
    t0 = time.perf_counter()
    base = run_eval(run)
    print("zero-shot", json.dumps(base), file=sys.stderr)
    res = {
        "model": args.model,
        "template": args.template,
        "label_words": args.label_words,
        "steps": args.steps,
        "queries": args.queries,
        "batch_size": args.batch_size,
        "estimator": args.estimator,
        "eval_examples": base["n"],
        "zero_shot": base,
        "runs": [],
    }
    for pair in args.grid.split(","):
        lr, eps = (float(x) for x in pair.split(":"))
        run.engine.load_adapter_state(zero)
        losses, t0 = [], time.perf_counter()
        for step in range(1, args.steps + 1):
            r = run.engine.train_step(make_batch(run, step), step, lr, eps)
            losses.append(r.loss)
        secs = (time.perf_counter() - t0) / args.steps
        ev = run_eval(run)
        rec = {
            "lr": lr,
            "eps": eps,
            "seconds_per_step": secs,
            "train_loss": losses,
            "train_loss_first10": statistics.mean(losses[:10]),
            "train_loss_last10": statistics.mean(losses[-10:]),
            "eval": ev,
        }
        res["runs"].append(rec)
        print(
            f"lr {lr:g} eps {eps:g}: acc {ev['accuracy']:.3f} loss {ev['loss']:.4f} "
            f"train {rec['train_loss_first10']:.4f} -> {rec['train_loss_last10']:.4f} ({secs:.2f} s/step)",
            file=sys.stderr,
        )
        (out / "sweep.json").write_text(json.dumps(res, indent=1))
    write_report(res, out)


def write_report(res: dict, out: Path) -> None:
    z = res["zero_shot"]
    lines = [
        (
            f"Model `{res['model']}`, template `{res['template']!r}`, label words `{res['label_words']}`; "
            f"{res['estimator']} q={res['queries']}, batch {res['batch_size']}, {res['steps']} steps, one thread; "
            f"eval on {res['eval_examples']} validation words."
        ),
        "",
        "| lr | eps | eval accuracy | eval loss | train loss (first 10 → last 10 steps) | s/step |",
        "|---|---|---|---|---|---|",
        f"| zero-shot | | {z['accuracy']:.3f} | {z['loss']:.4f} | | |",
    ]
    for r in res["runs"]:
        e = r["eval"]
        lines.append(
            f"| {r['lr']:g} | {r['eps']:g} | {e['accuracy']:.3f} | {e['loss']:.4f} | "
            f"{r['train_loss_first10']:.4f} → {r['train_loss_last10']:.4f} | {r['seconds_per_step']:.2f} |"
        )
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for r in res["runs"]:
        ls = r["train_loss"]
        k = 10
        smooth = [statistics.mean(ls[max(0, i - k + 1) : i + 1]) for i in range(len(ls))]
        ax[0].plot(range(1, len(ls) + 1), smooth, label=f"lr {r['lr']:g}, eps {r['eps']:g}")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("training loss (10-step mean)")
    ax[0].legend(fontsize=7)
    names = [f"{r['lr']:g}/{r['eps']:g}" for r in res["runs"]]
    ax[1].bar(["zero-shot"] + names, [res["zero_shot"]["accuracy"]] + [r["eval"]["accuracy"] for r in res["runs"]])
    ax[1].set_ylabel("eval accuracy")
    ax[1].tick_params(axis="x", rotation=45, labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)


if __name__ == "__main__":
    main()
