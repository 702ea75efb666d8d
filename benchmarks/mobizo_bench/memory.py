"""``mobizo bench memory``: peak RSS of inference, ZO and FO training, eager and ExecuTorch.

Every measurement is its own subprocess (:mod:`mobizo_bench.memory_worker`), so peaks never
mix. ExecuTorch processes load only the program and a saved batch (no PyTorch model). Each
row reports the peak RSS and the peak above the process's RSS right after its imports
("above imports"): the Python + torch + runtime footprint is ~200-400 MB on its own and
would hide the model's share on ``tiny``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from .common import LENGTH, adapted_model, md_table, progress, speed_batch, thread_env
from .programs import ensure_fo, ensure_zo

MODES = ("eager-infer", "et-infer", "eager-zo", "et-zo", "eager-fo", "eager-fo-lora", "et-fo")
LABELS = {
    "eager-infer": "eager inference",
    "et-infer": "ExecuTorch inference",
    "eager-zo": "eager ZO (prge)",
    "et-zo": "ExecuTorch ZO (prge)",
    "eager-fo": "eager FO (LoRA-FA)",
    "eager-fo-lora": "eager FO (full LoRA)",
    "et-fo": "ExecuTorch FO (LoRA-FA)",
}


def plan(quick: bool, models=None) -> dict:
    if quick:
        return {"models": ["tiny"], "q": 4, "batch": 1, "length": LENGTH, "steps": 2}
    return {
        "models": [m for m in (models or ["tiny", "100m"]) if m in ("tiny", "100m")],
        "q": 4,
        "batch": 1,
        "length": LENGTH,
        "steps": 3,
    }


def run_worker(spec: dict, threads: int) -> dict:
    cmd = [sys.executable, "-m", "mobizo_bench.memory_worker", json.dumps(spec)]
    proc = subprocess.run(cmd, env=thread_env(threads), capture_output=True, text=True, timeout=1800)
    for line in proc.stdout.splitlines():
        if line.startswith("MOBIZO-MEMORY "):
            return json.loads(line.split(" ", 1)[1])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    raise RuntimeError(f"memory worker {spec['mode']} failed (exit {proc.returncode}): " + " | ".join(tail))


def run_memory(out: Path, quick: bool, threads: int, models=None, bar_enabled: bool = True) -> dict:
    p = plan(quick, models)
    work, programs = out / "_work", out / "programs"
    work.mkdir(parents=True, exist_ok=True)
    bar = progress(len(p["models"]) * (len(MODES) + 1), "bench memory", bar_enabled)
    records, exports = [], []
    try:
        for m in p["models"]:
            bar.set_description(f"bench memory: {m} programs")
            model, tok = adapted_model(m)
            zo, s1 = ensure_zo(programs, model, m, "prge", p["q"], p["batch"], p["length"])
            fo, s2 = ensure_fo(programs, model, m, p["batch"], p["length"])
            exports += [
                {"model": m, "program": zo.name, "export_seconds": s1},
                {"model": m, "program": fo.name, "export_seconds": s2},
            ]
            b = speed_batch(tok, p["batch"], p["length"])
            batch_file = work / f"batch-{m}-b{p['batch']}-t{p['length']}.pt"
            torch.save({"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels}, batch_file)
            pte_bytes = {"zo": (zo / "train.pte").stat().st_size, "fo": (fo / "train_fo.pte").stat().st_size}
            del model
            bar.update(1)
            for mode in MODES:
                bar.set_description(f"bench memory: {m} {mode}")
                spec = {
                    "mode": mode,
                    "model": m,
                    "q": p["q"],
                    "batch": p["batch"],
                    "steps": p["steps"],
                    "threads": threads,
                    "batch_file": str(batch_file),
                    "program": str(fo if mode == "et-fo" else zo),
                }
                r = run_worker(spec, threads)
                r.update(
                    model=m,
                    label=LABELS[mode],
                    above_imports_mb=r["peak_rss_mb"] - r["baseline_rss_mb"],
                    pte_mb=pte_bytes["fo" if mode == "et-fo" else "zo"] / 2**20 if mode.startswith("et") else None,
                )
                records.append(r)
                bar.update(1)
    finally:
        bar.close()
    res = {"plan": p | {"threads": threads}, "records": records, "exports": exports}
    res["ratios"] = ratios(records)
    res["targets"] = targets(res["ratios"])
    return res


def _get(records, model, mode):
    for r in records:
        if r["model"] == model and r["mode"] == mode:
            return r
    return None


PAIRS = (
    ("et-zo", "et-infer"),
    ("et-fo", "et-zo"),
    ("eager-zo", "eager-infer"),
    ("eager-fo", "eager-zo"),
    ("eager-fo-lora", "eager-zo"),
    ("et-zo", "eager-zo"),
    ("et-infer", "eager-infer"),
)


def ratios(records) -> list[dict]:
    out = []
    for m in dict.fromkeys(r["model"] for r in records):
        for a, b in PAIRS:
            ra, rb = _get(records, m, a), _get(records, m, b)
            if ra and rb:
                out.append(
                    {
                        "model": m,
                        "ratio": f"{LABELS[a]} / {LABELS[b]}",
                        "a": a,
                        "b": b,
                        "peak": ra["peak_rss_mb"] / rb["peak_rss_mb"],
                        "above_imports": ra["above_imports_mb"] / max(rb["above_imports_mb"], 1e-9),
                    }
                )
    return out


def targets(rats) -> list[dict]:
    out = []
    for r in rats:
        if (r["a"], r["b"]) == ("et-zo", "et-infer"):
            for k in ("peak", "above_imports"):
                out.append(
                    {
                        "target": f"{r['model']}: ExecuTorch ZO peak RSS <= 1.25x ExecuTorch inference ({k.replace('_', ' ')})",
                        "value": r[k],
                        "need": 1.25,
                        "holds": r[k] <= 1.25,
                    }
                )
        if (r["a"], r["b"]) == ("et-fo", "et-zo"):
            for k in ("peak", "above_imports"):
                out.append(
                    {
                        "target": f"{r['model']}: ExecuTorch FO peak RSS >= 2x ExecuTorch ZO ({k.replace('_', ' ')})",
                        "value": r[k],
                        "need": 2.0,
                        "holds": r[k] >= 2.0,
                    }
                )
    return out


def markdown(res: dict) -> str:
    from .speed import targets_md

    p = res["plan"]
    lines = [
        "## Memory",
        "",
        (
            f"Peak RSS (VmHWM) of one subprocess per row: {p['steps']} steps, prge q={p['q']}, batch {p['batch']}, "
            f"length {p['length']}, {p['threads']} thread(s). 'above imports' subtracts the RSS the process had "
            "after importing what it needs (Python, torch, the runtime), before loading a model or program; "
            "'peak while stepping' is the high-water mark after loading (reset via /proc/self/clear_refs): "
            "building the eager model is the largest moment of the eager processes."
        ),
        "",
    ]
    rows = [
        [
            r["model"],
            r["label"],
            r["peak_rss_mb"],
            r["baseline_rss_mb"],
            r["above_imports_mb"],
            r.get("steps_peak_rss_mb"),
            r["pte_mb"],
            r["seconds_per_step"],
        ]
        for r in res["records"]
    ]
    lines += [
        md_table(
            [
                "model",
                "process",
                "peak RSS MB",
                "after imports MB",
                "above imports MB",
                "peak while stepping MB",
                ".pte MB",
                "s/step",
            ],
            rows,
        ),
        "",
    ]
    rows = [[r["model"], r["ratio"], r["peak"], r["above_imports"]] for r in res["ratios"]]
    lines += ["Ratios:", "", md_table(["model", "ratio", "peak RSS", "above imports"], rows), ""]
    lines += targets_md(res["targets"])
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in res["records"]))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.2), squeeze=False)
    for ax, m in zip(axes[0], models):
        rs = [r for r in res["records"] if r["model"] == m]
        labels = [r["label"] for r in rs]
        base = [r["baseline_rss_mb"] for r in rs]
        above = [r["above_imports_mb"] for r in rs]
        ax.barh(labels, base, color="lightgray", label="after imports")
        ax.barh(
            labels,
            above,
            left=base,
            color=["tab:blue" if r["mode"].startswith("et") else "tab:orange" for r in rs],
            label="above imports",
        )
        ax.invert_yaxis()
        ax.set_xlabel("peak RSS (MB)")
        ax.set_title(f"{m}: peak RSS per process")
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
