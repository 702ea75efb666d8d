"""Patches of ExecuTorch's lowering (and of the PyTorch internals it runs on) that the export applies
around ``to_edge_transform_and_lower`` and ``to_executorch``. Each leaves the program byte-identical
(``tests/test_patches.py`` exports the tiny model with all patches off, then with each one on its
own, and compares the sha256 of the ``.pte``)."""

from __future__ import annotations

import collections
import contextlib
import copy
import operator
import os
import re
from pathlib import Path

import torch

from .core import EXECUTORCH, TORCH, patch

_BOTH = {**EXECUTORCH, **TORCH}  # an ExecuTorch internal, checked against the PyTorch it runs on
_TORCH_FIRST = {**TORCH, **EXECUTORCH}  # a PyTorch internal, checked on the programs ExecuTorch lowers

SPILL_BYTES = 1 << 16  # named data blobs at least this large wait on disk, not in memory


@patch(
    targets=["executorch.exir._serialize._named_data_store.NamedDataStore.add_named_data"],
    uses=["executorch.exir._serialize._cord.FileBackedData"],
    verified=_BOTH,
    why="""While lowering, every large blob a backend hands ExecuTorch's NamedDataStore (XNNPACK: each
    frozen weight, as a bytes copy) is written to a spill directory and kept as a FileBackedData that
    the serializer streams into the .pte. Without this the export holds a bytes copy of the weights
    per method (train_step and score) until serialization, then the .pte's bytes on top: over 5x the
    weights. Blobs are files named by their key (XNNPACK: the sha256 of the bytes), so a weight both
    methods read is written once.""",
)
@contextlib.contextmanager
def spilled_named_data(directory: Path):
    from executorch.exir._serialize._cord import FileBackedData
    from executorch.exir._serialize._named_data_store import NamedDataStore

    original = NamedDataStore.add_named_data
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, FileBackedData] = {}

    def add_named_data(self, key, data, *args, **kwargs):
        if isinstance(data, bytes) and len(data) >= SPILL_BYTES and re.fullmatch(r"[0-9A-Za-z_.-]{1,128}", key):
            if key not in files:
                path = directory / key
                if not path.is_file():  # (a parallel preprocessing worker may have written it)
                    tmp = directory / f".{key}.{os.getpid()}"
                    tmp.write_bytes(data)
                    os.replace(tmp, path)
                files[key] = FileBackedData(str(path))
            data = files[key]
        return original(self, key, data, *args, **kwargs)

    NamedDataStore.add_named_data = add_named_data
    try:
        yield
    finally:
        NamedDataStore.add_named_data = original


# XNNPACK's preprocessing runs ~17 graph passes over every partition, each a full re-trace; most
# rewrite ops a partition of a decoder-only transformer step may not contain. Such a pass is skipped
# for a partition holding none of its ops (matched on the op names).
_THEIR_OPS = ("convolution", "batch_norm", "upsample", "prelu", "scaled_dot_product", "pad", "pool", "conv")
_PASS_OPS = {
    # convolution, batch norm, upsampling, PReLU, padding, SDPA (the step is traced with plain
    # attention): never in a decoder step, so one list serves them all
    **dict.fromkeys(
        (
            "ConvertToUpsampleBilinear2d",
            "ConvertToSDPAPass",
            "FuseBatchNormPass",
            "DecomposeBatchNorm",
            "InsertPadQDQPass",
            "Conv1dUnsqueezePass",
            "PReLUReshapePass",
            "ChannelsLastTaggedReshapePass",
        ),
        _THEIR_OPS,
    ),
    "DecomposeConcatenate": ("aten.cat",),  # splits concatenations of more than 5 tensors
    "RemoveGetItemPass": ("max_pool2d_with_indices", "aten.max.dim"),  # their index outputs
    "FuseActivationPass": ("aten.relu", "aten.hardtanh"),  # folds these into the op before them
    "PropagateCustomMetaPass": ("quantize",),  # copies metadata onto quantize/dequantize nodes
    "RemoveRedundantCopyPass": ("_to_copy",),  # drops pairs of layout copies
}


@patch(
    targets=["executorch.backends.xnnpack._passes.XNNPACKPassManager.__init__"],
    verified=_BOTH,
    why="""XNNPACK's preprocessing runs 17 graph passes over every partition, each a full re-trace on
    fake tensors; thirteen of them only rewrite ops that a partition of a decoder-only transformer
    step rarely or never holds (convolution, batch norm, upsampling, PReLU, padding, SDPA,
    concatenations of more than five tensors, max-pool indices, ReLU fusion, quantize metadata,
    layout copies). The pass manager keeps, for each partition, the other four and those of the
    thirteen whose ops (matched by name) the partition holds: a pass over a graph without its ops
    rewrites nothing.""",
)
@contextlib.contextmanager
def lean_xnnpack_passes():
    from executorch.backends.xnnpack._passes import XNNPACKPassManager

    original = XNNPACKPassManager.__init__

    def __init__(self, exported_program, passes=None):
        original(self, exported_program, passes)
        if passes:
            return
        ops = {str(n.target) for n in exported_program.graph.nodes if n.op == "call_function"}

        def needed(p) -> bool:
            words = _PASS_OPS.get(p.__name__)
            return words is None or any(word in op for op in ops for word in words)

        self.passes = [p for p in self.passes if needed(p)]

    XNNPACKPassManager.__init__ = __init__
    try:
        yield
    finally:
        XNNPACKPassManager.__init__ = original


def _graphs(gm):
    return [m.graph for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]


def _no_transpose(gm) -> bool:
    return not any(n.target == torch.ops.aten.t.default for g in _graphs(gm) for n in g.nodes)


def _no_views(gm) -> bool:
    return not any(getattr(n.target, "is_view", False) for g in _graphs(gm) for n in g.nodes if n.op == "call_function")


def _no_symbols(gm) -> bool:
    from torch.utils import _pytree as pytree

    sym = (torch.SymInt, torch.SymFloat, torch.SymBool)
    return not any(
        isinstance(v, sym) for g in _graphs(gm) for n in g.nodes for v in pytree.tree_leaves(n.meta.get("val"))
    )


# Passes of ExecuTorch's ATen -> edge conversion that re-trace the whole method on fake tensors to
# rewrite ops a method may not hold; each is skipped for a method without them. (Each is a local
# rewrite of those ops only: ``t`` to ``t_copy``; view ops to their copies; symbolic ints, floats and
# bools passed as tensors to ``scalar_tensor``. A fixed-length step has no symbolic values at all.)
_IDLE_EDGE_PASSES = {
    "NormalizeTransposePass": _no_transpose,
    "ReplaceBrokenOpsWithFunctionalOpsPass": _no_views,
    "SymToTensorPass": _no_symbols,
}


@patch(
    targets=["executorch.exir.program._program._get_aten_to_edge_passes"],
    verified=_BOTH,
    why="""Three of the ten passes ExecuTorch's ATen -> edge conversion runs before the ops become
    edge ops (NormalizeTransposePass, ReplaceBrokenOpsWithFunctionalOpsPass, SymToTensorPass) each
    re-trace the whole method to rewrite ops it may not hold (t, view ops, symbolic values). Each is
    skipped for a method that holds none of them: all three for a fixed-length step, all but the
    symbolic one for an any-length step (~10 s of a SmolLM2 export).""",
)
@contextlib.contextmanager
def lean_edge_passes():
    import executorch.exir.program._program as prog
    from torch.fx.passes.infra.pass_base import PassResult

    original = prog._get_aten_to_edge_passes

    def unless_idle(p, idle):
        def run(gm):
            return PassResult(gm, False) if idle(gm) else p(gm)

        run.__name__ = getattr(p, "__name__", type(p).__name__)
        return run

    def get_passes(config):
        pre, post = original(config)
        pre = [
            unless_idle(p, _IDLE_EDGE_PASSES[p.__name__]) if getattr(p, "__name__", None) in _IDLE_EDGE_PASSES else p
            for p in pre
        ]
        return pre, post

    prog._get_aten_to_edge_passes = get_passes
    try:
        yield
    finally:
        prog._get_aten_to_edge_passes = original


@patch(
    targets=[
        "executorch.exir.lowered_backend_module.legalize_graph",
        "executorch.exir.backend.backend_api._create_partitions_in_graph_module",
    ],
    uses=[
        "torch.fx.passes.tools_common.legalize_graph",
        "torch.fx.graph._Namespace",
        "torch.fx.graph._FindNodesLookupTable",
    ],
    verified=_BOTH,
    why="""ExecuTorch cuts each partition out of a method's graph with create_submodule_from_nodes,
    whose legalize_graph re-sorts the graph by copying every node into a new one and assigning it;
    assigning a GraphModule's graph regenerates the Python code of the module and of every submodule
    (each partition cut so far). Both are quadratic in the partitions (SmolLM2's 30 layers: most of a
    10-minute lowering, then 26 s of node copies). While cutting, the graph is sorted in place into
    the state the copy would have left (_legalize_in_place, compared with torch's on a scrambled
    graph by a unit test), and the code is regenerated once, after the method's last cut. Nothing
    runs a method's graph module between the cuts.""",
)
@contextlib.contextmanager
def quick_partitioning():
    import executorch.exir.backend.backend_api as api
    import executorch.exir.lowered_backend_module as lbm

    legalize, cut = lbm.legalize_graph, api._create_partitions_in_graph_module
    stale: dict[int, object] | None = None  # the graph modules sorted without new code, while cutting

    def legalize_graph(gm):
        if stale is None:  # outside a method's partition cutting: torch's own behaviour
            return legalize(gm)
        stale[id(gm)] = gm
        return _legalize_in_place(gm)

    def create_partitions(*args, **kwargs):
        nonlocal stale
        stale = {}
        try:
            return cut(*args, **kwargs)
        finally:
            for gm in stale.values():
                gm.recompile()
            stale = None

    lbm.legalize_graph, api._create_partitions_in_graph_module = legalize_graph, create_partitions
    try:
        yield
    finally:
        lbm.legalize_graph, api._create_partitions_in_graph_module = legalize, cut


# torch.fx.passes.tools_common.legalize_graph's own list (a local there): nodes it sorts first
_PRIORITIZED_OPS = (
    operator.add,
    operator.mul,
    operator.sub,
    operator.floordiv,
    operator.truediv,
    operator.mod,
    operator.le,
    operator.lt,
    operator.ge,
    operator.gt,
    operator.eq,
    operator.ne,
    torch.ops.aten.sym_constrain_range.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
    torch.ops.aten._assert_async.msg,
    torch.ops.aten.scalar_tensor.default,
    torch.ops.aten._assert_scalar.default,
)


def _legalize_in_place(gm):
    """``torch.fx.passes.tools_common.legalize_graph`` without building a new graph: the same
    topological order (Kahn's, from the same starting order and user order), then the graph is put
    into the state ``Graph.node_copy`` in that order would leave it in: nodes in that order, each
    node's users and inputs in creation order, a fresh name space and node index holding the same
    names, the attributes of a new ``Graph``. The graph object, and its nodes, stay."""
    from torch.fx.graph import _FindNodesLookupTable, _Namespace
    from torch.fx.node import map_arg

    graph = gm.graph
    nodes = list(graph.nodes)
    indeg = dict.fromkeys(nodes, 0)
    for node in nodes:
        for user in node.users:
            indeg[user] += 1
    queue = collections.deque(n for n in nodes if indeg[n] == 0)
    order = []
    while queue:
        cur = queue.popleft()
        order.append(cur)
        for user in cur.users:
            indeg[user] -= 1
            if indeg[user] == 0:
                if user.op == "call_function" and user.target in _PRIORITIZED_OPS:
                    queue.appendleft(user)
                else:
                    queue.append(user)
    if len(order) < len(nodes):
        raise RuntimeError(f"Input graph has cycles, unable to add {[n for n in indeg if indeg[n] != 0]}")
    names, table = _Namespace(), _FindNodesLookupTable()
    for node in order:
        if names.create_name(node.name, None) != node.name:  # (cannot happen: names in a graph are unique)
            raise RuntimeError(f"node {node.name} would be renamed by a sort")
        names.associate_name_with_obj(node.name, node)
        table.insert(node)
        node.users.clear()
    root = graph._root
    for node in order:
        root.prepend(node)  # (moves it to the end)
        inputs: dict = {}
        map_arg(node.args, inputs.setdefault)
        map_arg(node.kwargs, inputs.setdefault)
        node._input_nodes.clear()
        node._input_nodes.update(inputs)
        for i in inputs:
            i.users[node] = None
    graph._graph_namespace, graph._find_nodes_lookup_table = names, table
    graph._tracer_cls, graph._tracer_extras, graph._co_fields = None, None, {}
    return gm


@patch(
    targets=[
        "executorch.exir.backend.canonical_partitioners.group_partitioner.GroupBasedPartitioner._can_merge_partitions"
    ],
    uses=["torch.fx.passes.utils.fuser_utils.validate_partition"],
    verified=_BOTH,
    why="""XNNPACK's partitioner tries to merge every pair of partitions; its cycle check walks each
    outside user's whole downstream set (any(n in combined for n in downstream)) looking for a node
    of the pair. isdisjoint walks the smaller of the two sets instead: the same answer, a fraction of
    the time on a 30-layer step.""",
)
@contextlib.contextmanager
def quick_merge_check():
    from executorch.exir.backend.canonical_partitioners.group_partitioner import GroupBasedPartitioner
    from torch.fx.passes.utils.fuser_utils import validate_partition

    original = GroupBasedPartitioner._can_merge_partitions

    def _can_merge_partitions(self, p1, p2, partitions_by_id):
        combined = partitions_by_id[p1].nodes.keys() | partitions_by_id[p2].nodes.keys()
        for node in combined:
            for user in node.users:
                if user not in combined and not self.dependency_viewer.downstreams_of(user).isdisjoint(combined):
                    return False
        return validate_partition(list(combined))

    GroupBasedPartitioner._can_merge_partitions = _can_merge_partitions
    try:
        yield
    finally:
        GroupBasedPartitioner._can_merge_partitions = original


@patch(
    targets=[
        "executorch.exir.program._program._can_skip_using_EDGE_DO_NOT_DECOMP",
        "executorch.exir.program._program._gen_edge_manager_for_partitioners",
        "executorch.exir.program._program.contains_any_call_fn_target_op",
        "torch.export.ExportedProgram.run_decompositions",
    ],
    verified=_BOTH,
    why="""Two fewer re-traces of each method while ExecuTorch decomposes it to core ATen ops. (1)
    Before partitioning, ExecuTorch keeps the ops a partitioner may take whole (XNNPACK: linear among
    others) from being decomposed. With a per-node filter (XNNPACK has one) that costs two more
    re-traces (decompose around the ops, mark the nodes the filter accepts, decompose again); without
    one, the ops are kept as they are, in at most one re-trace. When the filter accepts every node of
    those ops the two ways keep the same nodes, so the filter is dropped for that method; otherwise
    ExecuTorch's own way runs. (The filter is asked about the nodes before decomposing: a node of
    those ops that some other op's decomposition created would be kept unasked. A decoder step's
    decompositions create none.) (2) ExecuTorch first functionalizes each method
    (run_decompositions({}), a re-trace of its own) and then decomposes it, which functionalizes
    again on the way. The first is put off until the decomposition, which then does both in one
    re-trace; every path through ExecuTorch's generation decomposes (the check that could skip it
    answers "yes" for a method still waiting). The filter and the partitioner's op list are read
    before the functionalization: a decoder step's linears read parameters and activations, which it
    does not change. Checked byte-identical beyond the tests on a 6-layer SmolLM2, any-length and
    fixed, by hand; the eleven architectures' and the quantized programs still step as eager does
    (tested).""",
)
@contextlib.contextmanager
def fewer_decompositions():
    import executorch.exir.program._program as prog
    from torch.export import ExportedProgram

    can_skip_original, generate, contains = (
        prog._can_skip_using_EDGE_DO_NOT_DECOMP,
        prog._gen_edge_manager_for_partitioners,
        prog.contains_any_call_fn_target_op,
    )
    decompose = ExportedProgram.run_decompositions
    waiting: dict[int, object] | None = None  # graph modules of methods not yet functionalized, while generating

    def can_skip(partitioner, program) -> bool:
        ops, check = partitioner.ops_to_not_decompose(program)
        if check is None:
            return True
        ops = set(ops)
        return all(check(n) for n in program.graph.nodes if n.op == "call_function" and n.target in ops)

    def run_decompositions(self, decomp_table=None, *args, **kwargs):
        if waiting is not None and type(decomp_table) is dict and not decomp_table and not args and not kwargs:
            waiting[id(self.graph_module)] = self.graph_module
            return self
        return decompose(self, decomp_table, *args, **kwargs)

    def contains_any_call_fn_target_op(gm, ops) -> bool:
        return (waiting is not None and id(gm) in waiting) or contains(gm, ops)

    def gen_edge_manager(*args, **kwargs):
        nonlocal waiting
        waiting = {}
        try:
            return generate(*args, **kwargs)
        finally:
            waiting = None

    prog._can_skip_using_EDGE_DO_NOT_DECOMP, prog._gen_edge_manager_for_partitioners = can_skip, gen_edge_manager
    prog.contains_any_call_fn_target_op, ExportedProgram.run_decompositions = (
        contains_any_call_fn_target_op,
        run_decompositions,
    )
    try:
        yield
    finally:
        prog._can_skip_using_EDGE_DO_NOT_DECOMP, prog._gen_edge_manager_for_partitioners = can_skip_original, generate
        prog.contains_any_call_fn_target_op, ExportedProgram.run_decompositions = contains, decompose


@patch(
    targets=["torch._higher_order_ops.executorch_call_delegate.call_delegate_cpu"],
    verified=_TORCH_FIRST,
    why="""to_executorch re-propagates shapes through every method, and each XNNPACK delegate call on
    fake tensors is answered by rebuilding the partition's program as a module
    (ExportedProgram.module(): unlifting and code generation) and running it (13 s of a SmolLM2
    export). The partition's outputs are already recorded in its program's output node, so fake
    outputs of those shapes, strides and dtypes are made instead; anything else (a real call, an
    output that is not a plain tensor, a program that also mutates a buffer) runs the original
    way.""",
)
@contextlib.contextmanager
def quick_delegate_shapes():
    import importlib

    # (the package's attribute of that name is the operator, not the module)
    hop = importlib.import_module("torch._higher_order_ops.executorch_call_delegate")
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.export.graph_signature import OutputKind
    from torch.utils import _pytree as pytree

    original = hop.call_delegate_cpu

    def outputs_of(lowered_module):
        ep = lowered_module.original_module
        if ep.call_spec.out_spec is None or any(
            s.kind != OutputKind.USER_OUTPUT for s in ep.graph_signature.output_specs
        ):
            return None
        vals = [n.meta.get("val") if isinstance(n, torch.fx.Node) else None for n in ep.graph.output_node().args[0]]
        if not all(type(v) is FakeTensor for v in vals):
            return None
        return vals, ep.call_spec.out_spec

    def call_delegate_cpu(lowered_module, *args):
        fakes = [a for a in pytree.tree_leaves(args) if isinstance(a, FakeTensor)]
        found = outputs_of(lowered_module) if fakes else None
        if found is None:
            return original(lowered_module, *args)
        vals, spec = found
        with fakes[0].fake_mode:
            outs = [torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device) for v in vals]
        return pytree.tree_unflatten(outs, spec)

    hop.call_delegate_cpu = call_delegate_cpu
    try:
        yield
    finally:
        hop.call_delegate_cpu = original


class _ShallowProvenance:
    """Stands in for the ``copy`` module inside ``torch.fx.traceback``: its one ``deepcopy`` is of
    a node's ``from_node`` list, which a new ``NodeSource`` takes as its own history."""

    copy = staticmethod(copy.copy)

    @staticmethod
    def deepcopy(x):
        return list(x) if type(x) is list else copy.deepcopy(x)


@patch(
    targets=["torch.fx.traceback.copy"],
    uses=["torch.fx.traceback.NodeSource"],
    verified=_TORCH_FIRST,
    why="""Every node a pass creates records its provenance (NodeSource), and torch deep-copies the
    source node's whole history into it: a chain one link longer per pass, copied for every node of
    every re-trace (15% of a fixed-length export's time, 9% of an any-length one's). The history's
    entries are never changed after they are made (new links only replace a node's list), so a new
    list over the same entries records the same provenance; ExecuTorch's debug handles, read from
    it, come out the same.""",
)
@contextlib.contextmanager
def lean_provenance():
    import torch.fx.traceback as tb

    original = tb.copy
    tb.copy = _ShallowProvenance
    try:
        yield
    finally:
        tb.copy = original


_JOBS = None  # (backend class, programs, compile specs) for the forked preprocessing workers


def _worker_init() -> None:
    torch.set_num_threads(1)  # OpenMP's pool does not survive fork(): one thread never enters it


def _preprocess_job(job):
    cls, programs, specs = _JOBS
    name, i = job
    return cls.preprocess(programs[name][i], specs[name][i])


@patch(
    targets=["executorch.backends.xnnpack.xnnpack_preprocess.XnnpackBackend.preprocess_multimethod"],
    verified=_BOTH,
    why="""XNNPACK preprocesses every partition of every method on its own (re-tracing passes and
    serialization of the partition's graph): most of the export's time, and single-threaded Python.
    With workers > 1 the partitions are shared out to forked worker processes (they inherit the
    partitioned programs; a result is the partition's small flatbuffer plus its weights, or with
    spilled_named_data their spill-file names). XnnpackBackend's preprocess_multimethod is
    BackendDetails' default, a loop over preprocess; the results come back in the loop's order.""",
)
@contextlib.contextmanager
def parallel_preprocess(workers: int):
    if workers < 2 or not hasattr(os, "fork"):
        yield
        return
    import multiprocessing

    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    own = "preprocess_multimethod" in XnnpackBackend.__dict__
    original = XnnpackBackend.__dict__.get("preprocess_multimethod")

    def preprocess_multimethod(cls, edge_programs, compile_specs):
        global _JOBS
        jobs = [(name, i) for name, progs in edge_programs.items() for i in range(len(progs))]
        if len(jobs) < 2:
            return {
                name: [cls.preprocess(p, s) for p, s in zip(progs, compile_specs[name])]
                for name, progs in edge_programs.items()
            }
        _JOBS = (cls, edge_programs, compile_specs)
        try:
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(min(workers, len(jobs)), initializer=_worker_init) as pool:
                results = pool.map(_preprocess_job, jobs, chunksize=1)
        finally:
            _JOBS = None
        out = {name: [] for name in edge_programs}
        for (name, _), r in zip(jobs, results):
            out[name].append(r)
        return out

    XnnpackBackend.preprocess_multimethod = classmethod(preprocess_multimethod)
    try:
        yield
    finally:
        if own:
            XnnpackBackend.preprocess_multimethod = original
        else:
            del XnnpackBackend.preprocess_multimethod
