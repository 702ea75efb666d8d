"""The import structure of src/mobizo: no cycles, and no module reaches up a layer.

Every ``import`` / ``from ... import`` of every module is read with :mod:`ast` (those inside functions
too: a deferred import is still a dependency, only a later one), relative imports resolved, into a
graph of mobizo's own modules. Importing ``a.b.c`` also runs the ``__init__`` of ``a.b``, so that is an
edge too (unless the importer lives inside ``a.b``: a package's modules importing each other do not
depend on the package's ``__init__`` that re-exports them). The top package ``mobizo`` (``__version__``
and the lazy name map of the public API, which imports nothing until a name is used) is exempt.

The layers, lowest first. A module may import modules of its own layer or of lower ones, never of a
higher one: each layer is what the one above it is built from.

1. foundation: ``errors``, ``util``, ``progress``, ``threads``, ``fsio`` (atomic file writes):
   no knowledge of models, runs or flags.
2. the ZO math: ``perturb`` (seeded noise), ``archs`` (per-architecture tables), ``schedule`` (lr).
3. ``mplora``: the adapter layer and its injection.
4. ``step``: the one ZO step every engine runs.
5. examples: ``tasks`` (task definitions and readers), ``data`` (tokenising, collating, batch order).
6. what works on a model or the examples without running training: ``evaluation``, ``quantize``,
   ``convert`` (GGUF), ``models`` (loading bases), ``resources`` (memory and thread checks).
7. ``engines``: the eager engine and ExecuTorch's export / manifest / runtime; they run the step.
8. files of a run: ``checkpoint`` (PEFT adapters, checkpoints), ``rundir`` (``--out``),
   ``program_cache`` (exported programs kept for reuse).
9. ``config``: the run's flags (it checks values with the lower layers' validators).
10. ``build``: the assembly of a run from a config (model + task + adapter + engine).
11. ``trainer``: the single-process training loop.
12. what runs on top of the trainer or a built run: ``distributed`` (a process group around the
    trainer), ``replay``, ``bundle`` (for the native trainer), ``native`` (builds/runs ``mobizo-train``).
13. ``api``: the public Python API, which chooses single-process or distributed training.
14. front ends: ``cli``, ``demo``, ``__main__``.

The tests' own files are read the same way: none imports conftest or a test module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mobizo

PKG = Path(mobizo.__file__).resolve().parent

LAYERS = [
    ("foundation", ["errors", "util", "progress", "threads", "fsio", "patches", "devices"]),
    ("ZO math", ["perturb", "archs", "schedule", "divergence", "zo_optim"]),
    ("adapter", ["mplora"]),
    ("step", ["step"]),
    ("examples", ["tasks", "data"]),
    ("models and eval", ["evaluation", "generation", "quantize", "convert", "models", "resources"]),
    ("engines", ["engines"]),
    ("run files", ["checkpoint", "rundir", "program_cache"]),
    ("config", ["config"]),
    ("build", ["build"]),
    ("trainer", ["trainer"]),
    ("above the trainer", ["distributed", "replay", "bundle", "native", "inference", "chat", "deploy"]),
    ("api", ["api"]),
    ("front ends", ["cli", "demo", "__main__"]),
]


def modules() -> dict[str, Path]:
    """{dotted name: file} of every module of the package (a package by its ``__init__``)."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The mobizo modules ``name`` imports (anywhere in it), the top package left out."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[: len(base) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # ``from pkg import x``: the module pkg.x if there is one, else a name defined in pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target and target not in known:  # ``import a.b.c`` of a name inside a module
                target = target.rpartition(".")[0]
            parts = target.split(".")
            for i in range(2, len(parts) + 1):  # the packages on the way run their __init__ first
                prefix = ".".join(parts[:i])
                if i == len(parts) or not name.startswith(prefix + "."):
                    found.add(prefix)
    found.discard(name)
    found.discard("mobizo")
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items() if name != "mobizo"}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``g`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(g):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_of(name: str) -> int:
    rest = name.removeprefix("mobizo.")
    for i, (_, members) in enumerate(LAYERS):
        if any(rest == m or rest.startswith(m + ".") for m in members):
            return i
    raise AssertionError(f"{name} is in no layer of tests/test_imports.py: add it to LAYERS")


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle in src/mobizo: " + " -> ".join(cycle)


def test_no_module_imports_a_higher_layer():
    up = [
        f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
        for a, targets in sorted(graph().items())
        for b in sorted(targets)
        if layer_of(b) > layer_of(a)
    ]
    assert not up, "imports that reach up a layer:\n" + "\n".join(up)


def test_the_graph_sees_deferred_and_relative_imports():
    """The reader itself: an import inside a function, ``from . import x``, ``from ..x import y`` and the
    packages a dotted import passes through all count; the top package does not."""
    g = graph()
    assert "mobizo.tasks.base" in g["mobizo.data"]  # from .tasks.base import Example (module level)
    assert "mobizo.tasks" in g["mobizo.data"]  # ... which runs tasks/__init__ first
    assert "mobizo.engines.eager" in g["mobizo.build"]  # inside build_engine
    assert "mobizo.step" in g["mobizo.engines.eager"]  # from ..step import ...
    assert "mobizo.engines" in g["mobizo.engines.eager"]  # from . import Shapes (engines/__init__)
    assert "mobizo.engines.executorch" not in g["mobizo.engines.executorch.export"]  # its own package
    assert "mobizo" not in g["mobizo.rundir"]  # from . import __version__
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_between_test_files(tmp_path):
    """The tests' own files: conftest.py holds fixtures, which a test asks for by name, and code shared as
    code lives in plain helper modules (tests/_*.py). No file imports conftest or a test module: that ties
    it to how pytest puts tests/ on sys.path, and imports a module pytest also collects."""

    def local_imports(files):
        stems = {p.stem for p in files if p.stem == "conftest" or p.stem.startswith("test_")}
        found = []
        for path in files:
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module]
                found += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in stems]
        return found

    bad = local_imports(sorted(Path(__file__).resolve().parent.glob("*.py")))
    assert not bad, "test files that import conftest or another test module:\n" + "\n".join(bad)
    # the check itself: module-level and deferred imports of both kinds are seen, helper modules are not
    (tmp_path / "conftest.py").write_text("")
    (tmp_path / "test_a.py").write_text("from conftest import run_cli\nimport _helper\n")
    (tmp_path / "test_b.py").write_text("def test_x():\n    from test_a import y\n")
    (tmp_path / "_helper.py").write_text("import json\n")
    found = local_imports(sorted(tmp_path.glob("*.py")))
    assert found == ["test_a.py:1 imports conftest", "test_b.py:2 imports test_a"]
