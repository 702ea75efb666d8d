"""mobizo's patches of third-party internals (mobizo.patches): each applies only on the versions it was
verified on, falls back to the plain upstream path with one notice line otherwise, and changes nothing
in what it produces: the tiny model's program is byte-identical with all patches off, with each one on
its own, and with all on (two lowering workers)."""

import contextlib
import dataclasses
import io
import json
import multiprocessing.pool
import os
import re
from pathlib import Path

import pytest
import torch

from mobizo import patches
from mobizo.errors import MobizoError
from mobizo.patches import core

slow = pytest.mark.slow
ET, PT = core.EXECUTORCH["executorch"], core.TORCH["torch"]  # the versions the patches were verified on

RUN = dict(
    model="tiny",
    task="synthetic",
    queries=2,
    batch_size=4,
    max_length=32,
    eval_examples=24,
    eval_batch_size=8,
    seed=3,
    progress=False,
)
EXPORT_PATCHES = [
    "spilled_named_data",
    "lean_xnnpack_passes",
    "parallel_preprocess",
    "quick_partitioning",
    "quick_merge_check",
    "lean_provenance",
    "fewer_decompositions",
    "quick_delegate_shapes",
    "lean_edge_passes",
]


def _upgraded(dist, to="1.6.0"):
    """A stand-in for core.installed: ``dist`` at version ``to``, the rest as installed."""
    real = core.installed
    return lambda d: to if d == dist else real(d)


@pytest.fixture(autouse=True)
def _fresh_notices(monkeypatch):
    monkeypatch.setattr(core, "_noticed", set())  # each test sees its notices from the start
    monkeypatch.delenv(patches.ENV, raising=False)


def _targets(p):
    return {t: core.resolve(t) for t in p.targets if core._DOTTED.fullmatch(t)}


def _args(name, tmp_path):
    return {"spilled_named_data": (tmp_path / "spill",), "parallel_preprocess": (2,)}.get(name, ())


CONTEXT_PATCHES = [n for n in patches.ALL if n != "share_packed_weights"]


def test_every_patch_is_declared_in_full():
    assert set(EXPORT_PATCHES) | {"share_packed_weights", "gguf_metadata_once"} == set(patches.ALL)
    from mobizo.engines.executorch.export import EXPORT_PATCHES as used

    assert list(used) == EXPORT_PATCHES
    # a pinned dependency's verified version is its pin: bumping a pin fails here until the patches
    # are verified on the new version (docs/upstream.md says how)
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    pins = dict(re.findall(r'^\s*"([A-Za-z0-9_.-]+)==([^"]+)"', pyproject, re.MULTILINE))  # (no tomllib in 3.10)
    assert pins.keys() >= {"torch", "executorch"}
    for p in patches.ALL.values():
        assert p.targets and p.verified and len(p.why) > 100, p.name
        assert all(v == pins[d] for d, v in p.verified.items() if d in pins), (p.name, p.verified, pins)
        if all(core.installed(d) == v for d, v in p.verified.items()):
            assert p.blocked() is None, p.name  # its targets are all there


@pytest.mark.parametrize("name", CONTEXT_PATCHES)
def test_a_patch_replaces_its_targets_only_while_applied(name, tmp_path, monkeypatch):
    p = patches.ALL[name]
    monkeypatch.setattr(core, "installed", p.verified.get)  # (transformers is not pinned: another 5.x here)
    before = _targets(p)
    with p(*_args(name, tmp_path)):
        inside = _targets(p)
        assert all(inside[t] != before[t] for t in before), [t for t in before if inside[t] == before[t]]
    assert _targets(p) == before


@pytest.mark.parametrize("name", CONTEXT_PATCHES)
def test_on_another_version_a_patch_gives_one_notice_and_the_upstream_path(name, tmp_path, monkeypatch, capsys):
    p = patches.ALL[name]
    dist = next(iter(p.verified))
    monkeypatch.setattr(core, "installed", _upgraded(dist))
    before = _targets(p)
    for _ in range(3):
        with p(*_args(name, tmp_path)):
            assert _targets(p) == before
    assert _targets(p) == before
    owner = {"executorch": "ExecuTorch's", "torch": "PyTorch's", "transformers": "transformers'"}[dist]
    verified = ", ".join(f"{d} {v}" for d, v in p.verified.items())
    assert capsys.readouterr().err == (
        f"mobizo: notice: {name} not applied (verified on {verified}; found {dist} 1.6.0): using {owner} own path\n"
    )


def test_the_notice_says_when_a_version_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(core, "installed", _upgraded("torch", to=None))
    with patches.quick_merge_check():
        pass
    assert capsys.readouterr().err == (
        f"mobizo: notice: quick_merge_check not applied (verified on executorch {ET}, torch {PT}; "
        "found torch not installed): using ExecuTorch's own path\n"
    )


def test_a_local_version_label_is_the_same_version(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version
    for torch_version, applies in ((f"{PT}+cu128", True), (f"{PT}.1", False)):
        monkeypatch.setattr(importlib.metadata, "version", lambda d, v=torch_version: v if d == "torch" else real(d))
        core._version.cache_clear()
        try:
            assert (patches.lean_provenance.blocked() is None) == applies
        finally:
            core._version.cache_clear()


def test_a_missing_target_falls_back_with_a_notice(monkeypatch, capsys):
    import executorch.exir.program._program as prog

    original = prog._get_aten_to_edge_passes
    monkeypatch.delattr(prog, "_get_aten_to_edge_passes")
    with patches.lean_edge_passes():
        assert not hasattr(prog, "_get_aten_to_edge_passes")
    assert capsys.readouterr().err == (
        "mobizo: notice: lean_edge_passes not applied (executorch.exir.program._program._get_aten_to_edge_passes "
        f"not found; verified on executorch {ET}, torch {PT}): using ExecuTorch's own path\n"
    )
    monkeypatch.setattr(prog, "_get_aten_to_edge_passes", original, raising=False)  # (back, for the next case)
    import executorch.exir.lowered_backend_module as lbm

    monkeypatch.delattr("torch.fx.graph._Namespace")  # a private class it reads (uses) is gone
    legalize = lbm.legalize_graph
    with patches.quick_partitioning():
        assert lbm.legalize_graph is legalize
    assert capsys.readouterr().err == (
        "mobizo: notice: quick_partitioning not applied (torch.fx.graph._Namespace not found; verified on "
        f"executorch {ET}, torch {PT}): using ExecuTorch's own path\n"
    )


def test_a_lookup_that_fails_while_applying_falls_back(monkeypatch, capsys):
    """A target only the patch itself can look up (a C++ symbol) is gone: the plain path, one notice."""
    calls = []

    @contextlib.contextmanager
    def gone():
        calls.append("entered")
        raise AttributeError("undefined symbol: set_option")
        yield

    p = core.Patch("probe", ("libx.so: set_option",), (), {"torch": PT}, "why", gone, core._no_patch)
    for _ in range(2):
        with p() as v:
            assert v is None
    assert calls == ["entered", "entered"]
    assert capsys.readouterr().err == (
        "mobizo: notice: probe not applied (AttributeError: undefined symbol: set_option): using PyTorch's own path\n"
    )
    from mobizo.patches import weights_cache

    monkeypatch.setattr(weights_cache, "_SHARED", False)
    monkeypatch.setattr(weights_cache, "_SYMBOL", "_mobizo_no_such_symbol_{}")
    assert patches.share_packed_weights() is False
    err = capsys.readouterr().err
    assert err.startswith("mobizo: notice: share_packed_weights not applied (AttributeError: ") and err.endswith(
        "_mobizo_no_such_symbol_set): using ExecuTorch's own path\n"
    )


def test_the_weights_cache_call_is_gated(monkeypatch, capsys):
    import ctypes

    assert patches.share_packed_weights() is True  # verified here: the backend reports the cache on
    monkeypatch.setattr(core, "installed", _upgraded("executorch"))

    def no_ctypes(*args, **kwargs):
        raise AssertionError("the gated call loaded a library")

    monkeypatch.setattr(ctypes, "CDLL", no_ctypes)
    assert patches.share_packed_weights() is False
    assert patches.share_packed_weights() is False
    assert capsys.readouterr().err == (
        f"mobizo: notice: share_packed_weights not applied (verified on executorch {ET}; found executorch 1.6.0): "
        "using ExecuTorch's own path\n"
    )


def test_the_environment_switch(monkeypatch, tmp_path, capsys):
    everything = {n: _targets(p) for n, p in patches.ALL.items()}
    monkeypatch.setenv("MOBIZO_NO_PATCHES", "1")
    with contextlib.ExitStack() as stack:
        for n in CONTEXT_PATCHES:
            stack.enter_context(patches.ALL[n](*_args(n, tmp_path)))
        assert {n: _targets(p) for n, p in patches.ALL.items()} == everything
    assert patches.share_packed_weights() is False
    assert capsys.readouterr().err == ""  # asked for: no notices
    monkeypatch.setenv("MOBIZO_NO_PATCHES", " lean_edge_passes , quick_merge_check")
    assert patches.disabled() == {"lean_edge_passes", "quick_merge_check"}
    assert patches.lean_edge_passes.blocked() == "" and patches.lean_provenance.blocked() is None
    with patches.lean_edge_passes(), patches.lean_provenance():
        assert _targets(patches.lean_edge_passes) == everything["lean_edge_passes"]
        assert _targets(patches.lean_provenance) != everything["lean_provenance"]
    for off in ("0", ""):
        monkeypatch.setenv("MOBIZO_NO_PATCHES", off)
        assert patches.disabled() == frozenset()
    monkeypatch.setenv("MOBIZO_NO_PATCHES", "lean_edge_passes,quick_partitoning")
    with pytest.raises(MobizoError) as e:
        patches.disabled()
    assert (
        str(e.value)
        == f"MOBIZO_NO_PATCHES names unknown patches ['quick_partitoning'] (known: {', '.join(patches.ALL)})"
    )


def test_gguf_metadata_is_parsed_once_and_the_upstream_path_gives_the_same(tiny_pair, tmp_path, monkeypatch, capsys):
    import transformers.modeling_gguf_pytorch_utils as mod
    from _gguf import write_gguf

    from mobizo.convert import load_gguf_skeleton

    path = write_gguf(*tiny_pair, tmp_path / "tiny.gguf")
    parsed = []
    original = mod.load_gguf_checkpoint

    def counted(p, *args, **kwargs):
        parsed.append(p)
        return original(p, *args, **kwargs)

    monkeypatch.setattr(mod, "load_gguf_checkpoint", counted)

    def load():
        parsed.clear()
        model, tok = load_gguf_skeleton(path)
        return len(parsed), model.config.to_dict(), tok.get_vocab()

    n, config, vocab = load()
    verified = core.installed("transformers") == patches.gguf_metadata_once.verified["transformers"]
    assert n == (1 if verified else 2) and mod.load_gguf_checkpoint is counted  # (transformers is not pinned)
    monkeypatch.setattr(core, "installed", _upgraded("transformers"))
    assert load() == (2, config, vocab)
    assert capsys.readouterr().err.count("gguf_metadata_once not applied") == 1  # (once per process, either way)


def test_in_place_legalize_leaves_the_graph_as_torchs_copying_sort_does():
    """Partition cutting sorts a method's graph in place (``_legalize_in_place``) instead of torch's
    ``legalize_graph``, which copies every node into a new graph. What later cuts read must come out
    the same: the node order (sym-size arithmetic first, as torch prioritizes it), each node's users
    and inputs in order, the names a new node gets, the generated code."""
    import copy
    import operator

    from torch.fx.passes.tools_common import legalize_graph

    from mobizo.patches.lowering import _legalize_in_place

    def f(x, y):
        a = x + y
        b = a * 2
        n = x.size(0) * 3  # operator.mul on a traced size: one of the prioritized ops
        c = torch.relu(b) + n
        d = b - a
        return c * d, d.sum(0)

    traced = torch.fx.symbolic_trace(f)

    def scrambled():
        gm = copy.deepcopy(traced)
        nodes = {n.name: n for n in gm.graph.nodes}
        nodes["add"].prepend(nodes["sub"])  # (d = b - a) before a: the graph is no longer sorted
        nodes["x"].append(nodes["mul_1"])  # (n = size * 3) before the size
        nodes["output"].prepend(nodes["add"])  # a after all its users
        nodes["y"].append(nodes["relu"])
        nodes["x"].prepend(nodes["y"])  # a new order of two independent nodes (the index lists them by age)
        gm.graph.erase_node(
            gm.graph.call_function(operator.add, (nodes["x"], 2))
        )  # a name only the old name space holds
        return gm

    def state(gm):
        graph = gm.graph
        new = graph.call_function(operator.add, (next(iter(graph.nodes)), 1))  # a name the name space picks
        name = new.name
        graph.erase_node(new)
        gm.recompile()
        return (
            [(n.name, [u.name for u in n.users], [i.name for i in n.all_input_nodes]) for n in graph.nodes],
            name,
            {str(k): [n.name for n in v] for k, v in graph._find_nodes_lookup_table.table.items() if v},
            gm.code,
        )

    theirs, ours = scrambled(), scrambled()
    assert [n.name for n in theirs.graph.nodes] != [n.name for n in legalize_graph(scrambled()).graph.nodes]
    legalize_graph(theirs)
    _legalize_in_place(ours)
    assert state(ours) == state(theirs)
    ours.graph.lint()


# ------------------------------------------------------------------ the program, byte for byte


def _export(out, **flat):
    """Export the tiny run into ``out``; (sha256, bytes) of its train.pte. (``threads`` sets PyTorch's
    thread count in this process too: put back after.)"""
    from mobizo.build import export
    from mobizo.config import TrainConfig

    threads = torch.get_num_threads()
    try:
        m = export(TrainConfig.from_flat(**RUN, **flat), str(out))
    finally:
        torch.set_num_threads(threads)
    return m.pte_sha256, m.pte_bytes


def _plain(tmp_path_factory, **flat):
    """The plain upstream export, reached as an ExecuTorch upgrade reaches it: every export patch
    declines with its notice. (sha256, bytes), and what the export printed on stderr."""
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(io.StringIO()) as err:
        mp.setattr(core, "_noticed", set())
        mp.setattr(core, "installed", _upgraded("executorch"))
        mp.delenv(patches.ENV, raising=False)
        out = tmp_path_factory.mktemp("plain") / "p"
        program = _export(out, **flat)
    return program, err.getvalue(), out


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return _plain(tmp_path_factory)


@pytest.fixture(scope="module")
def plain_fixed(tmp_path_factory):
    return _plain(tmp_path_factory, fixed_length=True)


@slow
def test_an_upgrade_turns_every_export_patch_off_with_one_notice_each(plain):
    _, err, _ = plain
    notices = [line for line in err.splitlines() if line.startswith("mobizo: notice: ")]
    assert notices == [
        f"mobizo: notice: {n} not applied (verified on "
        + (
            f"torch {PT}, executorch {ET}; found executorch 1.6.0): using PyTorch's"
            if n in ("lean_provenance", "quick_delegate_shapes")
            else f"executorch {ET}, torch {PT}; found executorch 1.6.0): using ExecuTorch's"
        )
        + " own path"
        for n in EXPORT_PATCHES
    ]


@slow
@pytest.mark.parametrize("name", [n for n in EXPORT_PATCHES if n != "parallel_preprocess"])
def test_each_patch_on_its_own_gives_the_plain_program(name, plain, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(patches.ENV, ",".join(n for n in patches.ALL if n != name))
    p, applied = patches.ALL[name], []

    def fn(*args, **kwargs):
        applied.append(name)
        return p.fn(*args, **kwargs)

    monkeypatch.setattr(patches, name, dataclasses.replace(p, fn=fn))  # (what export.py calls)
    assert _export(tmp_path / "p") == plain[0]
    assert applied and "mobizo: notice" not in capsys.readouterr().err


def _spy_on_pools(monkeypatch):
    """Record, for every Pool.map, its start method, its worker processes' ids and its jobs."""
    runs = []
    original = multiprocessing.pool.Pool.map

    def spy(self, func, iterable, chunksize=None):
        jobs = list(iterable)
        out = original(self, func, jobs, chunksize)
        runs.append((self._ctx.get_start_method(), {p.pid for p in self._pool}, len(jobs)))
        return out

    monkeypatch.setattr(multiprocessing.pool.Pool, "map", spy)
    return runs


def _forked_twice(runs) -> bool:
    return bool(runs) and all(m == "fork" and len(pids) == 2 and os.getpid() not in pids for m, pids, _ in runs)


@slow
def test_parallel_preprocessing_on_its_own_forks_and_gives_the_plain_program(plain, tmp_path, monkeypatch):
    monkeypatch.setenv(patches.ENV, ",".join(n for n in patches.ALL if n != "parallel_preprocess"))
    runs = _spy_on_pools(monkeypatch)
    assert _export(tmp_path / "p", threads=2) == plain[0]
    assert _forked_twice(runs) and sum(jobs for *_, jobs in runs) > 2, runs


@slow
@pytest.mark.parametrize("fixed_length", [False, True])
def test_all_patches_with_two_workers_give_the_plain_program(fixed_length, request, tmp_path, monkeypatch):
    """The default export (every patch, the partitions lowered by two forked workers that spill the
    weights they serialize) against the plain one, for an any-length and a fixed-length program."""
    want, *_ = request.getfixturevalue("plain_fixed" if fixed_length else "plain")
    runs = _spy_on_pools(monkeypatch)
    assert _export(tmp_path / "p", threads=2, fixed_length=fixed_length) == want
    assert _forked_twice(runs), runs


@slow
def test_the_runtime_without_the_weights_cache_scores_the_same(plain, tiny_pair, monkeypatch, capsys):
    """With the cache call gated off (an ExecuTorch upgrade), an engine loads ``score`` on first use
    and scores as one with the cache does. (Once on, the cache stays on for the process: what this
    checks is the engine's path, not its memory; tests/test_runtime_memory.py measures that.)"""
    from mobizo.data import Encoder, collate_choices
    from mobizo.engines.executorch import ExecuTorchEngine
    from mobizo.tasks import get_task

    _, tok = tiny_pair
    rows = json.loads((plain[2] / "manifest.json").read_text())["eval_rows"]  # one copy of the step's batch
    exs, enc = get_task("synthetic").load("train")[:rows], Encoder(tok)
    groups = [[enc(e.prompt, c) for c in e.candidates] for e in exs]
    gold = [e.label for e in exs]
    batch = collate_choices(groups, gold, 2, tok.pad_token_id, 32, length=32, answer_len=1, examples=rows)
    cached = ExecuTorchEngine(plain[2])
    assert cached.shared_weights
    monkeypatch.setattr(core, "installed", _upgraded("executorch"))
    alone = ExecuTorchEngine(plain[2])
    assert not alone.shared_weights and "score" not in alone.methods
    (s1, c1), (s2, c2) = cached.score_choices(batch), alone.score_choices(batch)
    assert torch.equal(s1, s2) and torch.equal(c1, c2) and s1.shape == (rows, 2)
    notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mobizo: notice: ")]
    want = f"share_packed_weights not applied (verified on executorch {ET}; found executorch 1.6.0)"
    assert notices == [f"mobizo: notice: {want}: using ExecuTorch's own path"]  # (cpuinfo's probes write there too)
