"""Quantized frozen base (issue 12): every scheme side by side, in one run.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/real/quantize_table.py /tmp/smol-hf /tmp/wordsent OUT \\
        --schemes none,8da8w,8da8w+emb,8da4w,8da4w+emb --large --steps 300

    PYTHONPATH=src python benchmarks/real/quantize_table.py tiny - OUT --quick    # a 2-minute smoke test

For each model (MODEL, and with ``--large`` a ~0.5B random-weight Llama with MODEL's tokenizer,
written once into OUT/large-hf) and each ``--quantize`` scheme, each measurement in its own process:

* ``mobizo export`` of the ZO step (prge q=4, batch 8, the word-sentiment task, shared prompt):
  export seconds and the ``.pte`` size;
* ExecuTorch ZO training (``--et-child``): a process that loads only ``train.pte`` (no PyTorch
  model) and runs ``train_step`` on real batches: peak RSS (VmHWM, reset after the imports and the
  batches are ready, so it is the program's footprint; the imports' RSS is reported beside it) and
  the median step time;
* accuracy: ``mobizo train --engine executorch`` with that program, ``--eval-at-start`` (zero-shot,
  scored by the quantized program) and after ``--steps`` steps (fine-tuned). Skipped for the random
  model (chance level either way) unless ``--large-accuracy``.

Writes OUT/quantize.json, OUT/quantize.md (the table, ratios to fp32) and OUT/quantize.png.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # one intra-op thread in every child (PyTorch and ExecuTorch)
HERE = Path(__file__).resolve()
TEMPLATE = "Word: {text}\nSentiment:"
# ~0.52B parameters with SmolLM2's 49152-token vocabulary (tied embeddings): 26 layers of width 1280
LARGE = dict(
    hidden_size=1280,
    intermediate_size=3584,
    num_hidden_layers=26,
    num_attention_heads=20,
    num_key_value_heads=4,
    tie_word_embeddings=True,
)


def task_flags(args) -> list[str]:
    """The flags that shape the program (export and train)."""
    if args.quick:
        return [
            "--task",
            "synthetic",
            "--queries",
            "2",
            "--batch-size",
            "4",
            "--max-length",
            "32",
            "--eval-examples",
            "16",
            "--eval-batch-size",
            "8",
        ]
    return [
        "--task",
        "custom",
        "--data",
        args.data,
        "--template",
        TEMPLATE,
        "--label-words",
        "negative,positive",
        "--queries",
        "4",
        "--batch-size",
        "8",
        "--max-length",
        str(args.max_length),
        "--eval-examples",
        str(args.eval_examples),
        "--eval-batch-size",
        "32",
    ]


def step_flags(args) -> list[str]:
    """The train-only flags (the step's lr and eps are inputs of the program)."""
    lr = ["--lr", "1.0", "--eps", "0.05"] if args.quick else ["--lr", str(args.lr), "--eps", str(args.eps)]
    return ["--optimizer", "sgd", *lr]  # ZO-SGD: the rule these tables were measured with


def quant_flags(scheme: str, args) -> list[str]:
    """``8da4w`` or ``8da4w+emb`` (with --quantize-embeddings; ``--embeddings`` adds it to every scheme)."""
    name, _, emb = scheme.partition("+")
    if name == "none":
        return []
    out = ["--quantize", name]
    if args.group_size is not None and name in ("8da4w", "4w"):
        out += ["--group-size", str(args.group_size)]
    return out + (["--quantize-embeddings"] if args.embeddings or emb == "emb" else [])


def mobizo(*argv, log: Path) -> float:
    """Run ``python -m mobizo argv`` (stderr into ``log``); seconds. A failure stops the benchmark."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "mobizo", *map(str, argv)], stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(
            f"mobizo {' '.join(map(str, argv[:3]))} failed (see {log}): {log.read_text().strip().splitlines()[-1:]}"
        )
    return time.perf_counter() - t0


def make_large(model: str, out: Path) -> Path:
    """A random-weight Llama of :data:`LARGE`'s shape with ``model``'s tokenizer (written once)."""
    d = out / "large-hf"
    if (d / "config.json").is_file():
        return d
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = AutoConfig.from_pretrained(model, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    cfg = LlamaConfig(
        vocab_size=src.vocab_size,
        max_position_embeddings=src.max_position_embeddings,
        bos_token_id=src.bos_token_id,
        eos_token_id=src.eos_token_id,
        pad_token_id=src.pad_token_id,
        rms_norm_eps=1e-5,
        **LARGE,
    )
    torch.manual_seed(0)
    net = LlamaForCausalLM(cfg).eval()
    net.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    print(f"wrote {d}: {sum(p.numel() for p in net.parameters()) / 1e9:.2f}B parameters", file=sys.stderr)
    return d


# ------------------------------------------------------------------ the ExecuTorch child


def _status() -> dict:
    d = dict(
        line.split(":", 1)
        for line in pathlib.Path("/proc/self/status").read_text().splitlines()
        if line.startswith(("VmRSS", "VmHWM"))
    )
    return {k: int(v.split()[0]) / 1024 for k, v in d.items()}


def et_child(program: str, model: str, flags: list[str], steps: int) -> None:
    """Load only ``program`` and run ``steps`` train steps on real batches; one JSON line on stdout."""
    import torch

    from mobizo.build import load_task
    from mobizo.cli import build_parser, config_from
    from mobizo.data import Encoder, collate_choices, step_indices
    from mobizo.engines.executorch import ExecuTorchEngine, read_manifest
    from mobizo.models import TINY, prepare_tokenizer, tiny_tokenizer
    from mobizo.threads import apply_threads
    from mobizo.util import quiet_third_party

    quiet_third_party()
    apply_threads(1)
    cfg, _ = config_from(build_parser().parse_args(["train", "--model", model, *flags]))
    if model == TINY:
        tok = tiny_tokenizer()
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    tok = prepare_tokenizer(tok)
    task = load_task(cfg)
    exs = task.finalize(task.load("train", None, cfg.seed), tok)
    enc, m = Encoder(tok), read_manifest(Path(program))
    batches = []
    for s in range(1, steps + 2):
        idx = step_indices(len(exs), m.batch_size, s, cfg.seed)
        groups = [[enc(exs[i].prompt, c) for c in exs[i].candidates] for i in idx]
        batches.append(
            collate_choices(
                groups,
                [exs[i].label for i in idx],
                m.choices,
                tok.pad_token_id,
                m.max_length,
                length=m.max_length,
                answer_len=m.answer_len,
                examples=m.batch_size,
            )
        )
    base = _status()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: the peak from here on is the program's
        f.write("5")
    t0 = time.perf_counter()
    eng = ExecuTorchEngine(Path(program))
    load_s = time.perf_counter() - t0
    times = []
    for s, b in enumerate(batches, 1):
        t0 = time.perf_counter()
        out = eng.train_step(b, s, cfg.optim.lr, cfg.optim.eps)
        times.append(time.perf_counter() - t0)
        assert torch.isfinite(torch.tensor(out.loss))
    st = _status()
    print(
        json.dumps(
            {
                "rss_imports_mib": base,
                "peak_rss_mib": st["VmHWM"],
                "et_rss_mib": st["VmHWM"] - base,
                "load_s": load_s,
                "step_s": statistics.median(times[1:]),
                "steps": steps,
            }
        )
    )


# ------------------------------------------------------------------ the table


def measure(model: str, label: str, scheme: str, args, out: Path, accuracy: bool) -> dict:
    d = out / label / scheme
    d.mkdir(parents=True, exist_ok=True)
    prog = d / "program"
    flags = task_flags(args) + quant_flags(scheme, args)
    row = {"model": label, "scheme": scheme}
    if not (prog / "train.pte").is_file():
        row["export_s"] = mobizo(
            "export", "--model", model, *flags, "--out", prog, "--overwrite", "--no-progress", log=d / "export.log"
        )
    man = json.loads((prog / "manifest.json").read_text())
    row.update(
        pte_mb=man["pte_bytes"] / 1e6,
        group_size=man.get("group_size"),
        quantize_embeddings=man.get("quantize_embeddings", False),
    )
    r = subprocess.run(
        [
            sys.executable,
            str(HERE),
            "--et-child",
            str(prog),
            model,
            str(args.time_steps),
            "--",
            *flags,
            *step_flags(args),
        ],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        sys.exit(f"ExecuTorch child failed for {label}/{scheme}: {r.stderr.strip().splitlines()[-1:]}")
    row.update(json.loads(r.stdout.strip().splitlines()[-1]))
    if accuracy:
        run = d / "run"
        row["train_wall_s"] = mobizo(
            "train",
            "--model",
            model,
            *flags,
            *step_flags(args),
            "--engine",
            "executorch",
            "--program",
            prog,
            "--steps",
            args.steps,
            "--eval-at-start",
            "--eval-every",
            0,
            "--save-every",
            0,
            "--out",
            run,
            "--overwrite",
            "--no-progress",
            log=d / "train.log",
        )
        # (one intra-op thread through OMP_NUM_THREADS, set above for every child)
        s = json.loads((run / "summary.json").read_text())
        metric = s["metric"]
        row.update(
            zero_shot=(s.get("eval_start") or {}).get(metric),
            finetuned=s.get(f"eval_{metric}"),
            train_s_per_step=s.get("seconds_per_step"),
        )
    print(json.dumps(row), file=sys.stderr)
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| model | scheme | .pte MB | ET RSS MiB (x fp32) | peak RSS MiB | step s (x fp32) | zero-shot | fine-tuned |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {r["model"]: r for r in rows if r["scheme"] == "none"}

    def ratio(r, k):
        b = base.get(r["model"])
        return f" ({r[k] / b[k]:.2f}x)" if b and b[k] else ""

    def acc(v):
        return "n/a" if v is None else f"{v:.3f}"

    for r in rows:
        name = (
            r["scheme"].partition("+")[0]
            + (f" g{r['group_size']}" if r.get("group_size") else "")
            + (" +emb" if r.get("quantize_embeddings") else "")
        )
        lines.append(
            f"| {r['model']} | {name} | {r['pte_mb']:.1f} | {r['et_rss_mib']:.0f}{ratio(r, 'et_rss_mib')} | "
            f"{r['peak_rss_mib']:.0f} | {r['step_s']:.3f}{ratio(r, 'step_s')} | {acc(r.get('zero_shot'))} | "
            f"{acc(r.get('finetuned'))} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    width = 0.8 / len(schemes)
    for ax, key, title in zip(
        axes,
        ("pte_mb", "et_rss_mib", "step_s", "finetuned"),
        (".pte size (MB)", "ExecuTorch training RSS (MiB)", "step time (s)", "accuracy"),
    ):
        for j, s in enumerate(schemes):
            vals = [next((r.get(key) or 0 for r in rows if r["model"] == m and r["scheme"] == s), 0) for m in models]
            ax.bar([i + j * width for i in range(len(models))], vals, width, label=s)
            if key == "finetuned":
                zs = [
                    next((r.get("zero_shot") or 0 for r in rows if r["model"] == m and r["scheme"] == s), 0)
                    for m in models
                ]
                ax.scatter([i + j * width for i in range(len(models))], zs, color="k", marker="_", s=200, zorder=3)
        ax.set_xticks([i + width * (len(schemes) - 1) / 2 for i in range(len(models))], models)
        ax.set_title(title + (" (bar: fine-tuned, dash: zero-shot)" if key == "finetuned" else ""), fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--et-child":
        program, model, steps = sys.argv[2], sys.argv[3], int(sys.argv[4])
        return et_child(program, model, sys.argv[6:], steps)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="Hugging Face model directory (or tiny with --quick)")
    ap.add_argument("data", help="word-sentiment data directory (make_word_sentiment.py); ignored with --quick")
    ap.add_argument("out")
    ap.add_argument(
        "--schemes",
        default="none,8da8w,8da8w+emb,8da4w,8da4w+emb",
        help="--quantize schemes; +emb: with --quantize-embeddings",
    )
    ap.add_argument("--group-size", type=int, default=None, help="4-bit schemes (default: mobizo's, 32)")
    ap.add_argument("--embeddings", action="store_true", help="--quantize-embeddings for every scheme but none")
    ap.add_argument("--large", action="store_true", help="also the ~0.5B random-weight model")
    ap.add_argument("--large-accuracy", action="store_true", help="also train/evaluate the random model")
    ap.add_argument("--no-accuracy", action="store_true", help="MODEL too: size, memory and step time only")
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning steps (accuracy)")
    ap.add_argument("--time-steps", type=int, default=5, help="timed train steps in the ExecuTorch child")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--eps", type=float, default=1e-2)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--eval-examples", type=int, default=600)
    ap.add_argument("--quick", action="store_true", help="tiny model, synthetic task, 3 steps: checks the pipeline")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.time_steps = min(args.steps, 3), min(args.time_steps, 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    schemes = args.schemes.split(",")
    models = [(args.model, "tiny" if args.model == "tiny" else Path(args.model).name, not args.no_accuracy)]
    if args.large:
        models.append((str(make_large(args.model, out)), "random-0.5B", args.large_accuracy))
    rows = [measure(m, label, s, args, out, acc) for m, label, acc in models for s in schemes]
    (out / "quantize.json").write_text(json.dumps(rows, indent=1))
    md = table(rows)
    (out / "quantize.md").write_text(md)
    plot(rows, out / "quantize.png")
    print(md)
    print(f"wrote {out}/quantize.json, quantize.md, quantize.png")


if __name__ == "__main__":
    main()
