"""Real-model step and eval timings for one mobizo source tree (run it with that tree on PYTHONPATH).

    PYTHONPATH=<tree>/src OMP_NUM_THREADS=1 python benchmarks/real/bench_real.py MODEL DATA OUT.json [--label L]

Uses only what both the issue-9 tree and the tree before it have (trainer.prepare / make_batch /
build_engine / run_eval), so the same script measures "before" and "after": one intra-op thread,
the word-sentiment task (make_word_sentiment.py), the choice objective, q=4, batch 8.
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--label", default="")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per estimator (after one warm-up step)")
    ap.add_argument("--estimators", default="prge,mezo")
    ap.add_argument("--eval-examples", type=int, default=600)
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--task", default="custom", help="custom (DATA: word-sentiment) or a built-in task, e.g. synthetic")
    ap.add_argument("--max-length", type=int, default=32)
    args = ap.parse_args()

    from mobizo.cli import _quiet_imports

    _quiet_imports()
    import torch

    torch.set_num_threads(1)
    from torch.utils.flop_counter import FlopCounterMode

    import mobizo
    from mobizo import trainer

    res = {
        "label": args.label,
        "mobizo": os.path.dirname(mobizo.__file__),
        "model": args.model,
        "threads": 1,
        "queries": args.queries,
        "batch_size": args.batch_size,
        "loadavg": os.getloadavg(),
    }
    # machine peak: best of 5 fp32 2048^3 matmuls
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = min(_timed(lambda: torch.matmul(a, b)) for _ in range(5))
    res["matmul_gflops"] = 2 * 2048**3 / best / 1e9

    task = dict(task="custom", data=args.data, template="Word: {text}\nSentiment:", label_words="negative,positive")
    if args.task != "custom":
        task = dict(task=args.task)
    cfg = trainer.TrainConfig(
        model=args.model,
        **task,
        queries=args.queries,
        batch_size=args.batch_size,
        lr=1e-3,
        eps=1e-3,
        max_length=args.max_length,
        eval_examples=args.eval_examples,
        eval_batch_size=32,
        progress=False,
    )
    t0 = time.perf_counter()
    run = trainer.prepare(cfg)
    res["prepare_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev = trainer.run_eval(run)
    secs = time.perf_counter() - t0
    res["eval"] = {
        "accuracy": ev["accuracy"],
        "loss": ev["loss"],
        "n": ev["n"],
        "seconds": secs,
        "examples_per_second": ev["n"] / secs,
    }
    print(json.dumps(res["eval"]), file=sys.stderr)
    res["steps"] = {}
    for est in args.estimators.split(","):
        c2 = dataclasses.replace(cfg, estimator=est)
        eng = trainer.build_engine(c2, run.model, None, run.objective, run.choices, run.answer_len)
        r2 = dataclasses.replace(run, cfg=c2, engine=eng)
        times, flops, rows = [], None, None
        for s in range(1, args.steps + 2):
            batch = trainer.make_batch(r2, s)
            rows = tuple(batch.input_ids.shape)
            if s == 1:
                with FlopCounterMode(display=False) as fc:
                    eng.train_step(batch, s, 0.0, 1e-3)
                flops = fc.get_total_flops()
                continue
            times.append(_timed(lambda eng=eng, batch=batch, s=s: eng.train_step(batch, s, 0.0, 1e-3)))
        med = statistics.median(times)
        res["steps"][est] = {
            "seconds_per_step": med,
            "all": times,
            "batch_shape": rows,
            "gflop_per_step": flops / 1e9,
            "fraction_of_matmul_peak": flops / med / 1e9 / res["matmul_gflops"],
        }
        print(est, json.dumps(res["steps"][est]), file=sys.stderr)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
