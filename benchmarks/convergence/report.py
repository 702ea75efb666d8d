"""Tables and plots from a run.py results folder.

    python benchmarks/convergence/report.py RESULTS [--out RESULTS/report] [--budgets 100,300,500] [--all-lrs]

Writes OUT/report.md: one table per task, a row per model x rule x setting (q, batch): the zero-shot
metric, the metric at fixed step budgets, the final and best metric, the forward rows and the training
seconds each rule needs to reach ZO-SGD's final metric (same task, model, q and batch), and s/step; every
number is the median over seeds. Without --all-lrs each rule is shown at its best lr (best median final
metric, ties to the larger lr). Also OUT/<model>-rows.png and OUT/<model>-seconds.png: the metric (median
over seeds) against forward rows and against training seconds, one panel per task, a line per rule,
first-order (fo) dashed black as the reference, zero-shot dotted grey. OUT/report.json has the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import DONE, FO_RULES, RULES, pick_best_lr, strict_json  # run.py beside this file

COLORS = {  # one colour per rule in every panel; fo is the black reference line
    "sgd": "tab:blue",
    "momentum": "tab:orange",
    "adam": "tab:green",
    "sign": "tab:red",
    "fzoo": "tab:purple",
    "hizoo": "tab:brown",
    "fo": "black",
    "fo-sgd": "dimgray",
}
BASELINE = "sgd"


def load(folder: Path) -> list[dict]:
    runs = []
    for path in sorted((folder / "runs").glob("*.json")):
        try:
            r = json.loads(path.read_text())
        except ValueError:
            continue
        if r.get("status") in DONE and r.get("curve"):
            runs.append(r)
    return runs


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def value(point: dict, metric: str) -> float | None:
    v = point.get(metric)
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def at_step(run: dict, step: int) -> float | None:
    """The metric of the last eval at or before ``step``; None if the run stopped before ``step``."""
    if run["grid"]["steps"] < step:
        return None
    pts = [p for p in run["curve"] if p["step"] <= step]
    return value(pts[-1], run["metric"]) if pts else None


def reach(run: dict, target: float) -> tuple[float, float]:
    """(forward rows, seconds) at the first eval after step 0 at or beyond ``target``; inf if never."""
    better = (lambda v: v >= target) if run["higher_is_better"] else (lambda v: v <= target)
    for p in run["curve"][1:]:
        v = value(p, run["metric"])
        if v is not None and better(v):
            return p["rows"], p["seconds"]
    return math.inf, math.inf


def setting(run: dict) -> tuple:
    g = run["grid"]
    return (g["task"], g["model_tag"], g["q"], g["batch"], g.get("eps"), tuple(g.get("extra", ())))


def groups(runs: list[dict], all_lrs: bool) -> dict:
    """{(task, model, q, batch, eps, extra): {(rule, lr): [runs over seeds]}}; fo runs (q = 0) join every q."""
    by = defaultdict(lambda: defaultdict(dict))
    for r in runs:
        g = r["grid"]
        old = by[setting(r)][(g["rule"], g["lr"])].get(g["seed"])
        if old is None or old["grid"]["steps"] < g["steps"]:  # the longest run of a seed
            by[setting(r)][(g["rule"], g["lr"])][g["seed"]] = r
    out = {}
    zo_settings = [s for s in by if s[2] != 0]
    for s, rules in by.items():
        if s[2] == 0 and zo_settings:
            continue
        out[s] = {k: list(v.values()) for k, v in rules.items()}
    for s in zo_settings:  # the fo runs of the same task, model and batch
        fo = by.get((s[0], s[1], 0, s[3], s[4], s[5]), {})
        out[s].update({k: list(v.values()) for k, v in fo.items()})
    if all_lrs:
        return out
    picked = {}
    for s, rules in out.items():
        per_rule = defaultdict(list)
        for (rule, lr), rs in rules.items():
            per_rule[rule].append((lr, rs))
        picked[s] = {}
        for rule, cands in per_rule.items():
            higher = cands[0][1][0]["higher_is_better"]
            finals = [
                {"lr": lr, "status": "completed", "final": median([value(r["final"], r["metric"]) for r in rs])}
                for lr, rs in cands
            ]
            for f in finals:
                if f["final"] is None:
                    f["status"] = "diverged"
            lr = pick_best_lr(finals, higher)
            lr = lr if lr is not None else max(c[0] for c in cands)
            picked[s][(rule, lr)] = dict(cands)[lr]
    return picked


def fmt(v, digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def fmt_count(v) -> str:
    if v is None or math.isinf(v):
        return "not reached"
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if v >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.0f}"


def fmt_seconds(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.0f}"


def order(rule: str) -> int:
    return RULES.index(rule) if rule in RULES else len(RULES)


def summarise(runs: list[dict], budgets: list[int], all_lrs: bool) -> list[dict]:
    rows = []
    for s, rules in sorted(groups(runs, all_lrs).items(), key=lambda kv: tuple(map(str, kv[0]))):
        task, model, q, batch, eps, _extra = s
        base = [rs for (rule, _), rs in rules.items() if rule == BASELINE]
        target = None
        if base:
            b = base[0]
            target = median([value(r["final"], r["metric"]) for r in b])
        for (rule, lr), rs in sorted(rules.items(), key=lambda kv: (order(kv[0][0]), kv[0][1])):
            metric = rs[0]["metric"]
            reached = [reach(r, target) for r in rs] if target is not None else []
            n_reached = sum(1 for x in reached if math.isfinite(x[0]))
            rows.append(
                {
                    "task": task,
                    "model": model,
                    "rule": rule,
                    "lr": lr,
                    "q": q if rule not in FO_RULES else None,
                    "batch": batch,
                    "eps": eps,
                    "metric": metric,
                    "higher_is_better": rs[0]["higher_is_better"],
                    "seeds": sorted(r["grid"]["seed"] for r in rs),
                    "steps": max(r["grid"]["steps"] for r in rs),
                    "diverged": sum(r["status"] != "completed" for r in rs),
                    "zero_shot": median([value(r["zero_shot"], metric) for r in rs]),
                    "budgets": {n: median([at_step(r, n) for r in rs]) for n in budgets},
                    "final": median([value(r["final"], metric) for r in rs]),
                    "best": median([value(r["best"] or {}, metric) for r in rs]),
                    "target": target,
                    "rows_to_target": statistics.median([x[0] for x in reached]) if reached else None,
                    "seconds_to_target": statistics.median([x[1] for x in reached]) if reached else None,
                    "reached": f"{n_reached}/{len(reached)}" if reached else None,
                    "seconds_per_step": median([r.get("median_step_seconds") for r in rs]),
                }
            )
    return rows


def markdown(rows: list[dict], budgets: list[int]) -> str:
    out = ["# Convergence of the ZO update rules", ""]
    out.append(
        "Medians over seeds. *rows to SGD final*: forward rows (batch rows x copies of B per step, summed) until "
        "the first eval at or beyond ZO-SGD's median final metric in the same setting; fo also runs a backward "
        "over the same rows (about two forwards' cost), not counted here. *s to SGD final*: training seconds "
        "(step time only) until then. *s/step*: median step time. (k/n): seeds that reached it."
    )
    tasks = sorted({r["task"] for r in rows})
    for task in tasks:
        rs = [r for r in rows if r["task"] == task]
        m = rs[0]["metric"]
        arrow = "higher is better" if rs[0]["higher_is_better"] else "lower is better"
        out += ["", f"## {task} ({m}, {arrow})", ""]
        head = ["model", "rule", "lr", "q", "batch", "seeds", "zero-shot"]
        head += [f"@{n}" for n in budgets]
        head += ["final", "best", "rows to SGD final", "s to SGD final", "s/step"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        digits = 3 if rs[0]["higher_is_better"] else 4
        for r in rs:
            reached = (
                ""
                if r["reached"] is None or r["reached"].split("/")[0] == r["reached"].split("/")[1]
                else (f" ({r['reached']})")
            )
            seeds = f"{len(r['seeds'])}" + (f", {r['diverged']} diverged" if r["diverged"] else "")
            cells = [r["model"], r["rule"], f"{r['lr']:g}", "—" if r["q"] is None else str(r["q"]), str(r["batch"])]
            cells += [seeds, fmt(r["zero_shot"], digits)]
            cells += [fmt(r["budgets"][n], digits) for n in budgets]
            cells += [f"{fmt(r['final'], digits)} ({r['steps']})", fmt(r["best"], digits)]
            cells += [
                "—" if r["rows_to_target"] is None else fmt_count(r["rows_to_target"]) + reached,
                "—"
                if r["seconds_to_target"] is None
                else ("not reached" if math.isinf(r["seconds_to_target"]) else fmt_seconds(r["seconds_to_target"])),
                fmt(r["seconds_per_step"], 2),
            ]
            out.append("| " + " | ".join(cells) + " |")
        target = rs[0]["target"]
        if target is not None:
            out.append("")
            out.append(f"ZO-SGD's median final {m}: {target:.4f}.")
    return "\n".join(out) + "\n"


def median_curve(rs: list[dict], x: str) -> tuple[list[float], list[float]]:
    """Per eval step that every seed has: the median x (rows or seconds) and the median metric."""
    steps = set.intersection(*({p["step"] for p in r["curve"]} for r in rs))
    xs, ys = [], []
    for step in sorted(steps):
        if step == 0:
            continue  # log x axis: zero-shot is its own dotted line
        pts = [next(p for p in r["curve"] if p["step"] == step) for r in rs]
        y = median([value(p, rs[0]["metric"]) for p in pts])
        if y is not None:
            xs.append(statistics.median(p[x] for p in pts))
            ys.append(y)
    return xs, ys


def plots(runs: list[dict], out: Path, all_lrs: bool) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    written = []
    grouped = groups(runs, all_lrs)
    for model in sorted({s[1] for s in grouped}):
        settings = {s: v for s, v in grouped.items() if s[1] == model}
        tasks = sorted({s[0] for s in settings})
        several = len({s[2:] for s in settings}) > 1
        for x, xlabel in (("rows", "forward rows (log)"), ("seconds", "training seconds (log)")):
            fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.2 * len(tasks), 7.0), 3.8), squeeze=False)
            handles = {}
            for ax, task in zip(axes[0], tasks):
                zero = None
                for s, rules in settings.items():
                    if s[0] != task:
                        continue
                    for (rule, lr), rs in sorted(rules.items(), key=lambda kv: (order(kv[0][0]), kv[0][1])):
                        xs, ys = median_curve(rs, x)
                        if not xs:
                            continue
                        label = rule + (f" lr {lr:g}" if all_lrs else "") + (f" q{s[2]} b{s[3]}" if several else "")
                        fo = rule in FO_RULES
                        (line,) = ax.plot(
                            xs,
                            ys,
                            color=COLORS.get(rule),
                            linestyle="--" if fo else "-",
                            linewidth=2.2 if fo else 1.5,
                            marker="o",
                            markersize=2.5,
                            label=label,
                        )
                        handles.setdefault(label, line)
                        zero = zero if zero is not None else median([value(r["zero_shot"], r["metric"]) for r in rs])
                    metric = next(iter(rules.values()))[0]["metric"]
                if zero is not None:
                    handles.setdefault("zero-shot", ax.axhline(zero, color="grey", linestyle=":", linewidth=1))
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_count(v)))  # 10k, not 10^4
                ax.set_title(f"{task}", fontsize=10)
                ax.set_xlabel(xlabel, fontsize=9)
                ax.set_ylabel(metric, fontsize=9)
                ax.tick_params(labelsize=8)
                ax.grid(True, which="major", alpha=0.3)
            fig.suptitle(f"{model}: eval metric vs {xlabel.split(' (')[0]}, median over seeds", fontsize=10)
            labels = sorted(handles, key=lambda k: (k == "zero-shot", order(k.split()[0])))
            fig.legend(
                [handles[k] for k in labels],
                labels,
                loc="lower center",
                ncol=min(len(handles), 9),
                fontsize=8,
                frameon=False,
            )
            fig.tight_layout(rect=(0, 0.1, 1, 0.95))
            path = out / f"{model}-{x}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="run.py --out folder")
    ap.add_argument("--out", type=Path, default=None, help="default: RESULTS/report")
    ap.add_argument("--budgets", default="100,300,500", help="step budgets for the table")
    ap.add_argument("--all-lrs", action="store_true", help="a row / line per (rule, lr) instead of each rule's best")
    args = ap.parse_args(argv)
    runs = load(args.results)
    if not runs:
        sys.exit(f"report.py: no finished runs in {args.results / 'runs'}")
    out = args.out or args.results / "report"
    out.mkdir(parents=True, exist_ok=True)
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    rows = summarise(runs, budgets, args.all_lrs)
    (out / "report.md").write_text(markdown(rows, budgets))
    # not reached (inf) is null in the JSON
    (out / "report.json").write_text(
        strict_json([{**r, "budgets": {str(k): v for k, v in r["budgets"].items()}} for r in rows])
    )
    pngs = plots(runs, out, args.all_lrs)
    print(f"{out / 'report.md'}, {', '.join(p.name for p in pngs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
