"""Export the ZO step into ``train.pte``: the same :class:`mobizo.step.ZOStep` the eager engine calls.

Four methods share the adapter's mutable buffers:

* ``train_step(input_ids, attention_mask, labels, step, lr, eps[, gold]) -> (losses (2, q), grads (q,))``:
  in-graph noise from (seed, step), batched forward over the 2q copies, per-copy losses,
  projected gradients and the in-place update of every B;
* ``score(input_ids, attention_mask, labels) -> (ce sums, token counts)``: eval with the current B;

With ``manifest.shared_prompt`` (choice objective, every candidate one token) the rows of both
``train_step`` and ``score`` are examples holding only the prompt and ``labels`` is (rows, choices):
the candidates' token ids, all read at the prompt's last position (``score`` then returns
(rows, choices) CE and counts). Exact, and ``choices`` times fewer rows than one row per candidate.
* ``get_adapter() -> (A_0, B_0, A_1, B_1, ...)``: read the adapter out;
* ``set_adapter(B_0, B_1, ...)``: load an adapter (resume, or a fresh start).

Everything XNNPACK supports (the frozen linear layers, the per-copy bmm, attention's
matmuls/softmax, norms' elementwise math) is lowered to XNNPACK; integer noise hashing,
masking and the buffer updates run on portable kernels. The program is traced with the
model's plain ("eager") attention: the SDPA decomposition adds masked-row fix-ups
(eq/any/where per layer) that the portable kernels run slowly.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import gc
import io
import operator
import os
import re
import shutil
import sys
import tempfile
import traceback
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ...errors import MobizoError
from ...fsio import atomic_write_dir
from ...mplora import lora_layers
from ...progress import Stages
from ...step import ZOStep, plain_head, row_losses
from ...util import dumps, file_sha256
from .generate import KV_PREFIX, GenerateMethod
from .generate import example_inputs as gen_inputs
from .manifest import MANIFEST, PROGRAM, Manifest, versions


class ScoreMethod(nn.Module):
    """``score``: per-row losses over the vocabulary (evaluation). ``unpacked_head``: the LM head runs as
    :class:`UnpackedHead` (see there)."""

    def __init__(self, model, shared_prompt: bool = False, unpacked_head: bool = False):
        super().__init__()
        self.model = model  # same attribute name as ZOStep.model: buffer names match across methods
        self.shared_prompt = shared_prompt
        self.unpacked_head = unpacked_head

    def forward(self, input_ids, attention_mask, labels):
        found = plain_head(self.model) if self.unpacked_head else None
        if found is None:
            return row_losses(self.model, input_ids, attention_mask, labels, self.shared_prompt)
        parent, attr, head = found
        setattr(parent, attr, UnpackedHead(head))
        try:
            return row_losses(self.model, input_ids, attention_mask, labels, self.shared_prompt)
        finally:
            setattr(parent, attr, head)


class UnpackedHead(nn.Module):
    """The LM head as ``mm(W, hᵀ)ᵀ``, for a ``score`` whose head stays on portable kernels.

    A shared-prompt ``train_step`` reads the head only at the candidates' rows, so ``score`` would be
    the only method to pack the vocabulary-sized matrix for XNNPACK (one more copy of it, ~95 MiB on
    a 32k x 768 head, held from the first evaluation on). Left to portable kernels, ``linear`` would
    become a transpose of W into the memory plan (the same bytes again) plus ``mm``; W times the
    transposed hidden states reads W in place from the memory-mapped program, and only the
    (rows x hidden) and (vocab x rows) operands are transposed. Evaluation runs one position per
    prompt, so the unblocked portable ``mm`` costs little."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.head = head

    def forward(self, hidden):  # (rows, k, hidden) -> (rows, k, vocab)
        w = self.head.weight
        out = torch.mm(w, hidden.reshape(-1, hidden.shape[-1]).t()).t()
        if self.head.bias is not None:
            out = out + self.head.bias
        return out.reshape(*hidden.shape[:-1], w.shape[0])


class GetAdapter(nn.Module):
    def __init__(self, model, names):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self):
        out = []
        for n in self.names:
            layer = self.model.get_submodule(n)
            out += [layer.lora_A.clone(), layer.lora_B.clone()]
        return tuple(out)


class SetAdapter(nn.Module):
    def __init__(self, model, names):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *bs):
        total = torch.zeros(())
        for n, b in zip(self.names, bs):
            self.model.get_submodule(n).lora_B.copy_(b)
            total = total + b.sum()
        return total


class GetState(nn.Module):
    """``get_state() -> (state tensors...)``: a stateful update rule's buffers (``Manifest.state_names``)."""

    def __init__(self, model, names):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self):
        out = []
        for n in self.names:
            layer, _, attr = n.rpartition(".")
            out.append(getattr(self.model.get_submodule(layer), attr).clone())
        return tuple(out)


class SetState(nn.Module):
    """``set_state(state tensors...)``: load a rule's state (a fresh start or a resumed checkpoint)."""

    def __init__(self, model, names):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *tensors):
        total = torch.zeros(())
        for n, t in zip(self.names, tensors):
            layer, _, attr = n.rpartition(".")
            getattr(self.model.get_submodule(layer), attr).copy_(t)
            total = total + t.sum()
        return total


def xnnpack_partitioner(is_mutable, configs=None):
    """XNNPACK over its op ``configs`` (default: all), refusing every node that reads a parameter or buffer
    for which ``is_mutable(name)`` holds.

    XNNPACK serializes the parameters and buffers a delegated node reads as constants and
    packs them once at load time: a delegated read of B would keep returning B's value at
    export time (``score`` and ``get_adapter`` would ignore training). Those nodes stay on
    portable kernels, which read the live buffer.
    """
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    seen: list = [None, 0, frozenset()]  # (a signature, its input count, its inputs that hold a mutable state)

    def reads_mutable(node, ep) -> bool:
        sig = ep.graph_signature
        if seen[0] is not sig or seen[1] != len(sig.input_specs):  # (its mappings are rebuilt on every read)
            states = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
            seen[:] = [sig, len(sig.input_specs), frozenset(arg for arg, name in states.items() if is_mutable(name))]
        return any(arg.name in seen[2] for arg in node.all_input_nodes)

    live = []
    for cls in configs or ALL_PARTITIONER_CONFIGS:

        def check_constraints(self, node, ep, _base=cls):
            return not reads_mutable(node, ep) and _base.check_constraints(self, node, ep)

        live.append(type(f"Live{cls.__name__}", (cls,), {"check_constraints": check_constraints}))
    return XnnpackPartitioner(configs=live)


@contextlib.contextmanager
def plain_attention(model: nn.Module):
    """Trace with Hugging Face's "eager" (matmul + softmax) attention, then restore the model's own."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before is None or before == "eager" or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


# An operator as errors name it: ``aten::nonzero``, ``my_lib::op``, ``aten.nonzero.default``, ``torch.ops.aten.x``.
_OPERATOR = re.compile(
    r"\b(?:torch\.ops\.)?((?:aten|prims|quantized_decomposed|[a-z_][a-z0-9_]*)::[A-Za-z_]\w*"
    r"(?:\.\w+)?|(?:aten|prims|quantized_decomposed)\.[A-Za-z_]\w*(?:\.\w+)?)"
)


def failure_site(e: BaseException, model: nn.Module) -> str:
    """`` in <module> (<class>) at operator <op>`` for an export/lowering error, as far as it can be told.

    The module is the innermost module of ``model`` whose ``forward`` was running when the
    error was raised (non-strict export runs the model's Python code); the operator is the
    first one the error text names.
    """
    modules = {id(m): n for n, m in model.named_modules()}
    where = None
    err: BaseException | None = e
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        for frame, _ in traceback.walk_tb(err.__traceback__):
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and id(owner) in modules and modules[id(owner)]:
                where = (modules[id(owner)], type(owner).__name__)
        err = err.__cause__ or err.__context__
    parts = []
    if where is not None:
        parts.append(f" in {where[0]} ({where[1]})")
    op = _OPERATOR.search(str(e))
    if op:
        parts.append(f" at operator {op.group(1)}")
    return "".join(parts)


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


SPILL_BYTES = 1 << 16  # named data blobs at least this large wait on disk, not in memory


@contextlib.contextmanager
def spilled_named_data(directory: Path):
    """While lowering, every large blob a backend hands ExecuTorch's ``NamedDataStore`` (XNNPACK: each
    frozen weight, as a ``bytes`` copy) is written to ``directory`` and kept as a ``FileBackedData``
    that the serializer streams into the ``.pte``. Without this the export holds a bytes copy of the
    weights per method (``train_step`` and ``score``) until serialization, then the ``.pte``'s bytes
    on top: over 5x the weights. Blobs are files named by their key (XNNPACK: the sha256 of the
    bytes), so a weight both methods read is written once."""
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
# for a partition holding none of its ops (matched on the op names); the lowered program is
# byte-identical (tested).
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


@contextlib.contextmanager
def lean_edge_passes():
    """Skips the passes in ``_IDLE_EDGE_PASSES`` for a method that holds none of the ops they rewrite
    (three of the ten passes that run before the ops become edge ops, each a re-trace: all three
    for a fixed-length step, all but the symbolic one for an any-length step; ~10 s of a SmolLM2
    export). The program is byte-identical (tested)."""
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


@contextlib.contextmanager
def quick_partitioning():
    """ExecuTorch cuts each partition out of a method's graph with ``create_submodule_from_nodes``,
    whose ``legalize_graph`` re-sorts the graph by copying every node into a new one and assigning
    it; assigning a ``GraphModule``'s graph regenerates the Python code of the module and of every
    submodule (each partition cut so far). Both are quadratic in the partitions (SmolLM2's 30 layers:
    most of a 10-minute lowering, then 26 s of node copies). While cutting, the graph is sorted in
    place into the same state the copy would have (:func:`_legalize_in_place`), and the code is
    regenerated once, after the method's last cut. Nothing runs or prints a method's graph module
    between the cuts; the program is byte-identical (tested)."""
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
        with _quick_merge_check():
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


@contextlib.contextmanager
def _quick_merge_check():
    """XNNPACK's partitioner tries to merge every pair of partitions; its cycle check walks each
    outside user's whole downstream set looking for a node of the pair. ``isdisjoint`` walks the
    smaller of the two sets instead: the same answer, a fraction of the time on a 30-layer step."""
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


@contextlib.contextmanager
def fewer_decompositions():
    """Two fewer re-traces of each method while ExecuTorch decomposes it to core ATen ops:

    * Before partitioning, ExecuTorch keeps the ops a partitioner may take whole (XNNPACK: ``linear``
      among others) from being decomposed. With a per-node filter (XNNPACK has one) that costs two
      more re-traces (decompose around the ops, mark the nodes the filter accepts, decompose
      again); without one, the ops are kept as they are, in at most one re-trace. When the filter
      accepts every node of those ops the two ways keep the same nodes, so the filter is dropped
      for that method; otherwise ExecuTorch's own way runs. (The filter is asked about the nodes
      before decomposing: a node of those ops that some other op's decomposition created would be
      kept unasked. A decoder step's decompositions create none.)
    * ExecuTorch first functionalizes each method (``run_decompositions({})``, a re-trace of its
      own) and then decomposes it, which functionalizes again on the way. The first is put off
      until the decomposition, which then does both in one re-trace; every path through
      ExecuTorch's generation decomposes (the check that could skip it answers "yes" for a method
      still waiting). The filter above and the partitioner's op list are read before the
      functionalization: a decoder step's linears read parameters and activations, which it does
      not change.

    The program is byte-identical (the test's tiny Llama, any-length and fixed, and a 6-layer
    SmolLM2, by hand), and the eleven architectures' and the quantized programs still step as
    eager does (tested)."""
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


@contextlib.contextmanager
def quick_delegate_shapes():
    """``to_executorch`` re-propagates shapes through every method, and each XNNPACK delegate call
    on fake tensors is answered by rebuilding the partition's program as a module
    (``ExportedProgram.module()``: unlifting and code generation) and running it (13 s of a
    SmolLM2 export). The partition's outputs are already recorded in its program's output node, so
    fake outputs of those shapes, strides and dtypes are made instead; anything else (a real call,
    an output that is not a plain tensor, a program that also mutates a buffer) runs ExecuTorch's
    own way. The program is byte-identical (tested)."""
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


@contextlib.contextmanager
def lean_provenance():
    """Every node a pass creates records its provenance (``NodeSource``), and torch deep-copies the
    source node's whole history into it: a chain one link longer per pass, copied for every node of
    every re-trace (15% of a fixed-length export's time, 9% of an any-length one's). The history's
    entries are never changed after they are made (new links only replace a node's list), so a new
    list over the same entries records the same provenance; ExecuTorch's debug handles, read from
    it, come out the same and the program is byte-identical (tested)."""
    import torch.fx.traceback as tb

    original = tb.copy
    tb.copy = _ShallowProvenance
    try:
        yield
    finally:
        tb.copy = original


_JOBS = None  # (backend class, programs, compile specs) for the forked preprocessing workers


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # OpenMP's pool does not survive fork(): one thread never enters it


def _preprocess_job(job):
    cls, programs, specs = _JOBS
    name, i = job
    return cls.preprocess(programs[name][i], specs[name][i])


@contextlib.contextmanager
def parallel_preprocess(workers: int):
    """XNNPACK preprocesses every partition of every method on its own (re-tracing passes and
    serialization of the partition's graph): most of the export's time, and single-threaded Python.
    With ``workers`` > 1 the partitions are shared out to forked worker processes (they inherit the
    partitioned programs; a result is the partition's small flatbuffer plus its weights' spill-file
    names, see :func:`spilled_named_data`). The program is byte-identical (tested)."""
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


def _example_inputs(m: Manifest, rows: int):
    ids = torch.ones((rows, m.max_length), dtype=torch.long)
    mask = torch.ones((rows, m.max_length), dtype=torch.long)
    labels = torch.ones((rows, m.label_width), dtype=torch.long)
    return ids, mask, labels


def _mutable_state(model: nn.Module) -> list[torch.Tensor]:
    """Every B and update-rule state buffer (``zo_*``) of the MP-LoRA layers, in a fixed order."""
    return [
        t for _, layer in lora_layers(model) for n, t in layer.named_buffers() if n == "lora_B" or n.startswith("zo_")
    ]


def _restore(model: nn.Module, saved) -> None:
    """Put every B (and update-rule state) back exactly as it was."""
    with torch.no_grad():
        for t, value in zip(_mutable_state(model), saved):
            t.copy_(value)


def _length_dims(m: Manifest, n_inputs: int):
    """``dynamic_shapes`` making T (dim 1 of input_ids and attention_mask) symbolic in [2, max_length]."""
    if not m.dynamic_length:
        return None
    t = torch.export.Dim("T", min=2, max=m.max_length)
    return ({1: t}, {1: t}) + (None,) * (n_inputs - 2)


def export_program(
    model: nn.Module,
    manifest: Manifest,
    out_dir: Path,
    xnnpack: bool = True,
    progress: bool = False,
    workers: int = 1,
    extra=None,
) -> Manifest:
    """Export ``model`` (with MP-LoRA layers injected) per ``manifest`` into ``out_dir`` (atomically).

    ``progress``: a status line per stage (trace, lower, serialize, write) on stderr; ``workers``:
    processes that lower XNNPACK partitions in parallel (:func:`parallel_preprocess`); ``extra(d)``:
    writes more files into the program's directory ``d`` (before the manifest, which it may amend)."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    names = [n for n, _ in lora_layers(model)]
    if not names:
        raise MobizoError("the model has no MP-LoRA layers to export")
    model.eval()
    step = ZOStep(model, manifest.zo_config(), shared_prompt=manifest.shared_prompt)
    ids, mask, labels = _example_inputs(manifest, manifest.rows)
    train_args = (ids, mask, labels, torch.tensor(1, dtype=torch.long), torch.tensor(1e-3), torch.tensor(1e-3))
    if manifest.objective != "answer":
        train_args += (torch.zeros(manifest.batch_size, dtype=torch.long),)
    # a shared-prompt train_step never packs the LM head (mobizo.step.candidate_logits): score need not either
    found = plain_head(model) if manifest.shared_prompt else None
    unpacked_head = found is not None
    head_names = {
        n
        for n, p in model.named_parameters(prefix="model", remove_duplicate=False)
        if found is not None and p is found[2].weight
    }
    stage = Stages("export", progress)
    stage("tracing the step (torch.export)")
    bs = tuple(layer.lora_B.detach().clone() for _, layer in lora_layers(model))
    saved = [t.detach().clone() for t in _mutable_state(model)]
    try:
        # torch.export prints a partial graph on stderr when it fails: the error below says what failed
        def trace():
            return {
                "train_step": torch.export.export(
                    step, train_args, dynamic_shapes=_length_dims(manifest, len(train_args)), strict=False
                ),
                "score": torch.export.export(
                    ScoreMethod(model, manifest.shared_prompt, unpacked_head),
                    _example_inputs(manifest, manifest.eval_rows),
                    dynamic_shapes=_length_dims(manifest, 3),
                    strict=False,
                ),
                "get_adapter": torch.export.export(GetAdapter(model, names), (), strict=False),
                "set_adapter": torch.export.export(SetAdapter(model, names), bs, strict=False),
                **trace_state(),
            }

        def trace_state() -> dict:
            """get_state / set_state of a stateful update rule (momentum, adam, hizoo); none for the others."""
            if not manifest.state_names:
                return {}
            state = [
                step.model.get_submodule(n.rpartition(".")[0]).get_buffer(n.rpartition(".")[2])
                for n in manifest.state_names
            ]
            state = tuple(t.detach().clone() for t in state)
            return {
                "get_state": torch.export.export(GetState(model, manifest.state_names), (), strict=False),
                "set_state": torch.export.export(SetState(model, manifest.state_names), state, strict=False),
            }

        def trace_generation(programs) -> None:
            """``prefill`` / ``decode`` (:mod:`.generate`); a model whose generation cannot be traced gets a
            program that trains without them (one notice line), not a failed export."""
            if not manifest.generate:
                return
            gen = GenerateMethod(model, manifest.max_length)
            try:
                programs["prefill"] = torch.export.export(gen, gen_inputs(manifest.prefill_chunk), strict=False)
                programs["decode"] = torch.export.export(gen, gen_inputs(1), strict=False)
            except Exception as e:  # noqa: BLE001 - reported in one line, the training methods stand
                programs.pop("prefill", None)
                manifest.generate, manifest.prefill_chunk = False, 0
                print(
                    f"mobizo: notice: no generation methods in this program: torch.export failed"
                    f"{failure_site(e, model)}: {_first_line(e)}",
                    file=sys.stderr,
                )

        with (
            torch.no_grad(),
            plain_attention(model),
            lean_provenance(),
            contextlib.redirect_stderr(io.StringIO()) as chatter,
        ):
            try:
                programs = trace()
            except Exception:  # a model whose code pins the sequence length: a fixed-length program
                if not manifest.dynamic_length:
                    raise
                manifest.dynamic_length = False
                _restore(model, saved)
                programs = trace()
            trace_generation(programs)
        sys.stderr.write(chatter.getvalue())
    except Exception as e:  # surface export failures as one line
        stage.done(failed=True)
        raise MobizoError(f"torch.export failed{failure_site(e, model)}: {_first_line(e)}") from e
    finally:
        _restore(model, saved)  # tracing ran the step's in-place update once
    # All XNNPACK-supported ops (not just the frozen linears: the portable kernels for
    # bmm/softmax/permute/pow are several times slower than eager PyTorch), except those
    # reading B, which XNNPACK would bake in as a constant.
    stage("lowering to XNNPACK" if xnnpack else "lowering")

    def mutable(name: str) -> bool:  # B, an update rule's state, and the generation methods' KV cache
        return name.endswith(".lora_B") or ".zo_" in name or name.startswith(KV_PREFIX)

    def mutable_or_head(name: str) -> bool:  # the head's weight under every name it has (tied: the embedding's)
        return mutable(name) or name in head_names

    partitioner = {}
    if xnnpack:
        partitioner = {m: [xnnpack_partitioner(mutable)] for m in programs}
        if unpacked_head:
            partitioner["score"] = [xnnpack_partitioner(mutable_or_head)]
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)  # the spilled weights live beside the program, not in /tmp
    spill = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.weights-", dir=out_dir.parent))
    try:
        with (
            spilled_named_data(spill),
            lean_xnnpack_passes(),
            parallel_preprocess(workers),
            quick_partitioning(),
            lean_provenance(),
            fewer_decompositions(),
            quick_delegate_shapes(),
            lean_edge_passes(),
        ):
            try:
                edge = to_edge_transform_and_lower(
                    programs, partitioner=partitioner, compile_config=EdgeCompileConfig(_check_ir_validity=False)
                )
                del programs
                gc.collect()
                stage("serializing the program")
                et = edge.to_executorch(
                    ExecutorchBackendConfig(
                        passes=[InitializedMutableBufferPass(["lora_B"])],
                        memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True),
                        emit_mutable_buffer_names=True,
                    )
                )
                del edge
                gc.collect()
            except Exception as e:
                stage.done(failed=True)
                raise MobizoError(f"lowering to ExecuTorch failed{failure_site(e, model)}: {_first_line(e)}") from e
            manifest.xnnpack = xnnpack
            manifest.versions = versions()

            def write(d: Path) -> None:
                with open(d / PROGRAM, "wb") as f:  # streamed: the spilled weights never come back into memory
                    et.write_to_file(f)
                manifest.pte_bytes, manifest.pte_sha256 = file_sha256(d / PROGRAM)
                if extra is not None:
                    extra(d)
                (d / MANIFEST).write_text(dumps(asdict(manifest), indent=1), encoding="utf-8")

            stage("writing the program")
            manifest.export_seconds = dict(stage.seconds)
            atomic_write_dir(out_dir, write)
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    stage.done()
    return manifest
