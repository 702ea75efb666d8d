"""Step time of distributed mobizo training at N = 1, 2, ... processes (1 intra-op thread each), and the bytes
each process puts on the wire per step. Prints a markdown table (docs/scaling-out.md has the measured one).

    PYTHONPATH=src python benchmarks/dist_scaling.py [--models tiny,100m] [--procs 1,2] [--modes queries,data,federated]
                                                     [--steps 30] [--queries 4] [--batch-size 8] [--max-length 64]

N = 1 is a plain ``python -m mobizo train``; N > 1 is ``python -m torch.distributed.run --nproc-per-node N -m mobizo
train`` (gloo, loopback). s/step is the median of the logged per-step ``seconds`` on rank 0 (forward passes,
collective, update) after 3 warm-up steps, "in the collective" the median of ``dist_seconds`` (the transfer
plus the wait for the slower rank); ``100m`` is the random-weight ~100M-parameter Llama of
``mobizo_bench.common.build_model`` saved as a local model directory.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_path(name: str, root: Path) -> str:
    if name == "tiny" or Path(name).is_dir():  # built-in, or a local Hugging Face model directory
        return name
    sys.path.insert(0, str(SRC))  # the mobizo the children run
    from mobizo_bench.common import build_model  # benchmarks/mobizo_bench, beside this script

    model, tok = build_model(name)
    d = root / f"model-{name}"
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return str(d)


def run(model: str, n: int, mode: str, args, root: Path) -> dict:
    out = root / f"run-{Path(model).name}-{mode}-{n}"
    flags = [
        "--model",
        model,
        "--queries",
        args.queries,
        "--batch-size",
        args.batch_size,
        "--max-length",
        args.max_length,
        "--steps",
        args.steps,
        "--eval-every",
        0,
        "--eval-examples",
        4,
        "--save-every",
        0,
        "--optimizer",
        "sgd",
        "--lr",
        1.0,
        "--eps",
        0.02,
        "--out",
        out,
        "--no-progress",
        "--dist-mode",
        mode,
    ]
    if n == 1:
        cmd = [sys.executable, "-m", "mobizo", "train"]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(n),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            "-m",
            "mobizo",
            "train",
        ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    res = subprocess.run(cmd + [str(f) for f in flags], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()[1:]]
    recs = recs[3:] or recs
    return {
        "s_step": statistics.median(r["seconds"] for r in recs),
        "bytes": recs[-1].get("dist_bytes", 0),
        "coll": statistics.median(r.get("dist_seconds", 0.0) for r in recs),
        "wall": wall,
    }


def latency_worker(n_values: int, rounds: int = 300) -> None:
    """(run under torchrun) median time of one all-gather of ``n_values`` float64 per rank, after a warm-up."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    payload = torch.zeros(n_values, dtype=torch.float64)
    out = [torch.empty_like(payload) for _ in range(dist.get_world_size())]
    times = []
    for i in range(rounds + 20):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_gather(out, payload)
        if i >= 20:
            times.append(time.perf_counter() - t0)
    if dist.get_rank() == 0:
        print(statistics.median(times))
    dist.destroy_process_group()


def collective_latency(n: int, n_values: int) -> float:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(n),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        __file__,
        "--latency-worker",
        str(n_values),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny", help="tiny, 100m (random Llama) or local model directories")
    p.add_argument("--procs", default="1,2")
    p.add_argument("--modes", default="queries,data,federated")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--queries", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--latency-worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.latency_worker:
        return latency_worker(args.latency_worker)
    procs = [int(x) for x in args.procs.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mobizo-dist-bench-") as tmp:
        root = Path(tmp)
        for name in args.models.split(","):
            model = model_path(name, root)
            one = run(model, 1, "queries", args, root)  # one process: the mode does not apply
            name = Path(name).name
            rows.append([name, 1, "-", f"{one['s_step']:.4f}", "1.00x", "-", 0])
            print(f"{name} N=1: {one['s_step']:.4f} s/step ({one['wall']:.0f} s wall)", file=sys.stderr)
            for mode in args.modes.split(","):
                for n in (n for n in procs if n > 1):
                    r = run(model, n, mode, args, root)
                    rows.append(
                        [
                            name,
                            n,
                            mode,
                            f"{r['s_step']:.4f}",
                            f"{one['s_step'] / r['s_step']:.2f}x",
                            f"{r['coll']:.4f}",
                            r["bytes"],
                        ]
                    )
                    print(f"{name} {mode} N={n}: {r['s_step']:.4f} s/step ({r['wall']:.0f} s wall)", file=sys.stderr)
    print(
        f"q={args.queries}, batch {args.batch_size}, max length {args.max_length}, {args.steps} steps, "
        "1 thread per process, gloo over loopback\n"
    )
    for n in (n for n in procs if n > 1):
        k = args.queries // n
        print(
            f"all-gather of one step's payload (1 + 2q/N = {1 + 2 * k} float64 per process, --dist-mode queries) "
            f"among {n} processes over loopback: {collective_latency(n, 1 + 2 * k) * 1e6:.0f} us (median of 300)\n"
        )
    print(
        "| model | processes | --dist-mode | s/step | speed-up | of which in the collective (s) | bytes/step/process |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


if __name__ == "__main__":
    main()
