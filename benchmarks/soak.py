#!/usr/bin/env python
"""Soak test (not part of the test suite): train N steps on the built-in tiny model and watch for leaks.

Prints a table of steps/s and resident memory (RSS) per window of steps, then RSS growth from the
first window to the end (must stay under 5%) and the steps/s drift (last window vs first).
The run is a real ``mobizo train`` run (metrics.jsonl, a checkpoint every --save-every steps).
"wall" steps/s includes checkpoints and logging (and the final eval in the last window);
"step" steps/s times the training step alone; "CPU ms/step" is the process's CPU time per step
(includes checkpoints and logging), which other jobs on a shared machine do not inflate.

    PYTHONPATH=src python benchmarks/soak.py                 # 5000 steps (default)
    PYTHONPATH=src python benchmarks/soak.py --steps 1000    # shorter
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--windows", type=int, default=10, help="rows of the table")
    ap.add_argument("--engine", default="eager")
    ap.add_argument("--estimator", default="prge")
    ap.add_argument("--queries", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", help="run directory (default: a temporary one, removed afterwards)")
    ap.add_argument("--max-growth", type=float, default=5.0, help="fail (exit 1) above this RSS growth in %%")
    args = ap.parse_args(argv)

    import psutil
    import torch

    from mobizo.config import TrainConfig
    from mobizo.trainer import train

    torch.set_num_threads(args.threads)
    proc = psutil.Process()
    mib = 1 / (1 << 20)
    window = max(1, args.steps // args.windows)
    rows: list[tuple[int, float, float, float, float]] = []
    marks = {"t": None, "step": 0, "busy": 0.0, "cpu": 0.0}
    rss_setup = [None]

    def on_step(step: int, rec: dict) -> None:
        now = time.perf_counter()
        marks["busy"] += rec["seconds"]
        if marks["t"] is None:  # after step 1: model, data and every lazy allocation are in place
            rss_setup[0] = proc.memory_info().rss * mib
            marks["t"], marks["step"], marks["busy"], marks["cpu"] = now, step, 0.0, time.process_time()
            return
        if step % window == 0 or step == args.steps:
            gc.collect()
            n = step - marks["step"]
            cpu = 1000 * (time.process_time() - marks["cpu"]) / n
            rows.append((step, n / (now - marks["t"]), n / marks["busy"], cpu, proc.memory_info().rss * mib))
            marks["t"], marks["step"], marks["busy"], marks["cpu"] = time.perf_counter(), step, 0.0, time.process_time()

    with tempfile.TemporaryDirectory(prefix="mobizo-soak-") as tmp:
        out = args.out or os.path.join(tmp, "run")
        cfg = TrainConfig.from_flat(
            model="tiny",
            estimator=args.estimator,
            engine=args.engine,
            steps=args.steps,
            queries=args.queries,
            batch_size=args.batch_size,
            max_length=args.max_length,
            optimizer="sgd",
            lr=0.1,
            eps=0.05,
            eval_every=0,
            eval_examples=64,
            save_every=args.save_every,
            out=out,
            overwrite=True,
            progress=False,
        )
        t0 = time.perf_counter()
        summary = train(cfg, on_step=on_step)
        total = time.perf_counter() - t0

    print(
        f"soak: {args.steps} steps, engine {args.engine}, {args.estimator} q={args.queries}, batch {args.batch_size}, "
        f"max-length {args.max_length}, checkpoint every {args.save_every}, {args.threads} thread(s)"
    )
    print(f"RSS after step 1: {rss_setup[0]:.1f} MiB")
    print("| step | steps/s (wall) | steps/s (step) | CPU ms/step | RSS MiB |")
    print("|---:|---:|---:|---:|---:|")
    for step, wall, rate, cpu, rss in rows:
        print(f"| {step} | {wall:.1f} | {rate:.1f} | {cpu:.1f} | {rss:.1f} |")
    start, end = rows[0][4], rows[-1][4]
    growth = 100 * (end - start) / start
    rates = [r[2] for r in rows]
    drift = 100 * (rates[-1] - rates[0]) / rates[0]
    print(
        f"RSS start (step {rows[0][0]}) {start:.1f} MiB -> end {end:.1f} MiB: {growth:+.2f}% "
        f"(from step 1: {100 * (end - rss_setup[0]) / rss_setup[0]:+.2f}%)"
    )
    print(
        f"steps/s (step) first window {rates[0]:.1f} -> last {rates[-1]:.1f}: {drift:+.1f}% "
        f"(min {min(rates):.1f}, max {max(rates):.1f}); CPU ms/step {rows[0][3]:.1f} -> {rows[-1][3]:.1f} "
        f"(min {min(r[3] for r in rows):.1f}, max {max(r[3] for r in rows):.1f}); wall {total:.0f} s; "
        f"final loss {summary['final_loss']:.4f}, eval accuracy {summary['eval_accuracy']}"
    )
    if growth > args.max_growth:
        print(f"FAIL: RSS grew {growth:.2f}% > {args.max_growth}%", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
