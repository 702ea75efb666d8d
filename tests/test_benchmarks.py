"""benchmarks/: every script answers ``--help`` (so it imports what exists today and parses its flags before
any work), and ``mobizo bench`` finds its suite in the source checkout.

The scripts are found by globbing ``benchmarks/**/*.py`` for a ``__main__`` block, so a new script is
covered without touching this file. Modules of a package (``benchmarks/mobizo_bench``) run as ``python -m``,
as ``mobizo bench`` runs them. Each runs in a fresh interpreter in an empty directory that must stay empty:
``--help`` writes nothing."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
MAIN = re.compile(r"^if __name__ == [\"']__main__[\"']:", re.MULTILINE)


def scripts() -> list[Path]:
    return sorted(p for p in BENCH.rglob("*.py") if MAIN.search(p.read_text(encoding="utf-8")))


SCRIPTS = scripts()


def command(path: Path) -> list[str]:
    if (path.parent / "__init__.py").is_file():
        return [sys.executable, "-m", ".".join(path.relative_to(BENCH).with_suffix("").parts)]
    return [sys.executable, str(path)]


def env() -> dict:
    """This tree's mobizo and benchmarks first (an installed mobizo may be another tree's)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src"), str(BENCH)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else [])
    )
    return e


def test_every_script_is_found():
    names = {str(p.relative_to(BENCH)) for p in SCRIPTS}
    # one of each kind: top level, benchmarks/real, benchmarks/convergence, a module of the mobizo_bench package
    assert {"soak.py", "real/bench_real.py", "convergence/run.py", "mobizo_bench/memory_worker.py"} <= names
    assert "mobizo_bench/common.py" not in names  # a library module, not a script


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(p.relative_to(BENCH)) for p in SCRIPTS])
def test_script_help(script, tmp_path):
    res = subprocess.run(
        [*command(script), "--help"], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("usage: ") and "-h, --help" in res.stdout, res.stdout[:500]
    assert not list(tmp_path.iterdir()), "--help wrote files"


def test_bench_finds_the_suite_next_to_the_package():
    from mobizo.cli import benchmarks_dir

    assert benchmarks_dir() == BENCH


def test_bench_without_the_suite_says_so_in_one_line(tmp_path, monkeypatch, run_cli):
    monkeypatch.setenv("MOBIZO_BENCHMARKS", str(tmp_path))
    code, err = run_cli(["bench", "speed", "--out", tmp_path / "out"])
    assert code == 2
    assert err == (
        f"mobizo: error: the benchmarks are not at {tmp_path} ('mobizo bench' runs from a source checkout; "
        "set MOBIZO_BENCHMARKS to its benchmarks/ directory)\n"
    )
    assert not (tmp_path / "out").exists()


# `mobizo ARGV` in a fresh interpreter, then which mobizo_bench it ran (an installed mobizo may put another
# tree's copy on the path)
MOBIZO = (
    "import sys; from mobizo.cli import main; code = main(sys.argv[1:]); import mobizo_bench; "
    "print(mobizo_bench.__file__); sys.exit(code)"
)


def _mobizo(argv, cwd: Path) -> subprocess.CompletedProcess:
    """``mobizo ARGV`` with only src/ on the path: the CLI must find benchmarks/ by itself."""
    e = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "-c", MOBIZO, *map(str, argv)], cwd=cwd, env=e, capture_output=True, text=True
    )
    assert res.stdout.splitlines()[-1:] == [str(BENCH / "mobizo_bench" / "__init__.py")], res.stderr[-2000:]
    return res


def test_bench_imports_the_suite_in_a_fresh_process(tmp_path):
    # the --threads check is mobizo_bench.run_bench's own: reaching it means the suite was imported
    res = _mobizo(["bench", "speed", "--threads", "0", "--out", tmp_path / "out"], tmp_path)
    assert res.returncode == 2 and res.stderr.strip().endswith("--threads must be >= 1, got 0"), res.stderr[-2000:]


@pytest.mark.slow  # ~20 s: the smallest real run of the suite (tests/test_bench.py runs `bench all --quick`)
def test_bench_convergence_tiny_in_a_fresh_process(tmp_path):
    out = tmp_path / "out"
    res = _mobizo(
        ["bench", "convergence", "--quick", "--seeds", 1, "--steps", 2, "--out", out, "--no-progress"], tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    cv = json.loads((out / "results.json").read_text())["convergence"]
    assert cv["plan"]["steps"] == 2 and cv["plan"]["seeds"] == [0]
    assert len(cv["runs"]) == len(cv["contenders"]) == 3  # prge q=1, prge q=4, FO
    assert all(len(r["loss"]) == 2 for r in cv["runs"])
    assert (out / "convergence.png").is_file() and "## Convergence" in (out / "results.md").read_text()
