"""Peak RSS and seconds per step: native mobizo-train vs the Python ExecuTorch engine vs eager, on `tiny`.

    PYTHONPATH=src python benchmarks/native_rss.py --out /tmp/bench [--steps 200] [--bundle DIR]

Writes a bundle (demo settings: prge q=4, batch 8, T=48, lr 4, eps 0.02) unless --bundle is
given, then runs each engine for --steps steps in its own process and reads that process's peak
RSS (VmHWM, the whole process: interpreter, libraries, program):

* native:  mobizo-train BUNDLE (no Python in the process);
* python-executorch: mobizo.bundle.train_python(BUNDLE) in a fresh interpreter (ExecuTorchEngine,
  no PyTorch model);
* eager:  `mobizo train --engine eager` with the same settings (OMP_NUM_THREADS=1, no periodic eval).

s/step is the mean time of the training step itself (what summary.json records), plus wall time.
Also checks that the native and Python ExecuTorch trajectories are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(
    model="tiny",
    task="synthetic",
    estimator="prge",
    optimizer="sgd",
    queries=4,
    batch_size=8,
    max_length=48,
    lr=4.0,
    eps=0.02,
    seed=0,
    eval_examples=8,
    eval_batch_size=8,
    eval_every=0,
    progress=False,
)


def _hwm_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def measure(cmd: list[str], stdout=subprocess.DEVNULL) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of one child process.

    The peak is the child's VmHWM, polled every 2 ms until it exits (ru_maxrss from wait4 would
    include the RSS of this big Python parent, which the child inherits at fork until it execs).
    """
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=stdout, stderr=err)
        peak = 0.0
        while p.poll() is None:
            v = _hwm_mb(p.pid)  # a zombie has no VmHWM line any more: keep the last reading
            if v is not None:
                peak = max(peak, v)
            time.sleep(0.002)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{cmd[0]} failed: {err.read().decode()[-2000:]}")
    return peak, wall


PY_ET = """
import json, sys, time
from mobizo.bundle import read_bundle, gather
from mobizo.engines.executorch import ExecuTorchEngine
b = read_bundle(sys.argv[1]); eng = ExecuTorchEngine(b.dir); total = 0.0
for step in range(1, int(sys.argv[2]) + 1):
    batch = gather(b, step); lr, eps = b.lr_eps(step)
    t0 = time.perf_counter(); res = eng.train_step(batch, step, lr, eps); total += time.perf_counter() - t0
    print(json.dumps({"step": step, "loss": res.loss, "projected_grads": res.projected_grads}))
print(json.dumps({"seconds_per_step": total / int(sys.argv[2])}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for the bundle, the runs, bench.md and bench.json")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--bundle", help="an existing bundle to run (default: write one into OUT/bundle)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    os.environ.update(env)
    sys.path.insert(0, str(ROOT / "src"))
    from mobizo.bundle import make_bundle
    from mobizo.config import TrainConfig
    from mobizo.native import build

    bundle = Path(args.bundle) if args.bundle else out / "bundle"
    if not args.bundle:
        t0 = time.perf_counter()
        make_bundle(TrainConfig.from_flat(**CONFIG, steps=args.steps, save_every=args.steps), bundle, overwrite=True)
        print(f"bundle written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    binary = build()
    pte_mb = (bundle / "train.pte").stat().st_size / 2**20
    rows = []

    run = out / "native-run"
    cmd = [str(binary), str(bundle), "--out", str(run), "--overwrite", "--quiet", "--steps", str(args.steps)]
    rss, wall = measure(cmd)
    sps = json.loads((run / "summary.json").read_text())["seconds_per_step"]
    rows.append(("native mobizo-train", rss, sps, wall))
    native_recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()[1:]]

    log = out / "python-et.jsonl"
    with open(log, "w") as f:
        rss, wall = measure([sys.executable, "-c", PY_ET, str(bundle), str(args.steps)], stdout=f)
    py = [json.loads(x) for x in log.read_text().splitlines()]
    rows.append(("Python ExecuTorchEngine", rss, py[-1]["seconds_per_step"], wall))
    diff = 0.0
    for a, b in zip(py[:-1], native_recs, strict=True):
        diff = max(
            diff, abs(a["loss"] - b["loss"]), *(abs(x - y) for x, y in zip(a["projected_grads"], b["projected_grads"]))
        )

    eager = out / "eager-run"
    flags = [
        "--model",
        "tiny",
        "--task",
        "synthetic",
        "--estimator",
        "prge",
        "--queries",
        "4",
        "--batch-size",
        "8",
        "--max-length",
        "48",
        "--lr",
        "4",
        "--eps",
        "0.02",
        "--seed",
        "0",
        "--eval-examples",
        "8",
        "--eval-every",
        "0",
        "--save-every",
        str(args.steps),
        "--steps",
        str(args.steps),
        "--no-progress",
    ]
    rss, wall = measure([sys.executable, "-m", "mobizo", "train", *flags, "--out", str(eager), "--overwrite"])
    sps = json.loads((eager / "summary.json").read_text())["seconds_per_step"]
    rows.append(("eager (mobizo train)", rss, sps, wall))

    lines = [
        (
            f"tiny, prge q=4, batch 8, T=48, {args.steps} steps; train.pte {pte_mb:.2f} MB; "
            f"native vs Python ExecuTorch max |diff| of loss/g: {diff}"
        ),
        "",
        "| engine | peak RSS MB | s/step | wall s (incl. start) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {rss:.1f} | {sps:.5f} | {wall:.2f} |" for name, rss, sps, wall in rows]
    lines.append(f"\nnative peak RSS - .pte size = {rows[0][1] - pte_mb:.1f} MB (target <= 64 MB)")
    text = "\n".join(lines)
    print(text)
    (out / "bench.md").write_text(text + "\n")
    (out / "bench.json").write_text(json.dumps({"pte_mb": pte_mb, "max_diff": diff, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
