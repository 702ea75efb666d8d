"""Training inside the stock ExecuTorch runtime.

:func:`export_program` exports the *same* :class:`mobizo.step.ZOStep` the eager
engine calls into one ExecuTorch program (``train.pte``) with four methods that
share the adapter's mutable buffers:

* ``train_step(input_ids, attention_mask, labels, step, lr, eps[, gold]) -> (losses (2, q), grads (q,))``:
  in-graph noise from (seed, step), batched forward over the 2q copies, per-copy losses,
  projected gradients and the in-place update of every B;
* ``score(input_ids, attention_mask, labels) -> (ce sums, token counts)``: eval with the current B;
* ``get_adapter() -> (A_0, B_0, A_1, B_1, ...)``: read the adapter out;
* ``set_adapter(B_0, B_1, ...)``: load an adapter (resume, or a fresh start).

Everything XNNPACK supports (the frozen linear layers, the per-copy bmm, attention's
matmuls/softmax, norms' elementwise math) is lowered to XNNPACK; integer noise hashing,
masking and the buffer updates run on portable kernels. The program is traced with the
model's plain ("eager") attention: the SDPA decomposition adds masked-row fix-ups
(eq/any/where per layer) that the portable kernels run slowly. ``manifest.json``
records everything the program was built for, plus the sha256 of the base weights
and of the ``.pte`` file, so a mismatched or corrupted program is refused with a
clear message before the runtime sees it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..checkpoint import atomic_write_dir
from ..errors import MobizoError
from ..mplora import lora_layers
from ..step import ZOConfig, ZOStep, answer_losses
from . import Shapes, StepOutput

PROGRAM = "train.pte"
MANIFEST = "manifest.json"
METHODS = ("train_step", "score", "get_adapter", "set_adapter")
EAGER_METHODS = ("train_step", "get_adapter", "set_adapter")  # score: loaded on first use


@dataclass
class Manifest:
    model: str
    base_weights_sha256: str
    estimator: str
    queries: int
    seed: int
    data_mode: str
    weight_decay: float
    max_grad: float
    objective: str
    choices: int
    batch_size: int  # examples per step
    max_length: int  # T
    answer_len: int  # K
    eval_rows: int
    rank: int
    alpha: float
    target_modules: list[str]
    adapter_shapes: dict[str, list[int]]
    xnnpack: bool = True
    versions: dict = field(default_factory=dict)
    pte_sha256: str = ""
    pte_bytes: int = 0

    @property
    def rows(self) -> int:
        """Rows of the train_step inputs (examples x candidates for the choice objective)."""
        return self.batch_size * (self.choices if self.objective != "answer" else 1)

    def zo_config(self) -> ZOConfig:
        return ZOConfig(self.estimator, self.queries, self.seed, self.data_mode, self.weight_decay, self.max_grad,
                        self.objective, self.choices)  # fmt: skip


@contextlib.contextmanager
def quiet_stderr():
    """Silence the runtime's C++ start-up chatter (cpuinfo probes) on fd 2; Python errors still propagate."""
    import os
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def versions() -> dict:
    import executorch  # noqa: F401
    from importlib.metadata import version

    return {"mobizo": __version__, "torch": torch.__version__, "executorch": version("executorch"),
            "python": platform.python_version()}  # fmt: skip


# ------------------------------------------------------------------ the exported methods


class ScoreMethod(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model  # same attribute name as ZOStep.model: buffer names match across methods

    def forward(self, input_ids, attention_mask, labels):
        return answer_losses(self.model, input_ids, attention_mask, labels)


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

    def reads_mutable(node, ep) -> bool:
        sig = ep.graph_signature
        for arg in node.all_input_nodes:
            name = sig.inputs_to_parameters.get(arg.name) or sig.inputs_to_buffers.get(arg.name)
            if name is not None and is_mutable(name):
                return True
        return False

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


def _example_inputs(m: Manifest, rows: int):
    ids = torch.ones((rows, m.max_length), dtype=torch.long)
    mask = torch.ones((rows, m.max_length), dtype=torch.long)
    labels = torch.ones((rows, m.answer_len), dtype=torch.long)
    return ids, mask, labels


def export_program(model: nn.Module, manifest: Manifest, out_dir: Path, xnnpack: bool = True) -> Manifest:
    """Export ``model`` (with MP-LoRA layers injected) per ``manifest`` into ``out_dir`` (atomically)."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    names = [n for n, _ in lora_layers(model)]
    if not names:
        raise MobizoError("the model has no MP-LoRA layers to export")
    model.eval()
    step = ZOStep(model, manifest.zo_config())
    ids, mask, labels = _example_inputs(manifest, manifest.rows)
    train_args = (ids, mask, labels, torch.tensor(1, dtype=torch.long), torch.tensor(1e-3), torch.tensor(1e-3))
    if manifest.objective != "answer":
        train_args += (torch.zeros(manifest.batch_size, dtype=torch.long),)
    bs = tuple(layer.lora_B.detach().clone() for _, layer in lora_layers(model))
    saved = [b.clone() for b in bs]
    try:
        with torch.no_grad(), plain_attention(model):
            programs = {
                "train_step": torch.export.export(step, train_args, strict=False),
                "score": torch.export.export(ScoreMethod(model), _example_inputs(manifest, manifest.eval_rows), strict=False),
                "get_adapter": torch.export.export(GetAdapter(model, names), (), strict=False),
                "set_adapter": torch.export.export(SetAdapter(model, names), bs, strict=False),
            }
    except Exception as e:  # noqa: BLE001 - surface export failures as one line
        raise MobizoError(f"torch.export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        # tracing ran the step's in-place update once: restore the adapter exactly
        with torch.no_grad():
            for (_, layer), b in zip(lora_layers(model), saved):
                layer.lora_B.copy_(b)
    # All XNNPACK-supported ops (not just the frozen linears: the portable kernels for
    # bmm/softmax/permute/pow are several times slower than eager PyTorch), except those
    # reading B, which XNNPACK would bake in as a constant.
    partitioner = [xnnpack_partitioner(lambda name: name.endswith(".lora_B"))] if xnnpack else []
    edge = to_edge_transform_and_lower(
        programs, partitioner=partitioner, compile_config=EdgeCompileConfig(_check_ir_validity=False)
    )
    et = edge.to_executorch(
        ExecutorchBackendConfig(
            passes=[InitializedMutableBufferPass(["lora_B"])],
            memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True),
            emit_mutable_buffer_names=True,
        )
    )
    data = et.buffer
    manifest.xnnpack = xnnpack
    manifest.versions = versions()
    manifest.pte_sha256 = hashlib.sha256(data).hexdigest()
    manifest.pte_bytes = len(data)

    def write(d: Path) -> None:
        (d / PROGRAM).write_bytes(data)
        (d / MANIFEST).write_text(json.dumps(asdict(manifest), indent=1), encoding="utf-8")

    atomic_write_dir(Path(out_dir), write)
    return manifest


def _file_sha256(path: Path) -> tuple[int, str]:
    """(size, sha256) of a file, read in chunks (never the whole program in memory)."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def read_manifest(program_dir: Path) -> Manifest:
    path = Path(program_dir) / MANIFEST
    if not path.is_file():
        raise MobizoError(f"{program_dir} has no {MANIFEST} (export a program with 'mobizo export')")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Manifest(**raw)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise MobizoError(f"{path}: malformed manifest ({e})") from e


def check_manifest(m: Manifest, expected: dict) -> None:
    """Refuse a program built for something else: one line naming the first difference."""
    have = asdict(m)
    for key, want in expected.items():
        if have.get(key) != want:
            raise MobizoError(f"program was built with {key}={have.get(key)!r}, this run needs {want!r} (re-export it)")
    cur = versions()
    for key in ("mobizo", "torch", "executorch"):
        if m.versions.get(key) != cur[key]:
            raise MobizoError(f"program was built with {key} {m.versions.get(key)}, this is {cur[key]} (re-export it)")


class ExecuTorchEngine:
    """Drives ``train.pte`` through ``executorch.runtime``; no PyTorch model is needed at run time."""

    name = "executorch"

    def __init__(self, program_dir: Path):
        self.dir = Path(program_dir)
        self.manifest = m = read_manifest(self.dir)
        pte = self.dir / PROGRAM
        if not pte.is_file():
            raise MobizoError(f"{self.dir} has no {PROGRAM}")
        size, digest = _file_sha256(pte)
        if size != m.pte_bytes or digest != m.pte_sha256:
            raise MobizoError(f"{pte} is truncated or corrupted (its sha256 does not match {MANIFEST}); re-export it")
        from executorch.runtime import Runtime

        try:
            with quiet_stderr():
                # From the path, not from bytes: the runtime maps the file instead of keeping a
                # second copy of the whole program (weights included) in memory.
                self.program = Runtime.get().load_program(pte)
            missing = set(METHODS) - set(self.program.method_names)
            if missing:
                raise MobizoError(f"{pte} lacks the methods {sorted(missing)}")
            self.methods = {}
            for name in EAGER_METHODS:
                self._method(name)
        except MobizoError:
            raise
        except Exception as e:  # noqa: BLE001 - runtime errors surface as one line
            raise MobizoError(f"ExecuTorch cannot load {pte}: {e}") from e
        self.names = list(m.adapter_shapes)
        self.shapes = Shapes(length=m.max_length, answer_len=m.answer_len, rows=m.batch_size, eval_rows=m.eval_rows)
        self.estimator = m.estimator
        # Shared mutable buffers start uninitialised in the runtime: always load B explicitly.
        self._set_b([torch.zeros(*m.adapter_shapes[n]) for n in self.names])

    # -------------------------------------------------------------- construction for a training run

    @classmethod
    def for_training(cls, cfg, model, out: Path | None, zo: ZOConfig, answer_len: int) -> "ExecuTorchEngine":
        from ..models import weights_hash

        if cfg.estimator == "fo":
            raise MobizoError("--engine executorch trains with zeroth-order estimators; use --engine eager for fo")
        manifest = manifest_for(model, cfg.model, zo, cfg.batch_size, cfg.max_length, answer_len,
                                cfg.eval_batch_size, cfg.rank, cfg.alpha, weights_hash(model))  # fmt: skip
        program_dir = Path(cfg.program) if getattr(cfg, "program", None) else None
        if program_dir is None:
            import tempfile

            program_dir = (out / "program") if out is not None else Path(tempfile.mkdtemp(prefix="mobizo-program-"))
            if not (program_dir / PROGRAM).is_file():
                if out is not None:
                    out.mkdir(parents=True, exist_ok=True)
                export_program(model, manifest, program_dir)
        engine = cls(program_dir)
        check_manifest(engine.manifest, _identity(manifest))
        return engine

    # -------------------------------------------------------------- engine interface

    def _method(self, name: str):
        """A loaded method; ``score`` is loaded on first use: every method's XNNPACK delegate packs
        its own copy of the weights, so a process that only trains never holds the eval copy."""
        if name not in self.methods:
            with quiet_stderr():
                self.methods[name] = self.program.load_method(name)
        return self.methods[name]

    def _run(self, method: str, args):
        try:
            return self._method(method).execute(list(args))
        except Exception as e:  # noqa: BLE001
            raise MobizoError(f"ExecuTorch {method} failed: {e}") from e

    def _check(self, batch, rows: int) -> None:
        m = self.manifest
        if tuple(batch.input_ids.shape) != (rows, m.max_length) or batch.labels.shape[1] != m.answer_len:
            raise MobizoError(
                f"batch of shape {tuple(batch.input_ids.shape)} (answer window {batch.labels.shape[1]}) does not match "
                f"the program's ({rows}, {m.max_length}) (answer window {m.answer_len})"
            )

    def train_step(self, batch, step: int, lr: float, eps: float) -> StepOutput:
        self._check(batch, self.manifest.rows)
        args = [batch.input_ids, batch.attention_mask, batch.labels, torch.tensor(step, dtype=torch.long),
                torch.tensor(lr, dtype=torch.float32), torch.tensor(eps, dtype=torch.float32)]  # fmt: skip
        if self.manifest.objective != "answer":
            args.append(batch.gold)
        losses, grads = self._run("train_step", args)
        return StepOutput(loss=float(losses.mean()), projected_grads=grads.tolist(), losses=losses.tolist())

    def score(self, batch):
        self._check(batch, self.manifest.eval_rows)
        sums, counts = self._run("score", [batch.input_ids, batch.attention_mask, batch.labels])
        return sums, counts

    def adapter_state(self) -> dict[str, torch.Tensor]:
        out = self._run("get_adapter", [])
        state = {}
        for i, n in enumerate(self.names):
            state[f"{n}.lora_A"] = out[2 * i].clone()
            state[f"{n}.lora_B"] = out[2 * i + 1].clone()
        return state

    def _set_b(self, bs) -> None:
        self._run("set_adapter", [b.to(torch.float32).contiguous() for b in bs])

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        current = self.adapter_state()
        if set(state) != set(current):
            raise MobizoError("adapter does not fit this program (different adapted modules)")
        for k, v in state.items():
            if tuple(v.shape) != tuple(current[k].shape):
                raise MobizoError(f"adapter tensor {k} has shape {tuple(v.shape)}, the program needs {tuple(current[k].shape)}")
            if k.endswith("lora_A") and not torch.equal(v.to(torch.float32), current[k]):
                raise MobizoError(f"adapter tensor {k} differs from the program's frozen A (different --seed or adapter)")
        self._set_b([state[f"{n}.lora_B"] for n in self.names])

    def optimizer_state(self):
        return None

    def load_optimizer_state(self, state) -> None:
        pass


def manifest_for(model, model_name, zo: ZOConfig, batch_size, max_length, answer_len, eval_rows, rank, alpha, base_hash):
    layers = lora_layers(model)
    return Manifest(
        model=model_name,
        base_weights_sha256=base_hash,
        estimator=zo.estimator,
        queries=zo.queries,
        seed=zo.seed,
        data_mode=zo.data_mode,
        weight_decay=zo.weight_decay,
        max_grad=zo.max_grad,
        objective=zo.objective,
        choices=zo.choices,
        batch_size=batch_size,
        max_length=max_length,
        answer_len=answer_len,
        eval_rows=eval_rows,
        rank=rank,
        alpha=alpha,
        target_modules=[n for n, _ in layers],
        adapter_shapes={n: list(layer.lora_B.shape) for n, layer in layers},
    )


def _identity(m: Manifest) -> dict:
    """The manifest fields a run must agree on."""
    d = asdict(m)
    for k in ("model", "xnnpack", "versions", "pte_sha256", "pte_bytes"):  # the weights' sha256 names the model
        d.pop(k)
    return d
