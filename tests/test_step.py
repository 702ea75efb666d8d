import copy

import pytest
import torch

from mobizo.errors import MobizoError
from mobizo.mplora import inject, lora_layers
from mobizo.step import AnswerLoss, ZOConfig, ZOStep, forward_plan


def _adapted(model, seed=0):
    inject(model, ["q_proj", "v_proj"], 4, 8.0, seed)
    # start from a non-zero B so perturbations interact with a real adapter
    g = torch.Generator().manual_seed(1)
    for _, layer in lora_layers(model):
        layer.lora_B.copy_(0.05 * torch.randn(layer.lora_B.shape, generator=g, dtype=layer.lora_B.dtype))
    return model


def _run(model, estimator, q, batch, steps=3, lr=0.05, eps=1e-2, data_mode="repeat", dtype=torch.float64):
    m = copy.deepcopy(model).to(dtype)
    st = ZOStep(m, ZOConfig(estimator, q, seed=11, data_mode=data_mode))
    gs = []
    with torch.no_grad():
        for s in range(1, steps + 1):
            _, g = st(
                batch.input_ids,
                batch.attention_mask,
                batch.labels,
                torch.tensor(s),
                torch.tensor(lr),
                torch.tensor(eps),
            )
            gs.append(g)
    return torch.stack(gs), [layer.lora_B.clone() for _, layer in lora_layers(m)]


@pytest.mark.parametrize("q", [1, 4])
@pytest.mark.parametrize("data_mode", ["repeat", "split"])
def test_estimators_same_update_and_trajectory(tiny, synthetic_batch, q, data_mode):
    model = _adapted(tiny[0])
    ref_g, ref_b = _run(model, "prge", q, synthetic_batch, data_mode=data_mode)
    for est in ("prge-outer", "mezo"):
        g, b = _run(model, est, q, synthetic_batch, data_mode=data_mode)
        torch.testing.assert_close(g, ref_g, rtol=1e-9, atol=1e-9)
        for x, y in zip(b, ref_b):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    # fp32 agrees up to float rounding too
    g32, _b32 = _run(model, "mezo", q, synthetic_batch, data_mode=data_mode, dtype=torch.float32)
    torch.testing.assert_close(g32.double(), ref_g, rtol=2e-3, atol=2e-3)


def test_step_matches_textbook_rge(tiny, synthetic_batch):
    """g_i = (L(B+eps z_i) - L(B-eps z_i)) / 2eps on the plain (unbatched) model; B -= lr mean g_i z_i."""
    model = _adapted(tiny[0]).double()
    q, step = 3, 5
    # the engines hand lr/eps to the step as float32 tensors: use exactly those values here
    lr, eps = float(torch.tensor(0.1)), float(torch.tensor(1e-3))
    st = ZOStep(copy.deepcopy(model), ZOConfig("prge", q, seed=3))
    zs = st.noise(torch.tensor(step))
    layers = [layer for _, layer in lora_layers(model)]
    b0 = [layer.lora_B.clone() for layer in layers]
    loss = AnswerLoss(model)
    b = synthetic_batch
    expected_g = []
    with torch.no_grad():
        for i in range(q):
            vals = []
            for sign in (1, -1):
                for layer, z, base in zip(layers, zs, b0):
                    layer.lora_B.copy_(base + sign * eps * z[i])
                vals.append(loss(b.input_ids, b.attention_mask, b.labels))
            expected_g.append((vals[0] - vals[1]) / (2 * eps))
        losses, g = st(b.input_ids, b.attention_mask, b.labels, torch.tensor(step), torch.tensor(lr), torch.tensor(eps))
    expected_g = torch.stack(expected_g)
    torch.testing.assert_close(g, expected_g, rtol=1e-7, atol=1e-9)
    assert losses.shape == (2, q)
    for (_, layer), z, base in zip(lora_layers(st.model), zs, b0):
        want = base - torch.tensor(lr, dtype=torch.float64) * (expected_g.reshape(-1, 1, 1) * z).mean(0)
        torch.testing.assert_close(layer.lora_B, want, rtol=1e-9, atol=1e-12)


def test_q1_mezo_is_sequential_two_pass():
    assert forward_plan("mezo", 1) == [[(0, 1.0)], [(0, -1.0)]]
    assert forward_plan("prge", 2) == [[(0, 1.0), (1, 1.0), (0, -1.0), (1, -1.0)]]
    assert forward_plan("prge-outer", 2) == [[(0, 1.0), (1, 1.0)], [(0, -1.0), (1, -1.0)]]


def test_guard_skips_bad_steps_in_graph(tiny, synthetic_batch):
    model = _adapted(tiny[0])
    b = synthetic_batch
    before = [layer.lora_B.clone() for _, layer in lora_layers(model)]
    st = ZOStep(model, ZOConfig("prge", 2, seed=0, max_grad=1e-9))
    with torch.no_grad():
        _, g = st(b.input_ids, b.attention_mask, b.labels, torch.tensor(1), torch.tensor(0.1), torch.tensor(1e-2))
        assert (g.abs() > 1e-9).any()
        st2 = ZOStep(model, ZOConfig("prge", 2, seed=0))
        losses, _ = st2(
            b.input_ids, b.attention_mask, b.labels, torch.tensor(1), torch.tensor(0.1), torch.tensor(float("inf"))
        )
    assert not torch.isfinite(losses).all()
    for x, (_, layer) in zip(before, lora_layers(model)):
        assert torch.equal(x, layer.lora_B)


def test_bad_configs_are_clear_errors():
    with pytest.raises(MobizoError, match="queries must be >= 1"):
        ZOConfig("prge", 0)
    with pytest.raises(MobizoError, match="unknown ZO estimator"):
        ZOConfig("sgd", 1)
    with pytest.raises(MobizoError, match="divisible"):
        ZOConfig("prge", 3, data_mode="split").check_batch(16)
