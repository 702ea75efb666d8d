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

The lowering's version-gated patches of ExecuTorch/PyTorch internals (:mod:`mobizo.patches`): docs/upstream.md.
"""

from __future__ import annotations

import contextlib
import gc
import io
import re
import shutil
import sys
import tempfile
import traceback
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ... import patches
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


class GetBuffers(nn.Module):
    """``() -> (buffer, ...)``: copies of the model's buffers ``names`` (``<module>.<buffer>``), in order:
    ``get_adapter`` (A_0, B_0, A_1, B_1, ...) and ``get_state`` (a stateful update rule's ``zo_*``)."""

    def __init__(self, model, names):
        super().__init__()
        self.model = model  # the attribute ZOStep uses: buffer names match across methods
        self.names = names

    def forward(self):
        return tuple(self.model.get_buffer(n).clone() for n in self.names)


class SetBuffers(nn.Module):
    """``(tensor, ...) -> ()``: write the model's buffers ``names``: ``set_adapter`` (B_0, B_1, ...) and
    ``set_state`` (a fresh start or a resumed checkpoint). Returns a sum, so the method has an output."""

    def __init__(self, model, names):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *tensors):
        total = torch.zeros(())
        for n, t in zip(self.names, tensors):
            self.model.get_buffer(n).copy_(t)
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


# the patches the export applies (mobizo.patches.lowering); each leaves the program byte-identical
EXPORT_PATCHES = (
    "spilled_named_data",
    "lean_xnnpack_passes",
    "parallel_preprocess",
    "quick_partitioning",
    "quick_merge_check",
    "lean_provenance",
    "fewer_decompositions",
    "quick_delegate_shapes",
    "lean_edge_passes",
)


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
    processes that lower XNNPACK partitions in parallel (:func:`mobizo.patches.parallel_preprocess`); ``extra(d)``:
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
    patches.check(*EXPORT_PATCHES)  # their notices, if any, before the status lines
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
                "get_adapter": torch.export.export(
                    GetBuffers(model, [f"{n}.lora_{w}" for n in names for w in "AB"]), (), strict=False
                ),
                "set_adapter": torch.export.export(SetBuffers(model, [f"{n}.lora_B" for n in names]), bs, strict=False),
                **trace_state(),
            }

        def trace_state() -> dict:
            """get_state / set_state of a stateful update rule (momentum, adam, hizoo); none for the others."""
            if not manifest.state_names:
                return {}
            state = tuple(model.get_buffer(n).detach().clone() for n in manifest.state_names)
            return {
                "get_state": torch.export.export(GetBuffers(model, manifest.state_names), (), strict=False),
                "set_state": torch.export.export(SetBuffers(model, manifest.state_names), state, strict=False),
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
            patches.lean_provenance(),
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
            patches.spilled_named_data(spill),
            patches.lean_xnnpack_passes(),
            patches.parallel_preprocess(workers),
            patches.quick_partitioning(),
            patches.quick_merge_check(),
            patches.lean_provenance(),
            patches.fewer_decompositions(),
            patches.quick_delegate_shapes(),
            patches.lean_edge_passes(),
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
