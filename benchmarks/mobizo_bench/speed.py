"""``mobizo bench speed``: seconds/step of mezo, prge-outer and prge (eager and ExecuTorch).

For each model one interleaved block runs every contender once per round (A B C ... A B C
...), together with a fp32 ``torch.matmul`` that measures the machine's peak under the very
same load; results are medians over rounds and every ratio is taken within the block.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mobizo.step import ZO_ESTIMATORS, ZOConfig, ZOStep

from .common import (
    LENGTH,
    adapted_model,
    interleaved,
    matmul_contender,
    md_table,
    median,
    n_params,
    progress,
    set_threads,
    speed_batch,
    step_flops,
)
from .programs import ensure_fo, ensure_gemm, ensure_zo, gemm_contender

EPS = 1e-2


@dataclass
class SpeedPlan:
    models: list[str]
    queries: list[int]
    batches: list[int]
    rounds: dict[str, int]
    warmup: dict[str, int]
    # (estimator, q, batch) run through ExecuTorch per model; "fo" = the FO program (q ignored)
    et: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)
    # (model, batch): mezo vs prge at q=4 re-run with this many threads
    thread_check: list[tuple[str, int]] = field(default_factory=list)
    check_threads: int = 2
    length: int = LENGTH


def plan(quick: bool, models: list[str] | None = None) -> SpeedPlan:
    if quick:
        return SpeedPlan(
            models=["tiny"],
            queries=[1, 4],
            batches=[1],
            rounds={"tiny": 3},
            warmup={"tiny": 1},
            et={"tiny": [("prge", 4, 1), ("fo", 0, 1)]},
            thread_check=[("tiny", 1)],
        )
    p = SpeedPlan(
        models=list(models or ["tiny", "100m"]),
        queries=[1, 2, 4, 8],
        batches=[1, 4],
        rounds={"tiny": 7, "100m": 2},
        warmup={"tiny": 1, "100m": 0},
        # Exporting a program takes minutes on 2 cores (the 100M one most): a small ET grid.
        et={"tiny": [("prge", 4, 1), ("prge", 4, 4), ("fo", 0, 1)], "100m": [("prge", 4, 1), ("fo", 0, 1)]},
        thread_check=[("tiny", 1), ("tiny", 4), ("100m", 1)],
    )
    p.models = [m for m in p.models if m in ("tiny", "100m")]
    return p


def _zo_contender(model, est, q, batch):
    step = ZOStep(model, ZOConfig(est, q))
    args = (batch.input_ids, batch.attention_mask, batch.labels)

    def run(i):
        with torch.no_grad():
            step(*args, torch.tensor(i), torch.tensor(0.0), torch.tensor(EPS))

    return run


def run_speed(out: Path, quick: bool, threads: int, models=None, bar_enabled: bool = True) -> dict:
    from mobizo.engines.eager import EagerEngine
    from mobizo.engines.executorch import ExecuTorchEngine
    from mobizo.engines.executorch.fo import ExecuTorchFOEngine

    p = plan(quick, models)
    programs = out / "programs"
    set_threads(threads)
    n_units = 0
    for m in p.models:
        per_round = len(ZO_ESTIMATORS) * len(p.queries) * len(p.batches) + 2 + len(p.et.get(m, []))
        per_round += sum(1 for e, _, _ in p.et.get(m, []) if e == "fo")  # eager FO twin
        n_units += per_round * (p.rounds[m] + p.warmup[m])
        n_units += sum(3 * (p.rounds[m] + max(1, p.warmup[m])) for mm, _ in p.thread_check if mm == m)
    bar = progress(n_units, "bench speed", bar_enabled)
    records, peaks, exports, checks, info = [], {}, [], [], {}
    try:
        for m in p.models:
            model, tok = adapted_model(m)
            info[m] = {
                "parameters": n_params(model),
                "layers": model.config.num_hidden_layers,
                "hidden": model.config.hidden_size,
            }
            batches = {b: speed_batch(tok, b, p.length) for b in p.batches}
            for _, _, b in p.et.get(m, []):
                batches.setdefault(b, speed_batch(tok, b, p.length))
            flops_q1 = {b: step_flops(model, batches[b], copies=2) for b in batches}
            contenders, meta = {}, {}
            for b in p.batches:
                for q in p.queries:
                    for est in ZO_ESTIMATORS:
                        name = f"eager/{est}/q{q}/b{b}"
                        contenders[name] = _zo_contender(model, est, q, batches[b])
                        meta[name] = dict(engine="eager", estimator=est, q=q, batch=b, flops=q * flops_q1[b])
            for est, q, b in p.et.get(m, []):
                bar.set_description(f"bench speed: export {m} {est}" + (f" q={q}" if est != "fo" else "") + f" b={b}")
                if est == "fo":
                    d, secs = ensure_fo(programs, model, m, b, p.length)
                    eng = ExecuTorchFOEngine(d)
                    twin = EagerEngine(copy.deepcopy(model), "fo", optimizer="sgd")
                    fo_flops = fo_step_flops(twin, batches[b])
                    contenders[f"eager/fo/b{b}"] = lambda i, e=twin, bb=batches[b]: e.train_step(bb, i + 1, 0.0, 0.0)
                    meta[f"eager/fo/b{b}"] = dict(engine="eager", estimator="fo", q=0, batch=b, flops=fo_flops)
                    name = f"executorch/fo/b{b}"
                    contenders[name] = lambda i, e=eng, bb=batches[b]: e.train_step(bb, i + 1, 0.0)
                    meta[name] = dict(engine="executorch", estimator="fo", q=0, batch=b, flops=fo_flops)
                else:
                    d, secs = ensure_zo(programs, model, m, est, q, b, p.length)
                    eng = ExecuTorchEngine(d)
                    name = f"executorch/{est}/q{q}/b{b}"
                    contenders[name] = lambda i, e=eng, bb=batches[b]: e.train_step(bb, i, 0.0, EPS)
                    meta[name] = dict(engine="executorch", estimator=est, q=q, batch=b, flops=q * flops_q1[b])
                exports.append({"model": m, "program": d.name, "export_seconds": secs})
            mm, mm_flops = matmul_contender()
            contenders["matmul"] = mm
            xg, xg_flops = gemm_contender(ensure_gemm(programs))
            contenders["xnnpack-gemm"] = xg
            bar.set_description(f"bench speed: {m} ({threads} thread{'s' if threads > 1 else ''})")
            times = interleaved(contenders, p.rounds[m], p.warmup[m], bar)
            # peak = the best round of the torch.matmul (the machine's capability under this load); the
            # XNNPACK GEMM (ExecuTorch's kernels) is reported next to it, and its fraction too.
            peak = mm_flops / min(times["matmul"])
            xpeak = xg_flops / min(times["xnnpack-gemm"])
            peaks[m] = {
                "matmul_gflop_per_s": peak / 1e9,
                "matmul_gflop_per_s_median": mm_flops / median(times["matmul"]) / 1e9,
                "xnnpack_gemm_gflop_per_s": xpeak / 1e9,
                "matmul_times": times["matmul"],
                "xnnpack_gemm_times": times["xnnpack-gemm"],
                "threads": threads,
            }
            for name, ts in times.items():
                if name in ("matmul", "xnnpack-gemm"):
                    continue
                r = dict(model=m, threads=threads, length=p.length, **meta[name])
                sec = median(ts)
                rows = r["batch"] * (2 * r["q"] if r["estimator"] != "fo" else 1)
                r.update(
                    seconds=sec,
                    times=ts,
                    sequences_per_s=rows / sec,
                    examples_per_s=r["batch"] / sec,
                    gflop_per_s=r["flops"] / sec / 1e9,
                    frac_peak=r["flops"] / sec / peak,
                    frac_xnnpack_peak=r["flops"] / sec / xpeak,
                )
                records.append(r)
            # thread sensitivity: mezo vs prge at q=4 with more threads, its own interleaved block
            for cm, b in p.thread_check:
                if cm != m:
                    continue
                set_threads(p.check_threads)
                bar.set_description(f"bench speed: {m} b={b} ({p.check_threads} threads)")
                block = {
                    "mezo": _zo_contender(model, "mezo", 4, batches[b]),
                    "prge": _zo_contender(model, "prge", 4, batches[b]),
                    "matmul": mm,
                }
                t = interleaved(block, p.rounds[m], max(1, p.warmup[m]), bar)
                set_threads(threads)
                checks.append(
                    {
                        "model": m,
                        "batch": b,
                        "q": 4,
                        "threads": p.check_threads,
                        "mezo_seconds": median(t["mezo"]),
                        "prge_seconds": median(t["prge"]),
                        "mezo_over_prge": median(t["mezo"]) / median(t["prge"]),
                        "prge_frac_peak": 4 * flops_q1[b] / median(t["prge"]) / (mm_flops / min(t["matmul"])),
                        "matmul_gflop_per_s": mm_flops / min(t["matmul"]) / 1e9,
                        "times": t,
                    }
                )
            del model, contenders
    finally:
        bar.close()
    result = {
        "plan": {
            "models": p.models,
            "queries": p.queries,
            "batches": p.batches,
            "length": p.length,
            "rounds": p.rounds,
            "warmup": p.warmup,
            "threads": threads,
            "lr": 0.0,
            "eps": EPS,
            "et": {k: [list(x) for x in v] for k, v in p.et.items()},
        },
        "models": info,
        "peak": peaks,
        "records": records,
        "thread_check": checks,
        "exports": exports,
    }
    result["ratios"] = ratios(records)
    result["targets"] = targets(result)
    return result


def fo_step_flops(engine, batch) -> float:
    """Matmul FLOPs of one eager FO step (forward and backward), counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        engine.train_step(batch, 1, 0.0, 0.0)
    return float(fc.get_total_flops())


def _find(records, **kw):
    for r in records:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def ratios(records) -> list[dict]:
    """Within-run ratios of medians: mezo/prge and prge-outer/prge (eager), eager/ExecuTorch."""
    out = []
    for r in records:
        if r["engine"] != "eager" or r["estimator"] != "prge":
            continue
        key = dict(model=r["model"], q=r["q"], batch=r["batch"])
        row = dict(key, prge_seconds=r["seconds"])
        for est in ("mezo", "prge-outer"):
            o = _find(records, engine="eager", estimator=est, **key)
            row[f"{est}_over_prge"] = o["seconds"] / r["seconds"] if o else None
        et = _find(records, engine="executorch", estimator="prge", **key)
        row["executorch_seconds"] = et["seconds"] if et else None
        row["eager_over_executorch"] = r["seconds"] / et["seconds"] if et else None
        out.append(row)
    for r in records:
        if r["engine"] == "executorch" and r["estimator"] == "fo":
            e = _find(records, engine="eager", estimator="fo", model=r["model"], batch=r["batch"])
            if e:
                out.append(
                    dict(
                        model=r["model"],
                        q=0,
                        batch=r["batch"],
                        fo=True,
                        eager_fo_seconds=e["seconds"],
                        executorch_seconds=r["seconds"],
                        eager_over_executorch=e["seconds"] / r["seconds"],
                    )
                )
    return out


def targets(result) -> list[dict]:
    """Issue 5 and issue 3 speed targets, each evaluated on this run's medians."""
    recs, out = result["records"], []
    for model, need in (("tiny", 2.0), ("100m", 1.3)):
        for b in result["plan"]["batches"]:
            p = _find(recs, model=model, engine="eager", estimator="prge", q=4, batch=b)
            z = _find(recs, model=model, engine="eager", estimator="mezo", q=4, batch=b)
            if p and z:
                v = z["seconds"] / p["seconds"]
                out.append(
                    {
                        "target": f"{model}: prge q=4 >= {need}x faster than mezo q=4 (batch {b})",
                        "value": v,
                        "need": need,
                        "holds": v >= need,
                    }
                )
    for b in result["plan"]["batches"]:
        p = _find(recs, model="100m", engine="eager", estimator="prge", q=4, batch=b)
        if p:
            out.append(
                {
                    "target": f"100m: prge q=4 step >= 50% of matmul peak (batch {b}; torch.matmul)",
                    "value": p["frac_peak"],
                    "need": 0.5,
                    "holds": p["frac_peak"] >= 0.5,
                }
            )
            out.append(
                {
                    "target": f"100m: prge q=4 step >= 50% of matmul peak (batch {b}; XNNPACK GEMM)",
                    "value": p["frac_xnnpack_peak"],
                    "need": 0.5,
                    "holds": p["frac_xnnpack_peak"] >= 0.5,
                }
            )
    for r in result["ratios"]:
        if r.get("eager_over_executorch") is not None and not r.get("fo"):
            v = r["eager_over_executorch"]
            out.append(
                {
                    "target": f"{r['model']}: ExecuTorch ZO step no slower than eager ZO (prge q={r['q']}, batch {r['batch']})",
                    "value": v,
                    "need": 1.0,
                    "holds": v >= 1.0,
                }
            )
    return out


def markdown(res: dict) -> str:
    lines = ["## Speed", ""]
    pl = res["plan"]
    lines.append(
        f"Sequence length {pl['length']}, rank 8 MP-LoRA on q_proj/v_proj, {pl['threads']} thread(s); "
        f"medians over {pl['rounds']} interleaved rounds (warm-up {pl['warmup']}). "
        "seq/s counts forward sequences (2·q·batch per ZO step). %peak = matmul FLOP/s of the step (median) "
        "/ the best round of a 2048x2048 fp32 GEMM run in the same block: torch.matmul (MKL), and "
        "ExecuTorch's XNNPACK linear (a one-layer program)."
    )
    lines.append("")
    for m, info in res["models"].items():
        pk = res["peak"][m]
        lines.append(
            f"**{m}** ({info['parameters'] / 1e6:.1f}M parameters, {info['layers']} layers, hidden {info['hidden']}); "
            f"torch.matmul peak {pk['matmul_gflop_per_s']:.1f} GFLOP/s (median {pk['matmul_gflop_per_s_median']:.1f}), "
            f"XNNPACK GEMM peak {pk['xnnpack_gemm_gflop_per_s']:.1f} GFLOP/s"
        )
        lines.append("")
        rows = []
        for r in sorted(
            (r for r in res["records"] if r["model"] == m),
            key=lambda r: (r["engine"], r["estimator"] == "fo", r["batch"], r["q"], r["estimator"]),
        ):
            rows.append(
                [
                    r["engine"],
                    r["estimator"],
                    r["q"] or "",
                    r["batch"],
                    r["seconds"],
                    r["sequences_per_s"],
                    r["gflop_per_s"],
                    100 * r["frac_peak"],
                    100 * r["frac_xnnpack_peak"],
                ]
            )
        lines.append(
            md_table(
                ["engine", "estimator", "q", "batch", "s/step", "seq/s", "GFLOP/s", "%peak (torch)", "%peak (XNNPACK)"],
                rows,
            )
        )
        lines.append("")
    rows = [
        [
            r["model"],
            r["q"],
            r["batch"],
            r.get("mezo_over_prge"),
            r.get("prge-outer_over_prge"),
            r.get("eager_over_executorch"),
        ]
        for r in res["ratios"]
        if not r.get("fo")
    ]
    lines += [
        "Ratios (medians of the same block; > 1 means prge / ExecuTorch is faster):",
        "",
        md_table(["model", "q", "batch", "mezo / prge", "prge-outer / prge", "eager / ExecuTorch"], rows),
        "",
    ]
    if res["thread_check"]:
        rows = [
            [
                c["model"],
                c["batch"],
                c["threads"],
                c["mezo_seconds"],
                c["prge_seconds"],
                c["mezo_over_prge"],
                100 * c["prge_frac_peak"],
            ]
            for c in res["thread_check"]
        ]
        lines += [
            "Thread sensitivity (q=4, its own interleaved block):",
            "",
            md_table(["model", "batch", "threads", "mezo s/step", "prge s/step", "mezo / prge", "prge %peak"], rows),
            "",
        ]
    lines += targets_md(res["targets"])
    return "\n".join(lines)


def targets_md(ts) -> list[str]:
    rows = [[t["target"], t["value"], t["need"], "yes" if t["holds"] else "**no**"] for t in ts]
    return ["Targets:", "", md_table(["target", "measured", "needed", "holds"], rows), ""]


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(res["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    styles = {"mezo": "tab:red", "prge-outer": "tab:orange", "prge": "tab:blue"}
    for ax, m in zip(axes[0], models):
        for est, color in styles.items():
            for b, ls in zip(res["plan"]["batches"], ("-", "--", ":")):
                pts = sorted(
                    (r["q"], r["seconds"])
                    for r in res["records"]
                    if r["model"] == m and r["engine"] == "eager" and r["estimator"] == est and r["batch"] == b
                )
                if pts:
                    ax.plot(*zip(*pts), ls, marker="o", color=color, label=f"eager {est} b={b}")
        et = [
            (r["q"], r["seconds"], r["batch"])
            for r in res["records"]
            if r["model"] == m and r["engine"] == "executorch" and r["estimator"] != "fo"
        ]
        for q, s, b in et:
            ax.plot([q], [s], marker="*", markersize=14, color="black", linestyle="none")
            ax.annotate(f"ET b={b}", (q, s), textcoords="offset points", xytext=(6, -4), fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("queries q")
        ax.set_ylabel("seconds / step (median)")
        ax.set_title(f"{m}: seconds per ZO step ({res['plan']['threads']} thread(s))")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
