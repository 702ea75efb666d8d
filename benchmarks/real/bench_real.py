"""Real-model step and eval timings for one mobizo source tree (run it with that tree on PYTHONPATH).

    PYTHONPATH=<tree>/src OMP_NUM_THREADS=1 python benchmarks/real/bench_real.py MODEL DATA OUT.json [--label L]

One intra-op thread, the word-sentiment task (make_word_sentiment.py), the choice objective, q=4,
batch 8: the zero-shot eval's speed, then per estimator the median step time (lr 0, so every step
does the same work), the step's matmul FLOPs and their share of a 2048^3 fp32 matmul's rate measured
in the same process. The 2026-11-23 before/after prompt-sharing results (results/2026-11-23-*) were
measured with this script as of commit 280c262, which ran on the trainer API both of those trees had;
this version runs on today's (mobizo.build / mobizo.trainer).
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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

    from mobizo.util import quiet_third_party

    quiet_third_party()
    import torch

    torch.set_num_threads(1)
    from torch.utils.flop_counter import FlopCounterMode

    import mobizo
    from mobizo.build import build_engine, build_run
    from mobizo.config import TrainConfig
    from mobizo.trainer import make_batch, run_eval

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
    cfg = TrainConfig.from_flat(
        model=args.model,
        **task,
        queries=args.queries,
        batch_size=args.batch_size,
        optimizer="sgd",
        lr=1e-3,
        eps=1e-3,
        max_length=args.max_length,
        eval_examples=args.eval_examples,
        eval_batch_size=32,
        progress=False,
    )
    t0 = time.perf_counter()
    run = build_run(cfg)
    res["prepare_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev = run_eval(run)
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
        r2 = dataclasses.replace(run, cfg=cfg.replace(estimator=est), engine=None)
        eng = build_engine(r2)  # the same model (and B) under this estimator's step
        times, flops, rows = [], None, None
        for s in range(1, args.steps + 2):
            batch = make_batch(r2, s)
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
