import pytest
import torch
from torch import nn

from mobizo.errors import MobizoError
from mobizo.mplora import MPLoRALinear, adapter_state, inject, load_adapter_state, lora_layers


def test_zero_b_is_the_base_layer_and_copies_match_per_copy_forward():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = MPLoRALinear(base, rank=4, alpha=8, generator=torch.Generator().manual_seed(0))
    x = torch.randn(6, 5, 16)
    torch.testing.assert_close(layer(x), base(x))
    copies = torch.randn(3, 12, 4)
    layer.copies = copies
    out = layer(x)  # 3 copies x 2 rows, copy-major
    layer.copies = None
    for c in range(3):
        layer.lora_B.copy_(copies[c])
        torch.testing.assert_close(out[2 * c : 2 * c + 2], layer(x[2 * c : 2 * c + 2]), rtol=1e-5, atol=1e-6)
        manual = base(x[2 * c : 2 * c + 2]) + 2.0 * (x[2 * c : 2 * c + 2] @ layer.lora_A.T @ copies[c].T)
        torch.testing.assert_close(out[2 * c : 2 * c + 2], manual, rtol=1e-5, atol=1e-5)


def test_injection_freezes_base_and_is_seeded(tiny_pair):
    import copy

    m1, m2 = copy.deepcopy(tiny_pair[0]), copy.deepcopy(tiny_pair[0])
    names = inject(m1, None, 8, 16, seed=5)  # llama default: q_proj, v_proj
    inject(m2, None, 8, 16, seed=5)
    assert names and all(n.endswith(("q_proj", "v_proj")) for n in names)
    assert not any(p.requires_grad for p in m1.parameters())
    s1, s2 = adapter_state(m1), adapter_state(m2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert all(torch.count_nonzero(s1[k]) == 0 for k in s1 if k.endswith("lora_B"))
    m3 = copy.deepcopy(tiny_pair[0])
    inject(m3, None, 8, 16, seed=6)
    assert not torch.equal(adapter_state(m3)[names[0] + ".lora_A"], s1[names[0] + ".lora_A"])


def test_bad_targets_and_adapter_shapes(tiny_pair):
    import copy

    with pytest.raises(MobizoError, match="matched no layer"):
        inject(copy.deepcopy(tiny_pair[0]), ["nope"], 8, 16, 0)
    with pytest.raises(MobizoError, match="nn.Linear"):
        inject(copy.deepcopy(tiny_pair[0]), ["embed_tokens"], 8, 16, 0)
    m = copy.deepcopy(tiny_pair[0])
    inject(m, None, 8, 16, 0)
    state = adapter_state(m)
    key = next(k for k in state if k.endswith("lora_B"))
    state[key] = torch.zeros(3, 3)
    with pytest.raises(MobizoError, match="shape"):
        load_adapter_state(m, state)
    with pytest.raises(MobizoError, match="does not fit"):
        load_adapter_state(m, {"x.lora_A": torch.zeros(1)})
    assert len(lora_layers(m)) == 4
