"""Peak RSS of every way mobizo trains one model, side by side in one run (README "Memory").

    python benchmarks/memory_table.py --model DIR [--model DIR2 ...] --work /tmp/memtable [--length 256]

Each row is one whole ``mobizo`` process (its peak RSS, ``ru_maxrss`` of that child alone: the
interpreter, libraries, model or program, and the work), run on the same data: a custom
classification task whose prompts all fill ``--length`` tokens (long texts cut from the left), so
the eager engine pads to the same length as the program. Settings: prge, batch 4, q 2, three steps,
eval on 8 examples at the end; every other setting mobizo's default (``--eval-batch-size`` 32: the
program's ``score`` takes one copy of the step's batch, 4 rows, and eval is chunked to it).

* export: ``mobizo export`` (the program alone), with its wall time;
* ET ZO (Python): ``mobizo train --engine executorch --program P``;
* ET ZO (native): ``mobizo-train`` (C++, no Python) on a bundle of the same program;
* eager ZO / eager FO: ``mobizo train`` / ``--estimator fo``;
* ET FO: the first-order baseline program (``engines/executorch/fo.py``: forward + backward of the
  same LoRA-FA adapter in the runtime), three steps on a batch of the same shape, run by the
  benchmarks' memory worker (the program only, no eval);
* weights: the base model's parameter bytes (fp32), the floor.

``--repeat N`` runs each training row N times, interleaved (ET Python, native, eager ZO, eager FO,
then again), and reports the median peak with every run's peak beside it: the same eager run's peak
moves by ~100 MiB from run to run on a shared machine (allocator and page-cache timing).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

WORDS = [
    "the",
    "movie",
    "was",
    "long",
    "and",
    "the",
    "acting",
    "felt",
    "quiet",
    "while",
    "the",
    "story",
    "moved",
    "through",
    "small",
    "rooms",
    "of",
    "memory",
    "and",
    "light",
    "with",
    "a",
    "score",
    "that",
    "rose",
    "and",
    "fell",
    "like",
    "weather",
    "over",
    "an",
    "old",
    "town",
    "where",
    "nothing",
    "much",
    "happened",
]


def make_data(d: Path, n: int = 64) -> Path:
    rng = random.Random(0)
    d.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n), ("validation", 16)):
        with open(d / f"{split}.jsonl", "w") as f:
            for i in range(count):
                text = " ".join(rng.choice(WORDS) for _ in range(600))
                f.write(json.dumps({"text": text, "label": i % 2}) + "\n")
    return d


def run(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, float]:
    """(peak RSS MiB of that child alone, wall seconds)."""
    # through /usr/bin/time, a fresh process: a child's ru_maxrss starts from its parent's high-water
    # mark at fork, and this script grows (it exports the FO program in-process)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "MOBIZO-MAXRSS-KB %M", *map(str, cmd)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**(env or os.environ), "PYTHONWARNINGS": "ignore"},
        )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed; see {log}")
    kb = [line.split()[1] for line in log.read_text().splitlines() if line.startswith("MOBIZO-MAXRSS-KB ")]
    return int(kb[-1]) / 1024, wall


def weights_mib(model: str) -> float:
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 - not iterable in safetensors 0.8
                sl = st.get_slice(k)
                n = 1
                for s in sl.get_shape():
                    n *= s
                total += n * 4  # fp32, as mobizo runs it
    return total / 2**20


def measure_et_fo(model: str, w: Path, length: int) -> tuple[float, None]:
    """Peak RSS of the ExecuTorch FO program's steps (batch 4, ``length`` tokens), in its own process."""
    import torch
    from mobizo_bench.common import child_env  # benchmarks/mobizo_bench, beside this script

    from mobizo.engines.executorch.fo import FOManifest, export_fo_program
    from mobizo.models import load_model
    from mobizo.mplora import inject

    fo_dir = w / "program-fo"
    if not fo_dir.is_dir():
        net, _ = load_model(model)
        inject(net, None, 8, 16.0, 0)
        export_fo_program(net, FOManifest(Path(model).name, 4, length, 1), fo_dir)
        del net
    batch = w / "batch.pt"
    ids = torch.randint(3, 500, (4, length))
    torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, -1:].clone()}, batch)
    spec = {"mode": "et-fo", "steps": 3, "threads": 2, "batch_file": str(batch), "program": str(fo_dir)}
    r = run([sys.executable, "-m", "mobizo_bench.memory_worker", json.dumps(spec)], w / "et-fo.log", child_env())
    return r[0], None


def median_run(runs: list[tuple[float, float]]) -> tuple[float, float, list[float]]:
    """(median peak, its run's wall seconds, every peak) of repeated runs."""
    ranked = sorted(runs)
    peak, wall = ranked[(len(ranked) - 1) // 2]
    return peak, wall, [round(r[0], 1) for r in runs]


def measure(model: str, work: Path, length: int, native: bool, et_fo: bool = True, repeat: int = 1) -> dict:
    name = Path(model).name
    w = work / name
    w.mkdir(parents=True, exist_ok=True)
    data = make_data(work / "data")
    flags = [
        "--model",
        model,
        "--task",
        "custom-cls",
        "--data",
        str(data),
        "--template",
        "Review: {text} Sentiment:",
        "--label-words",
        "bad,good",
        "--max-length",
        str(length),
        "--batch-size",
        "4",
        "--queries",
        "2",
        "--eval-examples",
        "8",
        "--seed",
        "0",
        "--no-progress",
    ]
    mobizo = [sys.executable, "-m", "mobizo"]
    rows = {"weights": (weights_mib(model), None)}
    program = w / "program"
    rows["export"] = run(mobizo + ["export", *flags, "--out", str(program), "--overwrite"], w / "export.log")
    train = ["train", *flags, "--steps", "3", "--eval-every", "0", "--save-every", "0", "--overwrite"]
    commands = {
        "ET ZO (Python)": (
            mobizo + train + ["--engine", "executorch", "--program", str(program), "--out", str(w / "et")],
            "et",
        )
    }
    if native:
        from mobizo.native import build

        exe = build()
        bundle = w / "bundle"
        subprocess.run(
            mobizo + ["bundle", *flags, "--steps", "3", "--program", str(program), "--out", str(bundle), "--overwrite"],
            check=True,
            capture_output=True,
        )
        commands["ET ZO (native)"] = ([str(exe), str(bundle), "--out", str(w / "native"), "--overwrite"], "native")
    commands["eager ZO"] = (mobizo + train + ["--out", str(w / "eager")], "eager")
    commands["eager FO"] = (mobizo + train + ["--estimator", "fo", "--out", str(w / "fo")], "fo")
    runs = {k: [] for k in commands}
    for _ in range(repeat):  # interleaved: a slow spell of the machine falls on every row alike
        for k, (cmd, d) in commands.items():
            runs[k].append(run(cmd, w / f"{d}.log"))
    peaks = {}
    for k, r in runs.items():
        rows[k] = median_run(r)[:2]
        peaks[k] = median_run(r)[2]
    if et_fo:
        rows["ET FO"] = measure_et_fo(model, w, length)
    out = {
        k: {"peak_mib": round(v[0], 1), "seconds": None if v[1] is None else round(v[1], 1)} for k, v in rows.items()
    }
    for k, p in peaks.items():
        out[k]["peaks_mib"] = p
    for k, d in (("ET ZO (Python)", "et"), ("ET ZO (native)", "native"), ("eager ZO", "eager"), ("eager FO", "fo")):
        summary = w / d / "summary.json"
        if k in out and summary.is_file():  # the training step's own time, same T for every engine
            out[k]["seconds_per_step"] = json.loads(summary.read_text()).get("seconds_per_step")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="model directory (repeatable)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--no-native", action="store_true")
    ap.add_argument("--no-et-fo", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each training row (median reported)")
    a = ap.parse_args()
    results = {}
    for m in a.model:
        results[Path(m).name] = measure(m, a.work, a.length, not a.no_native, not a.no_et_fo, a.repeat)
        print(json.dumps({Path(m).name: results[Path(m).name]}), flush=True)
    (a.work / "memory_table.json").write_text(json.dumps(results, indent=1))
    names = list(results)
    kinds = list(next(iter(results.values())))
    print(f"\n| peak RSS (MiB) | {' | '.join(names)} |\n|---|{'---|' * len(names)}")
    for k in kinds:
        cells = []
        for n in names:
            r = results[n].get(k)
            if r is None:
                cells.append("-")
            else:
                zo, fo = results[n]["eager ZO"]["peak_mib"], results[n]["eager FO"]["peak_mib"]
                ratio = f" ({r['peak_mib'] / zo:.2f}x eager ZO)" if k.startswith("ET") else ""
                if k.startswith("ET ZO"):
                    ratio = f" ({r['peak_mib'] / zo:.2f}x eager ZO, {r['peak_mib'] / fo:.2f}x eager FO)"
                secs = f", {r['seconds']:.0f} s" if k == "export" else ""
                if r.get("seconds_per_step"):
                    secs = f", {r['seconds_per_step']:.2f} s/step"
                spread = (
                    f" [{', '.join(f'{x:.0f}' for x in r['peaks_mib'])}]" if len(r.get("peaks_mib", [])) > 1 else ""
                )
                cells.append(f"{r['peak_mib']:.0f}{spread}{ratio}{secs}")
        print(f"| {k} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
