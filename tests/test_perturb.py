import torch

from mobizo.perturb import MASK32, direction_noise, gaussian, mix32, stream_key


def test_same_seed_same_noise_bitwise():
    a = direction_noise(7, 3, 0, (32, 8), 4)
    b = direction_noise(7, torch.tensor(3), 0, (32, 8), 4)
    assert torch.equal(a, b)


def test_seed_step_stream_and_direction_all_change_the_noise():
    base = direction_noise(7, 3, 0, (256, 64), 2)
    for other in (
        direction_noise(8, 3, 0, (256, 64), 2),
        direction_noise(7, 4, 0, (256, 64), 2),
        direction_noise(7, 3, 1, (256, 64), 2),
        direction_noise(2**40 + 7, 3, 0, (256, 64), 2),
    ):
        assert not torch.allclose(base, other)
        assert abs(torch.corrcoef(torch.stack([base.flatten(), other.flatten()]))[0, 1]) < 0.05
    # the two directions of one draw are different, uncorrelated vectors
    assert abs(torch.corrcoef(base.reshape(2, -1))[0, 1]) < 0.05


def test_noise_is_standard_normal():
    z = gaussian(stream_key(0, 1, 0), 200_000).double()
    assert abs(z.mean()) < 0.01
    assert abs(z.var() - 1) < 0.02
    # tails and symmetry of a normal: P(|z| > 1.96) ~ 5%, skew ~ 0, kurtosis ~ 3
    assert abs((z.abs() > 1.96).double().mean() - 0.05) < 0.005
    assert abs((z**3).mean()) < 0.03
    assert abs((z**4).mean() - 3) < 0.05
    assert torch.isfinite(z).all()


def test_mixer_stays_in_32_bits_without_overflow():
    x = torch.tensor([0, 1, MASK32, MASK32 - 1, 2**31, 123456789], dtype=torch.int64)
    h = mix32(x)
    assert ((h >= 0) & (h <= MASK32)).all()
    assert len(set(h.tolist())) == len(x)  # bijective on these inputs


def test_batched_layer_noise_is_per_layer_noise():
    from mobizo.perturb import layers_noise

    shapes = [(32, 8), (16, 8), (32, 8), (16, 8), (24, 4)]
    for step in (0, 9, torch.tensor(9)):
        got = layers_noise(5, step, shapes, 3)
        want = [direction_noise(5, step, i, s, 3) for i, s in enumerate(shapes)]
        for g, w in zip(got, want):
            assert g.shape == w.shape
            torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
