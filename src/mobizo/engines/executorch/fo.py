"""The first-order LoRA baseline inside the stock ExecuTorch runtime (issue 3, item 4).

The FO objective is :class:`mobizo.step.AnswerLoss` over the model's MP-LoRA layers made
trainable (:func:`mobizo.mplora.make_trainable`: B, or A and B for plain LoRA). It is
exported with ExecuTorch's joint forward-backward export:

    torch.export.export -> torch.export.experimental._export_forward_backward
    -> to_edge_transform_and_lower -> to_executorch

and run with ``executorch.extension.training``: ``forward_backward`` returns the loss and
fills ``named_gradients()``; the parameters are the program's own tensors (not copies), so
the host-side SGD step (``get_sgd_optimizer``, the module's optimizer utility) updates them
in place and the next call sees the new values.

Two workarounds were needed with torch 2.13.0 / executorch 1.5.1:

* ``aten::_scaled_dot_product_flash_attention_for_cpu_backward`` has no out variant
  ("Missing out variants" in ``to_executorch``): the program is traced with Hugging Face's
  plain ("eager") attention, whose backward is matmuls and softmax.
* the joint graph contains ``aten::empty_permuted`` (SiLU's backward ``full_like``), which
  the runtime has no kernel for ("Missing operator: aten::empty_permuted.out"): with an
  identity permutation it is exactly ``aten::empty``, and is rewritten to it.

XNNPACK takes the matmuls *except* those reading a trainable parameter directly
(:func:`mobizo.engines.executorch.export.xnnpack_partitioner`): XNNPACK packs a parameter it reads
once at load time, so a delegated B would never see the optimizer's updates.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ...errors import MobizoError
from ...mplora import lora_layers, make_trainable
from ...step import AnswerLoss
from ...util import dumps, quiet_stderr
from .. import Shapes, StepOutput
from .export import plain_attention, xnnpack_partitioner
from .manifest import versions

FO_PROGRAM = "train_fo.pte"
FO_MANIFEST = "manifest_fo.json"
METHOD = "forward"


@dataclass
class FOManifest:
    model: str
    rows: int
    max_length: int
    answer_len: int
    objective: str = "answer"
    choices: int = 0
    train_a: bool = False
    xnnpack: bool = True
    shared_prompt: bool = False  # rows are examples, labels (rows, choices) candidate ids (see step.choice_losses)
    parameters: list[str] = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    pte_sha256: str = ""
    pte_bytes: int = 0


def _identity_empty_permuted(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``empty_permuted(size, identity)`` to ``empty(size)``; returns how many."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.empty_permuted.default:
            continue
        size, perm = node.args[:2]
        if list(perm) != list(range(len(perm))):
            raise MobizoError(f"ExecuTorch FO export: empty_permuted with layout {list(perm)} is not supported")
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.aten.empty.memory_format, (size,), dict(node.kwargs))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        n += 1
    gm.graph.lint()
    gm.recompile()
    return n


def export_fo_program(
    model: nn.Module,
    manifest: FOManifest,
    out_dir: Path | None = None,
) -> tuple[bytes, FOManifest]:
    """The FO step of ``model`` (with MP-LoRA layers) as an ExecuTorch training program.

    ``model`` is not modified (a copy is made trainable). Returns the ``.pte`` bytes and the
    completed manifest; with ``out_dir``, also writes ``train_fo.pte`` and ``manifest_fo.json``.
    """
    from executorch.exir import EdgeCompileConfig, to_edge, to_edge_transform_and_lower
    from torch.export.experimental import _export_forward_backward

    if not lora_layers(model):
        raise MobizoError("the model has no MP-LoRA layers to export")
    m = manifest
    fo_model = copy.deepcopy(model).eval()
    make_trainable(fo_model, m.train_a)
    if m.shared_prompt and (m.objective == "answer" or m.answer_len != 1):
        raise MobizoError("a shared-prompt FO program needs the choice objective and one-token candidates")
    loss = AnswerLoss(fo_model, m.objective, m.choices, shared_prompt=m.shared_prompt)
    width = m.choices if m.shared_prompt else m.answer_len
    args = (
        torch.ones((m.rows, m.max_length), dtype=torch.long),
        torch.ones((m.rows, m.max_length), dtype=torch.long),
        torch.ones((m.rows, width), dtype=torch.long),
    )
    if m.objective != "answer":
        args += (torch.zeros(m.rows if m.shared_prompt else m.rows // m.choices, dtype=torch.long),)
    try:
        with plain_attention(fo_model):
            ep = torch.export.export(loss, args, strict=False)
        ep = _export_forward_backward(ep)
    except Exception as e:  # one line for the user
        raise MobizoError(
            f"ExecuTorch FO export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    _identity_empty_permuted(ep.graph_module)
    trainable = {n for n, p in loss.named_parameters() if p.requires_grad}
    compile_config = EdgeCompileConfig(_check_ir_validity=False)
    if m.xnnpack:
        from executorch.backends.xnnpack.partition.config.gemm_configs import AddmmConfig, LinearConfig, MMConfig
        from executorch.backends.xnnpack.partition.config.generic_node_configs import BMMConfig

        # Matmuls only: with the elementwise configs too, XNNPACK's preprocess rejects the
        # joint graph ("Output node ... is already in the inputs": pass-through activations
        # saved for the backward).
        configs = [LinearConfig, MMConfig, AddmmConfig, BMMConfig]
        partitioner = [xnnpack_partitioner(lambda name: name in trainable, configs)]
        edge = to_edge_transform_and_lower(ep, partitioner=partitioner, compile_config=compile_config)
    else:
        edge = to_edge(ep, compile_config=compile_config)
    data = edge.to_executorch().buffer
    m.parameters = sorted(trainable)
    m.versions = versions()
    m.pte_sha256 = hashlib.sha256(data).hexdigest()
    m.pte_bytes = len(data)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / FO_PROGRAM).write_bytes(data)
        (out / FO_MANIFEST).write_text(dumps(asdict(m), indent=1), encoding="utf-8")
    return data, m


class ExecuTorchFOEngine:
    """Runs the FO program: ``forward_backward`` in the runtime, SGD on the returned gradients.

    The update is ExecuTorch's own SGD (``get_sgd_optimizer``) on the program's parameter
    tensors; it is rebuilt when the learning rate changes (the optimizer's lr is fixed at
    construction).
    """

    name = "executorch-fo"

    def __init__(self, program: Path | bytes, manifest: FOManifest | None = None, weight_decay: float = 0.0):
        from executorch.extension.training import (
            _load_for_executorch_for_training,
            _load_for_executorch_for_training_from_buffer,
        )

        if isinstance(program, (bytes, bytearray)):
            if manifest is None:
                raise MobizoError("an FO program given as bytes needs its manifest")
            load, src = _load_for_executorch_for_training_from_buffer, bytes(program)
        else:
            d = Path(program)
            pte = d / FO_PROGRAM if d.is_dir() else d
            if manifest is None:
                mf = pte.parent / FO_MANIFEST
                if not mf.is_file():
                    raise MobizoError(f"{pte.parent} has no {FO_MANIFEST}")
                manifest = FOManifest(**json.loads(mf.read_text(encoding="utf-8")))
            if not pte.is_file():
                raise MobizoError(f"{pte} does not exist")
            load, src = _load_for_executorch_for_training, str(pte)
        self.manifest = m = manifest
        try:
            with quiet_stderr():
                self.module = load(src)
        except Exception as e:
            raise MobizoError(f"ExecuTorch cannot load the FO program: {e}") from e
        self.shapes = Shapes(length=m.max_length, answer_len=m.answer_len, rows=m.rows)
        self.estimator = "fo"
        self.weight_decay = weight_decay
        self._opt, self._lr = None, None

    def _args(self, batch) -> list:
        m = self.manifest
        width = m.choices if m.shared_prompt else m.answer_len
        if tuple(batch.input_ids.shape) != (m.rows, m.max_length) or batch.labels.shape[1] != width:
            raise MobizoError(
                f"batch of shape {tuple(batch.input_ids.shape)} (answer window {batch.labels.shape[1]}) does not "
                f"match the FO program's ({m.rows}, {m.max_length}) (answer window {width})"
            )
        if bool(getattr(batch, "shared", False)) != m.shared_prompt:
            raise MobizoError("batch layout (shared prompt or one row per candidate) does not match the FO program")
        args = [batch.input_ids, batch.attention_mask, batch.labels]
        if m.objective != "answer":
            args.append(batch.gold)
        return args

    def train_step(self, batch, step: int, lr: float, eps: float = 0.0) -> StepOutput:
        from executorch.extension.training import get_sgd_optimizer

        try:
            (loss,) = self.module.forward_backward(METHOD, self._args(batch))
        except MobizoError:
            raise
        except Exception as e:
            raise MobizoError(f"ExecuTorch FO forward_backward failed: {e}") from e
        if self._opt is None or lr != self._lr:
            self._opt = get_sgd_optimizer(self.module.named_parameters(), lr, 0, 0, self.weight_decay, False)
            self._lr = lr
        self._opt.step(self.module.named_gradients())
        return StepOutput(loss=float(loss))

    def loss(self, batch) -> float:
        """The objective at the current parameters (a forward-backward without the update)."""
        (loss,) = self.module.forward_backward(METHOD, self._args(batch))
        return float(loss)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """{``<layer>.lora_B``: tensor} (and ``lora_A`` for full LoRA) read from the program; after one step."""
        try:
            params = self.module.named_parameters()
        except RuntimeError as e:
            raise MobizoError("the FO program's parameters are readable after its first step") from e
        return {k.removeprefix("model."): v.clone() for k, v in params.items()}

    def optimizer_state(self):
        return None

    def load_optimizer_state(self, state) -> None:
        pass
