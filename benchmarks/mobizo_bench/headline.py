"""The headline tables of benchmarks/README.md from a ``results.json``.

Usage: ``python -m mobizo_bench.headline DIR/results.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import md_table


def _rec(recs, **kw):
    for r in recs:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def speed_table(sp: dict) -> str:
    rows = []
    for m in sp["models"]:
        for b in sp["plan"]["batches"]:

            def get(eng, est, m=m, b=b):
                return _rec(sp["records"], model=m, engine=eng, estimator=est, q=4, batch=b)

            mezo, outer, prge, et = (
                get("eager", "mezo"),
                get("eager", "prge-outer"),
                get("eager", "prge"),
                get("executorch", "prge"),
            )
            if not (mezo and prge):
                continue
            rows.append(
                [
                    m,
                    b,
                    mezo["seconds"],
                    outer["seconds"] if outer else None,
                    prge["seconds"],
                    mezo["seconds"] / prge["seconds"],
                    et["seconds"] if et else None,
                    prge["seconds"] / et["seconds"] if et else None,
                    100 * prge["frac_peak"],
                    100 * prge["frac_xnnpack_peak"],
                    100 * et["frac_xnnpack_peak"] if et else None,
                ]
            )
    return md_table(
        [
            "model",
            "batch",
            "mezo s/step",
            "prge-outer s/step",
            "prge s/step",
            "mezo / prge",
            "ExecuTorch prge s/step",
            "eager / ExecuTorch",
            "prge % torch.matmul peak",
            "prge % XNNPACK GEMM peak",
            "ExecuTorch % XNNPACK GEMM peak",
        ],
        rows,
    )


def issue3_table(sp: dict, mem: dict) -> str:
    rows = []
    for m in dict.fromkeys(r["model"] for r in mem["records"]):
        zo = _rec(
            sp["records"],
            model=m,
            engine="executorch",
            estimator="prge",
            q=mem["plan"]["q"],
            batch=mem["plan"]["batch"],
        )
        ez = _rec(
            sp["records"], model=m, engine="eager", estimator="prge", q=mem["plan"]["q"], batch=mem["plan"]["batch"]
        )
        fo = _rec(sp["records"], model=m, engine="executorch", estimator="fo", batch=mem["plan"]["batch"])
        ef = _rec(sp["records"], model=m, engine="eager", estimator="fo", batch=mem["plan"]["batch"])
        peak = {r["mode"]: r for r in mem["records"] if r["model"] == m}

        def p(mode, peak=peak):
            r = peak.get(mode)
            if not r:
                return "n/a"
            steps = r.get("steps_peak_rss_mb")
            return f"{r['peak_rss_mb']:.0f} / {steps:.0f}" if steps else f"{r['peak_rss_mb']:.0f}"

        rows.append(
            [
                m,
                zo and zo["seconds"],
                ez and ez["seconds"],
                fo and fo["seconds"],
                ef and ef["seconds"],
                p("et-infer"),
                p("et-zo"),
                p("et-fo"),
                p("eager-infer"),
                p("eager-zo"),
                p("eager-fo"),
                p("eager-fo-lora"),
            ]
        )
    return md_table(
        [
            "model",
            "ET ZO s/step",
            "eager ZO s/step",
            "ET FO s/step",
            "eager FO s/step",
            "ET inference MB",
            "ET ZO MB",
            "ET FO MB",
            "eager inference MB",
            "eager ZO MB",
            "eager FO (LoRA-FA) MB",
            "eager FO (LoRA) MB",
        ],
        rows,
    )


def targets_table(res: dict) -> str:
    ts = res.get("speed", {}).get("targets", []) + res.get("memory", {}).get("targets", [])
    return md_table(
        ["target", "measured", "needed", "holds"],
        [[t["target"], t["value"], t["need"], "yes" if t["holds"] else "**no**"] for t in ts],
    )


def convergence_table(cv: dict) -> str:
    metric = cv["summary"][0]["metric"]
    return md_table(
        ["run", "batch", f"final {metric} (mean ± std over seeds)", f"best {metric}", "s/step", "train s"],
        [
            [
                s["contender"],
                s["batch"],
                f"{s['final_mean']:.3f} ± {s['final_std']:.3f}",
                s["best_mean"],
                s["seconds_per_step"],
                s["train_seconds"],
            ]
            for s in cv["summary"]
        ],
    )


def main(path: str) -> str:
    res = json.loads(Path(path).read_text(encoding="utf-8"))
    out = []
    if "speed" in res:
        out += ["Speed at q=4 (seconds per step, medians of interleaved rounds):", "", speed_table(res["speed"]), ""]
    if "speed" in res and "memory" in res:
        out += [
            (
                "ExecuTorch vs eager (issue 3): seconds/step (prge q=4 and FO with SGD, batch 1, length 64) and peak "
                "RSS in MB of one process each: whole process / while stepping (after loading):"
            ),
            "",
            issue3_table(res["speed"], res["memory"]),
            "",
        ]
    out += ["Targets:", "", targets_table(res), ""]
    if "convergence" in res:
        out += ["Convergence:", "", convergence_table(res["convergence"]), ""]
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="a 'mobizo bench' results.json")
    print(main(ap.parse_args().results))
