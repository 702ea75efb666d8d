"""Shared-prompt choice scoring (one row per example, one-token candidates read at the last position)
equals the per-candidate layout (one row per (example, candidate)): losses, g, trajectory, FO gradients, eval."""

import copy

import pytest
import torch

from mobizo.data import Encoder, collate_choices
from mobizo.errors import MobizoError
from mobizo.mplora import inject, lora_layers
from mobizo.step import AnswerLoss, ZOConfig, ZOStep
from mobizo.tasks import Example


def _examples():
    """Prompts of different lengths; 2 or 3 one-token candidates (a missing one is filler)."""
    texts = [
        "the movie was great",
        "awful food and a rude waiter, never again",
        "fine",
        "I loved every minute of it",
        "boring",
        "the plot made no sense at all and the acting was worse",
        "good",
        "what a waste of time",
    ]
    exs = []
    for i, t in enumerate(texts):
        cands = [" bad", " good"] + ([" great"] if i % 3 == 0 else [])
        exs.append(Example(prompt=f"Review: {t} Sentiment:", candidates=cands, label=i % 2))
    return exs


def _batches(tok, exs, n_choices=3, max_length=64, examples=None):
    enc = Encoder(tok)
    groups = [[enc(e.prompt, c) for c in e.candidates] for e in exs]
    golds = [e.label for e in exs]
    kw = dict(n_choices=n_choices, pad_id=tok.pad_token_id, max_length=max_length, examples=examples)
    old = collate_choices(groups, golds, shared=False, **kw)
    new = collate_choices(groups, golds, shared=True, **kw)
    return old, new


def _adapted(model):
    inject(model, ["q_proj", "v_proj"], 4, 8.0, 0)
    g = torch.Generator().manual_seed(1)
    for _, layer in lora_layers(model):
        layer.lora_B.copy_(0.05 * torch.randn(layer.lora_B.shape, generator=g, dtype=layer.lora_B.dtype))
    return model


def test_layouts(tiny):
    _, tok = tiny
    old, new = _batches(tok, _examples(), examples=10)
    assert old.rows == 30 and new.rows == 10 and new.shared and not old.shared
    assert (
        new.labels.shape == (10, 3)
        and new.labels[0, 2] != -100
        and new.labels[1, 2] == -100
        and (new.labels[8:] == -100).all()
    )
    assert new.input_ids.shape[1] == old.input_ids.shape[1] - 1  # the prompt alone: one column shorter
    assert torch.equal(old.gold, new.gold) and new.gold[-2:].tolist() == [-100, -100]
    # auto: an engine with free shapes shares exactly when every candidate is one token
    enc = Encoder(tok)
    groups = [[enc(e.prompt, c) for c in e.candidates] for e in _examples()]
    auto = collate_choices(groups, [0] * 8, 3, tok.pad_token_id, 64)
    assert auto.shared
    long = [[enc("Q:", " Yes"), enc("Q:", " Maybe")]]
    assert len(long[0][1].answer_ids) > 1
    assert not collate_choices(long, [0], 2, tok.pad_token_id, 64).shared
    with pytest.raises(MobizoError, match="one token each"):
        collate_choices(long, [0], 2, tok.pad_token_id, 64, shared=True)


@pytest.mark.parametrize("estimator,q,data_mode", [("prge", 2, "repeat"), ("mezo", 1, "repeat"), ("prge", 2, "split")])
def test_zo_step_losses_g_and_trajectory_match(tiny, estimator, q, data_mode):
    model, tok = tiny
    model = _adapted(model).double()
    old, new = _batches(tok, _examples())
    runs = []
    for batch in (old, new):
        m = copy.deepcopy(model)
        st = ZOStep(m, ZOConfig(estimator, q, seed=5, data_mode=data_mode, objective="choice-sum", choices=3))
        out = []
        with torch.no_grad():
            for s in range(1, 5):
                losses, g = st(
                    batch.input_ids,
                    batch.attention_mask,
                    batch.labels,
                    torch.tensor(s),
                    torch.tensor(0.5),
                    torch.tensor(1e-2),
                    batch.gold,
                    shared=batch.shared,
                )
                out.append((losses, g))
        runs.append((out, [layer.lora_B.clone() for _, layer in lora_layers(m)]))
    (o_steps, o_b), (n_steps, n_b) = runs
    # The shared step reads only the candidates' logits (the objective's softmax over the candidates
    # cancels the vocabulary's normalizer): equal to float64 rounding (~1e-16), which Llama's float32
    # RMSNorm/rotary casts can round up to ~1e-10 in a later step's loss once the Bs differ at 1e-14.
    for (lo, go), (ln, gn) in zip(o_steps, n_steps):
        torch.testing.assert_close(ln, lo, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(gn, go, rtol=1e-7, atol=1e-7)
    assert any(g.abs().max() > 1e-3 for _, g in o_steps)
    for a, b in zip(o_b, n_b):
        torch.testing.assert_close(b, a, rtol=0, atol=2e-8)  # |B| ~ 0.05


@pytest.mark.parametrize("objective", ["choice-sum", "choice-mean"])
def test_fo_loss_and_gradients_match(tiny, objective):
    from mobizo.mplora import make_trainable

    model, tok = tiny
    model = _adapted(model).double()
    make_trainable(model)
    old, new = _batches(tok, _examples())
    loss = AnswerLoss(model, objective, 3)
    grads = []
    for batch in (old, new):
        model.zero_grad(set_to_none=True)
        value = loss(batch.input_ids, batch.attention_mask, batch.labels, batch.gold, shared=batch.shared)
        value.backward()
        grads.append((value.detach(), [layer.lora_B.grad.clone() for _, layer in lora_layers(model)]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-10, atol=1e-12)
    # float64 model, but Llama's RMSNorm and rotary run in float32: the per-candidate rows' gradients,
    # summed, and the one shared row's agree to float32 rounding
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5 * a.abs().max().item())
    assert all(a.abs().max() > 0 for a in grads[0][1])


class _PerCandidate:
    """The eager engine without ``score_choices``: eval scores one row per (example, candidate)."""

    def __init__(self, engine):
        self.engine, self.shapes, self.name = engine, engine.shapes, "per-candidate"

    def score(self, batch):
        return self.engine.score(batch)


@pytest.mark.parametrize("kind", ["classification", "multiple_choice"])
def test_eval_metrics_match(tiny, kind):
    from mobizo.engines.eager import EagerEngine
    from mobizo.evaluation import can_share_prompt, evaluate

    model, tok = tiny
    model = _adapted(model)
    enc = Encoder(tok)
    exs = _examples() * 5
    engine = EagerEngine(model, None)
    assert can_share_prompt(engine, enc, exs) and not can_share_prompt(_PerCandidate(engine), enc, exs)
    a = evaluate(engine, kind, exs, enc, tok.pad_token_id, 64, batch_size=7)
    b = evaluate(_PerCandidate(engine), kind, exs, enc, tok.pad_token_id, 64, batch_size=7)
    assert a["accuracy"] == b["accuracy"] and a["n"] == b["n"] == 40
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["examples_per_second"] > 0 and a["seconds"] > 0
    # prompts truncated to --max-length keep the same tokens in both layouts
    a = evaluate(engine, kind, exs, enc, tok.pad_token_id, 6, batch_size=7)
    b = evaluate(_PerCandidate(engine), kind, exs, enc, tok.pad_token_id, 6, batch_size=7)
    assert a["truncated"] == b["truncated"] > 0 and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def _head_users(module, args) -> set:
    """The ops that read the LM head's weight in ``module``'s exported graph."""
    ep = torch.export.export(module, args, strict=False)
    sig = ep.graph_signature
    users = set()
    for node in ep.graph.nodes:
        if (sig.inputs_to_parameters.get(node.name) or "").endswith("lm_head.weight"):
            users |= {str(u.target) for u in node.users}
    return users


def test_the_training_step_reads_only_the_candidates_rows_of_the_lm_head(tiny):
    """The shared step needs the candidates' logits only: in the exported train step the LM head is a
    gather of 2-3 rows (nothing vocabulary-sized for XNNPACK to pack), while eval's score still
    projects to the whole vocabulary (its loss is -log p over it). A quantized head, whose rows are not
    plain slices, falls back to the full logits with the same loss."""
    from mobizo.engines.executorch.export import ScoreMethod
    from mobizo.quantize import quantize_base
    from mobizo.step import choice_losses, objective_loss

    model, tok = tiny
    _old, new = _batches(tok, _examples())
    scalars = (torch.tensor(1), torch.tensor(0.5), torch.tensor(1e-2))
    step = ZOStep(
        _adapted(copy.deepcopy(model)), ZOConfig("prge", 2, objective="choice-sum", choices=3), shared_prompt=True
    )
    assert _head_users(step, (new.input_ids, new.attention_mask, new.labels, *scalars, new.gold)) == {
        "aten.embedding.default"
    }
    score = ScoreMethod(step.model, shared_prompt=True)
    assert "aten.linear.default" in _head_users(score, (new.input_ids, new.attention_mask, new.labels))

    def loss(m, normalized):
        with torch.no_grad():
            s, c = choice_losses(m, new.input_ids, new.attention_mask, new.labels, normalized)
        return objective_loss(s[None].reshape(1, -1), c.reshape(1, -1), new.gold[None], "choice-sum", 3)

    quantized = _adapted(quantize_base(copy.deepcopy(model), "8da8w", embeddings=True))
    for m in (step.model, quantized):
        torch.testing.assert_close(loss(m, False), loss(m, True), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(loss(quantized, False), loss(step.model, False))  # the quantized head ran
