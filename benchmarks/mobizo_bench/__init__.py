"""``mobizo bench {speed,memory,convergence,all} --out DIR [--quick]``.

Writes ``DIR/results.json`` (every number, per-round times included), ``DIR/results.md``
(the tables) and PNG plots; ExecuTorch programs are exported once per shape into
``DIR/programs`` and reused by later sections and runs. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mobizo.errors import MobizoError

from .common import environment, set_threads, write_json

SECTIONS = ("speed", "memory", "convergence")


def run_bench(
    which: str,
    out: str,
    quick: bool = False,
    threads: int = 1,
    models=None,
    model=None,
    task=None,
    data=None,
    seeds=None,
    steps=None,
    progress: bool = True,
) -> dict:
    if which not in SECTIONS + ("all",):
        raise MobizoError(f"unknown benchmark {which!r} (choose from {', '.join(SECTIONS)}, all)")
    if threads < 1:
        raise MobizoError(f"--threads must be >= 1, got {threads}")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise MobizoError(f"--out {root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    set_threads(threads)
    sections = SECTIONS if which == "all" else (which,)
    results: dict = {"environment": environment(threads), "quick": quick, "sections": list(sections)}
    # A section run alone keeps the other sections' results of an earlier run in the same DIR.
    previous = root / "results.json"
    if which != "all" and previous.is_file():
        try:
            old = json.loads(previous.read_text(encoding="utf-8"))
            for s in SECTIONS:
                if s != which and s in old:
                    results[s] = old[s]
        except (OSError, json.JSONDecodeError):
            pass
    t_all = time.perf_counter()
    for s in sections:
        t0 = time.perf_counter()
        if s == "speed":
            from .speed import run_speed

            results["speed"] = run_speed(root, quick, threads, models, progress)
        elif s == "memory":
            from .memory import run_memory

            results["memory"] = run_memory(root, quick, threads, models, progress)
        else:
            from .convergence import run_convergence

            results["convergence"] = run_convergence(root, quick, threads, model, task, data, seeds, steps, progress)
        results[s]["seconds"] = time.perf_counter() - t0
        results[s]["environment"] = results["environment"]  # which command/load made this section
        write_json(root / "results.json", results)  # after every section: a crash keeps what finished
    results["seconds"] = time.perf_counter() - t_all
    write_reports(root, results)
    return results


def write_reports(root: Path, results: dict) -> None:
    from . import convergence, memory, speed

    env = results["environment"]
    md = [
        "# mobizo benchmarks",
        "",
        f"`{' '.join(['mobizo'] + [a for a in env['argv'][1:]])}` — {env['time']}, {env['cpu']}, {env['cores']} cores, "
        f"{env['threads']} thread(s), load average at start {env['loadavg_at_start']}, torch {env['torch']}, "
        f"executorch {env['executorch']}, mobizo {env['mobizo']}"
        + (" (--quick: smoke-test grid)" if results["quick"] else "")
        + ".",
        "",
    ]
    plots = {
        "speed": (speed, "speed.png"),
        "memory": (memory, "memory.png"),
        "convergence": (convergence, "convergence.png"),
    }
    for s, (mod, png) in plots.items():
        if s not in results:
            continue
        md.append(mod.markdown(results[s]))
        env_s = results[s].get("environment")
        if env_s and env_s.get("argv") != env.get("argv"):
            md.append(
                f"(This section: `{' '.join(['mobizo'] + env_s['argv'][1:])}` at {env_s['time']}, "
                f"load average {env_s['loadavg_at_start']}.)\n"
            )
        mod.plot(results[s], root / png)
        md += [f"![{s}]({png})", ""]
    write_json(root / "results.json", results)
    (root / "results.md").write_text("\n".join(md), encoding="utf-8")
