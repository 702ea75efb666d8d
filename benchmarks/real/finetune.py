"""Zero-shot vs fine-tuned on the word-sentiment task, through the ordinary trainer (GGUF model in).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/real/finetune.py MODEL.gguf DATA OUT --steps 300 --lr 1e-2 --eps 1e-2

prge q=4, batch 8, T <= 32, one intra-op thread, eval on 600 validation words at the start and every
--eval-every steps. Prints one JSON line: zero-shot and final accuracy, the eval curve, s/step, wall seconds.
"""

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--optimizer", default="sgd", help="the update rule (the results in results/ used sgd)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--eps", type=float, default=1e-2)
    ap.add_argument("--eval-every", type=int, default=100)
    args = ap.parse_args()

    from mobizo.util import quiet_third_party

    quiet_third_party()
    from mobizo.config import TrainConfig
    from mobizo.threads import apply_threads
    from mobizo.trainer import train

    apply_threads(1)
    t0 = time.perf_counter()
    summary = train(
        TrainConfig.from_flat(
            model=args.model,
            task="custom",
            data=args.data,
            template="Word: {text}\nSentiment:",
            label_words="negative,positive",
            estimator="prge",
            optimizer=args.optimizer,
            queries=4,
            batch_size=8,
            lr=args.lr,
            eps=args.eps,
            steps=args.steps,
            eval_every=args.eval_every,
            eval_at_start=True,
            eval_examples=600,
            max_length=32,
            save_every=args.eval_every,
            out=args.out,
            overwrite=True,
            progress=False,
        )
    )
    summary["wall_seconds"] = time.perf_counter() - t0
    with open(os.path.join(args.out, "metrics.jsonl")) as f:
        evals = [json.loads(line) for line in f][1:]
    print(
        json.dumps(
            {
                "zero_shot": summary["eval_start"]["accuracy"],
                "final": summary["eval_accuracy"],
                "curve": [(r["step"], r["eval_accuracy"]) for r in evals if "eval_accuracy" in r],
                "seconds_per_step": summary["seconds_per_step"],
                "wall_seconds": summary["wall_seconds"],
            }
        )
    )


if __name__ == "__main__":
    main()
