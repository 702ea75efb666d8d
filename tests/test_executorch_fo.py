"""ExecuTorch programs: the FO baseline (joint forward-backward export) and live-adapter reads."""

import copy

import pytest
import torch

from mobizo.data import Encoder, collate
from mobizo.mplora import adapter_state, inject, lora_layers
from mobizo.step import ZOConfig, answer_losses
from mobizo.tasks import get_task

pytestmark = pytest.mark.slow


def _batches(tok, n, rows, length):
    enc = Encoder(tok)
    exs = get_task("synthetic").load("train")[: n * rows]
    return [
        collate(
            [enc.example(e) for e in exs[i * rows : (i + 1) * rows]],
            tok.pad_token_id,
            length,
            length=length,
            answer_len=1,
        )
        for i in range(n)
    ]


def test_fo_program_trains_like_eager_sgd(tiny):
    from mobizo.engines.eager import EagerEngine
    from mobizo.engines.executorch.fo import ExecuTorchFOEngine, FOManifest, export_fo_program

    model, tok = tiny
    inject(model, ["q_proj", "v_proj"], 4, 8.0, 0)
    data, m = export_fo_program(model, FOManifest("tiny", rows=2, max_length=24, answer_len=1))
    assert m.parameters and all(p.endswith("lora_B") for p in m.parameters)
    assert not any(p.requires_grad for p in model.parameters())  # the caller's model is untouched
    et = ExecuTorchFOEngine(data, m)
    ref = EagerEngine(copy.deepcopy(model), "fo", optimizer="sgd")
    losses = []
    for step, b in enumerate(_batches(tok, 3, 2, 24), 1):
        a, r = et.train_step(b, step, 0.5), ref.train_step(b, step, 0.5, 0.0)
        assert a.loss == pytest.approx(r.loss, rel=1e-5)
        losses.append(a.loss)
    got, want = et.adapter_state(), ref.adapter_state()
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], rtol=1e-4, atol=1e-6)
    assert any(v.abs().max() > 0 for v in got.values())  # B moved off zero


def test_zo_program_score_and_get_adapter_read_the_live_adapter(tiny, tmp_path):
    """XNNPACK bakes the buffers it reads into constants: B must never be delegated."""
    from mobizo.engines.executorch import ExecuTorchEngine, export_program, manifest_for

    model, tok = tiny
    inject(model, ["q_proj", "v_proj"], 4, 8.0, 0)
    m = manifest_for(model, "tiny", ZOConfig("prge", 1), 2, 24, 1, 2, 4, 8.0, "x")
    export_program(model, m, tmp_path / "p")
    eng = ExecuTorchEngine(tmp_path / "p")
    g = torch.Generator().manual_seed(0)
    for _, layer in lora_layers(model):
        layer.lora_B.copy_(0.5 * torch.randn(layer.lora_B.shape, generator=g))
    eng.load_adapter_state(adapter_state(model))
    for k, v in eng.adapter_state().items():
        torch.testing.assert_close(v, adapter_state(model)[k])
    (b,) = _batches(tok, 1, 2, 24)
    eng.train_step(b, 1, 0.5, 1e-2)  # B moves in train_step; score (loaded lazily, after it) must see that
    trained = eng.adapter_state()
    assert not torch.equal(
        trained[next(k for k in trained if k.endswith("lora_B"))],
        adapter_state(model)[next(k for k in trained if k.endswith("lora_B"))],
    )
    from mobizo.mplora import load_adapter_state

    load_adapter_state(model, trained)
    with torch.no_grad():
        want = answer_losses(model, b.input_ids, b.attention_mask, b.labels)[0]
    torch.testing.assert_close(eng.score(b)[0], want, rtol=1e-4, atol=1e-4)


def test_shared_prompt_fo_program_trains_like_eager_per_candidate_sgd(tiny):
    """The FO program on shared-prompt batches (one row per example) follows eager SGD on one row per
    (example, candidate)."""
    from mobizo.data import collate_choices
    from mobizo.engines.eager import EagerEngine
    from mobizo.engines.executorch.fo import ExecuTorchFOEngine, FOManifest, export_fo_program

    model, tok = tiny
    inject(model, ["q_proj", "v_proj"], 4, 8.0, 0)
    m = FOManifest("tiny", rows=2, max_length=24, answer_len=1, objective="choice-sum", choices=2, shared_prompt=True)
    data, m = export_fo_program(model, m)
    et = ExecuTorchFOEngine(data, m)
    ref = EagerEngine(copy.deepcopy(model), "fo", optimizer="sgd", objective="choice-sum", choices=2)
    enc, exs = Encoder(tok), get_task("synthetic").load("train")
    for step in range(1, 4):
        part = exs[2 * step : 2 * step + 2]
        groups, golds = [[enc(e.prompt, c) for c in e.candidates] for e in part], [e.label for e in part]
        shared = collate_choices(groups, golds, 2, tok.pad_token_id, 24, length=24, answer_len=1, examples=2)
        per_candidate = collate_choices(groups, golds, 2, tok.pad_token_id, 24, shared=False)
        assert shared.shared and not per_candidate.shared
        a, r = et.train_step(shared, step, 0.5), ref.train_step(per_candidate, step, 0.5, 0.0)
        assert a.loss == pytest.approx(r.loss, rel=1e-5)
    got, want = et.adapter_state(), ref.adapter_state()
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], rtol=1e-4, atol=1e-6)
    assert any(v.abs().max() > 0 for v in got.values())
