"""A 1.1B model in a phone's memory budget: ZO training of a TinyLlama-shaped model by the native trainer.

    python benchmarks/phone_1b.py --work /tmp/phone1b [--steps 4] [--skip-python]

Builds a random TinyLlama-shaped Llama (hidden 2048, 22 layers, 32 heads, 4 KV heads, intermediate 5632,
vocabulary 32000: 1.1B parameters; random weights are enough for memory and time) as a local Hugging Face
checkpoint with the built-in tiny tokenizer, then measures, one process per row (peak RSS = ``ru_maxrss`` of
that process; the export also as PSS over its forked workers, via peak_tree.py):

* ``mobizo bundle`` with ``--quantize 8da4w --quantize-embeddings`` (the export of the program and the
  tokenized data): wall time and peak;
* the native trainer ``mobizo-train`` on that bundle: peak RSS and s/step;
* the same program through the Python ExecuTorch engine (``mobizo train --engine executorch --program``),
  and the eager engine with the same quantized base (``mobizo train --quantize 8da4w --quantize-embeddings``);

at ``--max-length 64``, batch 4, q 2 (prge), on the built-in synthetic task (its prompts are short: every
batch is padded to 64 tokens by the bundle). Prints a markdown table and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mobizo_bench.common import TINYLLAMA

ROOT = Path(__file__).resolve().parents[1]
STEP = ["--max-length", "64", "--batch-size", "4", "--queries", "2", "--seed", "0", "--eval-examples", "8"]
QUANT = ["--quantize", "8da4w", "--quantize-embeddings"]


def build_model(out: Path) -> None:
    """The random 1.1B Llama as safetensors + config + the built-in tiny tokenizer (ids < 1024 < 32000)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mobizo.models import tiny_tokenizer

    if (out / "config.json").is_file():
        return
    tok = tiny_tokenizer()
    config = LlamaConfig(pad_token_id=tok.pad_token_id, bos_token_id=1, eos_token_id=2, **TINYLLAMA)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def timed(cmd: list[str], log: Path, env=None) -> dict:
    """Run ``cmd`` under /usr/bin/time: wall seconds, peak RSS (MiB) of that process, exit code."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "MAXRSS-KB %M", *cmd], stdout=f, stderr=subprocess.STDOUT, env=env
        )
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    kb = [int(line.split()[1]) for line in text.splitlines() if line.startswith("MAXRSS-KB")]
    return {"seconds": round(wall, 1), "peak_rss_mib": round(kb[-1] / 1024, 1) if kb else None, "rc": proc.returncode}


def seconds_per_step(run: Path) -> float | None:
    summary = run / "summary.json"
    if not summary.is_file():
        return None
    return json.loads(summary.read_text()).get("seconds_per_step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="folder for the model, the bundle, the runs and the logs")
    ap.add_argument("--steps", type=int, default=4, help="training steps per row (default 4)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of every process (default 1)")
    ap.add_argument("--skip-python", action="store_true", help="only the export and the native trainer")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    model = work / "tinyllama-1.1b-random"
    build_model(model)
    weights_mib = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
    mobizo = [sys.executable, "-m", "mobizo"]
    common = ["--model", str(model), *STEP, *QUANT, "--steps", str(args.steps), "--threads", str(args.threads)]
    rows = {}
    bundle = work / "bundle"
    rows["bundle (export + data)"] = timed(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "peak_tree.py"),
            "--",
            *mobizo,
            "bundle",
            *common,
            "--out",
            str(bundle),
            "--overwrite",
            "--no-progress",
        ],
        work / "bundle.log",
        env,
    )
    tree = [json.loads(line) for line in (work / "bundle.log").read_text().splitlines() if line.startswith("{")]
    if tree:
        rows["bundle (export + data)"].update(tree[-1])
    rows["bundle (export + data)"]["pte_mb"] = round((bundle / "train.pte").stat().st_size / 1e6, 1)
    exe = subprocess.run([*mobizo, "native", "build"], capture_output=True, text=True, env=env, check=True)
    binary = exe.stdout.strip().splitlines()[-1]
    native = timed(
        [binary, str(bundle), "--out", str(work / "native"), "--overwrite", "--quiet"], work / "native.log", env
    )
    native["seconds_per_step"] = seconds_per_step(work / "native")
    rows["ET ZO, native mobizo-train"] = native
    if not args.skip_python:
        for name, extra in (
            ("ET ZO, Python engine", ["--engine", "executorch", "--program", str(bundle)]),
            ("eager ZO (same quantized base)", []),
        ):
            out = work / name.split(",")[0].split(" ")[0].lower()
            r = timed(
                [
                    *mobizo,
                    "train",
                    *common,
                    *extra,
                    "--eval-every",
                    "0",
                    "--no-eval-at-start",
                    "--out",
                    str(out),
                    "--overwrite",
                    "--no-progress",
                ],
                work / f"{out.name}.log",
                env,
            )
            r["seconds_per_step"] = seconds_per_step(out)
            rows[name] = r
    result = {
        "model": TINYLLAMA,
        "weights_fp32_mib": round(weights_mib, 1),
        "settings": " ".join(STEP + QUANT),
        "steps": args.steps,
        "threads": args.threads,
        "rows": rows,
    }
    (work / "results.json").write_text(json.dumps(result, indent=1))
    print(
        f"TinyLlama-shaped 1.1B (random), fp32 weights {weights_mib:.0f} MiB; {result['settings']}; "
        f"{args.steps} steps, {args.threads} thread(s)\n"
    )
    print("| row | peak RSS MiB | wall s | s/step | note |\n|---|---|---|---|---|")
    for name, r in rows.items():
        note = ""
        if "peak_tree_pss_mib" in r:
            note = f"tree PSS {r['peak_tree_pss_mib']:.0f} MiB; .pte {r['pte_mb']} MB"
        if r.get("rc"):
            note += f" (exit {r['rc']})"
        sps = r.get("seconds_per_step")
        print(f"| {name} | {r['peak_rss_mib']} | {r['seconds']} | {'' if sps is None else f'{sps:.2f}'} | {note} |")


if __name__ == "__main__":
    main()
