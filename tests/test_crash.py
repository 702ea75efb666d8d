"""Fault injection: SIGKILL `mobizo train` at random moments (incl. inside checkpoint writes), resume, compare.

The bulk of the kills goes through a fork server (same `mobizo.cli.main`, a real
separate process, ~1 s per kill/resume cycle); a few go through the plain
`python -m mobizo train` subprocess a user runs. The engine is a parameter;
ExecuTorch runs when its engine module exists (tolerance 1e-5 instead of bitwise).
"""

from __future__ import annotations

import importlib.util
import random

import pytest
from crash_harness import FAST_ARGS, ForkLauncher, KillStats, SubprocessLauncher, final_check, kill_resume

pytestmark = pytest.mark.slow

STEPS = 40
HAS_EXECUTORCH_ENGINE = importlib.util.find_spec("mobizo.engines.executorch") is not None
ENGINES = [
    "eager",
    pytest.param(
        "executorch",
        marks=pytest.mark.skipif(not HAS_EXECUTORCH_ENGINE, reason="the ExecuTorch engine is not in this checkout"),
    ),
]
# (min kills, adapter tolerance) per engine: eager must match bit for bit
PLAN = {"eager": (20, 0.0), "executorch": (6, 1e-5)}


@pytest.fixture(scope="module")
def fork():
    launcher = ForkLauncher()
    yield launcher
    launcher.close()


@pytest.fixture(scope="module")
def references(fork, tmp_path_factory):
    """Uninterrupted runs, one per argument list."""
    root = tmp_path_factory.mktemp("ref")
    cache = {}

    def get(args: list[str]):
        key = tuple(args)
        if key not in cache:
            out = root / f"ref{len(cache)}"
            proc = fork.start(["train", *args, "--out", str(out)], {}, root / f"ref{len(cache)}.log")
            rc = proc.wait()
            assert rc == 0, (root / f"ref{len(cache)}.log").read_text()
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="module")
def et_program(tmp_path_factory):
    """One exported program for every ExecuTorch run here (exporting costs ~40 s; the runs reuse it)."""
    from mobizo.build import export
    from mobizo.cli import build_parser, config_from

    d = tmp_path_factory.mktemp("et") / "program"
    export(config_from(build_parser().parse_args(["train", *FAST_ARGS]))[0], str(d))
    return d


@pytest.mark.parametrize("engine", ENGINES)
def test_sigkill_resume_matches_uninterrupted(fork, references, tmp_path, engine, request):
    min_kills, tol = PLAN[engine]
    extra = ["--program", str(request.getfixturevalue("et_program"))] if engine == "executorch" else []
    configs = [FAST_ARGS + ["--engine", engine, "--estimator", "prge", *extra]]
    if engine == "eager":
        configs.append(FAST_ARGS + ["--engine", engine, "--estimator", "mezo", "--seed", "3"])
    rng = random.Random(20240915)
    stats = KillStats()
    run = 0
    while stats.kills < min_kills:
        args = configs[run % len(configs)]
        out = tmp_path / f"run{run}"
        kill_resume(fork, out, args, min(12, min_kills - stats.kills), rng, total_steps=STEPS, stats=stats, tol=tol)
        final_check(out, references(args), tol, STEPS)
        run += 1
    print(
        f"\n{engine}: {stats.kills} kills survived over {run} runs, {stats.processes} processes; "
        f"kill moments {stats.by_mode}; checkpoint step after each kill {stats.checkpoint_steps}"
    )
    assert stats.kills >= min_kills
    # the kills landed in different places: before any checkpoint, mid-run, and inside checkpoint writes
    assert any(k.startswith(("tmp", "swap")) for k in stats.by_mode)


def test_sigkill_resume_real_cli_subprocess(references, tmp_path):
    """The same through `python -m mobizo train` processes (PYTHONPATH = this checkout's src)."""
    args = FAST_ARGS + ["--engine", "eager"]
    stats = kill_resume(SubprocessLauncher(), tmp_path / "run", args, 3, random.Random(7), total_steps=STEPS)
    assert stats.kills == 3
    final_check(tmp_path / "run", references(args), 0.0, STEPS)


def test_threads_flag_resizes_the_runtime_pool_before_loading(references, et_program, tmp_path):
    """`--threads 1` on a given program: the runtime's thread pool is resized before the methods load
    (resizing it under loaded XNNPACK delegates aborted or hung the step); same adapter as the default."""
    args = FAST_ARGS + ["--engine", "executorch", "--estimator", "prge", "--program", str(et_program)]
    out, log = tmp_path / "threads1", tmp_path / "threads1.log"
    rc = SubprocessLauncher().start(["train", *args, "--threads", "1", "--out", str(out)], {}, log).wait(timeout=300)
    assert rc == 0, log.read_text()[-2000:]
    final_check(out, references(args), PLAN["executorch"][1], STEPS)
