"""Where 4-bit accuracy goes (issue 12): eager zero-shot and fine-tuned accuracy per variant, one run.

    PYTHONPATH=src python benchmarks/real/quant_accuracy.py /tmp/smol-hf /tmp/wordsent OUT [--steps 100]

The ExecuTorch table (``quantize_table.py``) exports a program per scheme (15-26 min each here); this
asks a narrower question eagerly, where a variant costs a few minutes: with the base's linears in 4
bits, how much accuracy is lost with the embeddings and LM head kept float, and does choosing the
scales by HQQ (torchao's ``hqq_scale_only``, what ExecuTorch's own LLM export uses for 8da4w) instead
of round-to-nearest win it back? Eager runs the same quantized weights as the program (the parity
test in ``tests/test_quantize.py``), so the accuracies carry over.

Each variant: ``mobizo eval`` (zero-shot) and ``mobizo train`` (``--steps`` steps at the defaults of
``quantize_table.py``: q 4, batch 8, lr 1e-2, eps 1e-2, T <= 32), one intra-op thread, two variants
at a time. HQQ is selected by wrapping ``mobizo.quantize.torchao_config`` in the child process
(mobizo has no flag for it: it did not help here). Writes OUT/accuracy.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

VARIANTS = {  # name -> (flags, hqq)
    "none": ([], False),
    "8da4w g32": (["--quantize", "8da4w"], False),
    "8da4w g32 hqq": (["--quantize", "8da4w"], True),
    "8da4w g32 + emb": (["--quantize", "8da4w", "--quantize-embeddings"], False),
    "8da4w g32 hqq + emb": (["--quantize", "8da4w", "--quantize-embeddings"], True),
    "8da8w + emb": (["--quantize", "8da8w", "--quantize-embeddings"], False),
}
CHILD = """
import sys
import mobizo.quantize as Q
if {hqq}:
    plain = Q.torchao_config
    def hqq(scheme, group_size):
        c = plain(scheme, group_size)
        c.intx_choose_qparams_algorithm = "hqq_scale_only"
        return c
    Q.torchao_config = hqq
from mobizo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def task(args) -> list[str]:
    return [
        "--model",
        args.model,
        "--task",
        "custom",
        "--data",
        args.data,
        "--template",
        "Word: {text}\nSentiment:",
        "--label-words",
        "negative,positive",
        "--max-length",
        "32",
        "--eval-examples",
        "600",
        "--eval-batch-size",
        "32",
        "--threads",
        "1",
        "--no-progress",
    ]


def run_variant(name: str, args) -> dict:
    flags, hqq = VARIANTS[name]
    d = Path(args.out) / name.replace(" ", "_").replace("+", "plus")
    d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    child = [sys.executable, "-c", CHILD.format(hqq=hqq)]
    with open(d / "eval.log", "w") as log:
        subprocess.run(
            [*child, "eval", *task(args), *flags, "--json", str(d / "zero_shot.json")],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    train_log = open(d / "train.log", "w")  # noqa: SIM115 - closed below, after the run
    subprocess.run(
        [
            *child,
            "train",
            *task(args),
            *flags,
            "--queries",
            "4",
            "--batch-size",
            "8",
            "--optimizer",
            "sgd",
            "--lr",
            "1e-2",
            "--eps",
            "1e-2",
            "--steps",
            str(args.steps),
            "--eval-every",
            "0",
            "--save-every",
            "0",
            "--out",
            str(d / "run"),
            "--overwrite",
        ],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=train_log,
    )
    train_log.close()
    zero = json.loads((d / "zero_shot.json").read_text())["accuracy"]
    lines = (d / "run" / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(line) for line in lines if '"eval_accuracy"' in line]
    tuned = evals[-1]["eval_accuracy"]
    return {"variant": name, "zero_shot": zero, "finetuned": tuned, "steps": args.steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    names = args.variants.split(",")
    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(lambda n: run_variant(n, args), names))
    Path(args.out, "accuracy.json").write_text(json.dumps(rows, indent=1))
    print("| variant (eager) | zero-shot | fine-tuned |\n|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['zero_shot']:.3f} | {r['finetuned']:.3f} |")


if __name__ == "__main__":
    main()
