import math

import pytest
import torch

from halo_embed import geometry


def test_shifted_logits_by_hand():
    # D = 2, x = (1, 0), c_1 = x, c_2 = (0, 1), g = 1:
    # shifted_j = (|x|^2 - |x - c_j|^2) / D = (1 - 0)/2, (1 - 2)/2.
    x = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    g = torch.tensor([1.0])
    shifted = geometry.shifted_logits(x, c, g)
    torch.testing.assert_close(shifted, torch.tensor([[0.5, -0.5]]))
    torch.testing.assert_close(geometry.true_logits(shifted, x, g), torch.tensor([[0.0, -1.0]]))
    torch.testing.assert_close(
        geometry.with_abstain(shifted, 0.25), torch.tensor([[0.5, -0.5, 0.25]])
    )
    assert not geometry.abstain_mask(shifted, 0.25).item()
    assert geometry.abstain_mask(shifted, 0.75).item()


@pytest.mark.parametrize("d", [2, 7, 128])
def test_shifted_logit_identity(d):
    """shifted = g * (|x|^2 - |x - c|^2) / D, checked against explicit pairwise distances."""
    g = torch.Generator().manual_seed(d)
    x = torch.randn(9, d, generator=g, dtype=torch.float64) * 3
    c = torch.randn(5, d, generator=g, dtype=torch.float64)
    gamma = torch.tensor([2.5], dtype=torch.float64)
    explicit = gamma * ((x**2).sum(1, keepdim=True) - torch.cdist(x, c) ** 2) / d
    torch.testing.assert_close(geometry.shifted_logits(x, c, gamma), explicit)
    torch.testing.assert_close(geometry.mean_squared_distances(x, c), torch.cdist(x, c) ** 2 / d)
    # the fused loss's one-addmm form
    centroid_sq = geometry.mean_square(c).squeeze(1)
    torch.testing.assert_close(geometry.shifted_logits_addmm(x, c, 2.5, centroid_sq), explicit)
    torch.testing.assert_close(
        geometry.true_logits(geometry.shifted_logits(x, c, gamma), x, gamma),
        -gamma * torch.cdist(x, c) ** 2 / d,
    )


def test_nearest_centroid_is_top_logit():
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(200, 16, generator=g), torch.randn(30, 16, generator=g)
    shifted = geometry.shifted_logits(x, c, torch.tensor([3.0]))
    assert torch.equal(shifted.argmax(1), torch.cdist(x, c).argmin(1))


@pytest.mark.parametrize(
    "d,k,ls,gamma0,bias",
    [
        # r_target = 1 - 2/D; gamma0 = 20 / (2 - r_target); t_ideal = gamma0 * 2/D.
        (2, 10, 0.1, 10.0, 10.0 - math.log(0.91 / 0.01)),
        (10, 10, 0.1, 50 / 3, 10 / 3 - math.log(91)),
        (4, 3, 0.0, 40 / 3, 20 / 3 - math.log(0.99 / (0.01 / 3))),
        (100, 100, 0.2, 20 / 1.02, 20 / 1.02 * 0.02 - math.log((0.8 + 0.002) / 0.002)),
    ],
)
def test_initial_constants(d, k, ls, gamma0, bias):
    assert math.isclose(geometry.initial_gamma(d), gamma0, rel_tol=1e-12)
    assert math.isclose(geometry.abstain_bias(d, k, ls), bias, rel_tol=1e-12)
    raw = geometry.inverse_softplus(gamma0)
    assert math.isclose(torch.nn.functional.softplus(torch.tensor(raw, dtype=torch.float64)).item(), gamma0, rel_tol=1e-12)


def test_inverse_softplus_identity_above_20():
    assert geometry.inverse_softplus(25.0) == 25.0


def test_radial_nll_minimum_and_floor():
    d = 16
    r = torch.linspace(0.05, 3.0, 20001, dtype=torch.float64)
    best = r[geometry.radial_nll(r, d).argmin()].item()
    assert abs(best - geometry.target_radius_sq(d)) < 1e-3
    zero = torch.zeros(3, requires_grad=True)
    value = geometry.radial_nll(zero, d)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(zero.grad).all()


def test_teacher_free_targets():
    true = torch.tensor([[0.0, -1.0, -2.0], [-0.5, -0.5, 0.0]])
    is_target = torch.tensor([[False, True, False], [True, False, False]])
    probs = geometry.teacher_free_targets(true, is_target, 0.5)
    # row 0: logits (0/0.5, 0, -2/0.5) = (0, 0, -4)
    expected0 = torch.softmax(torch.tensor([0.0, 0.0, -4.0]), 0)
    torch.testing.assert_close(probs[0], expected0)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    hard = geometry.teacher_free_targets(true, is_target, 0.0)
    torch.testing.assert_close(hard, is_target.float())


def test_smoothed_targets():
    is_target = torch.zeros(2, 4, dtype=torch.bool)
    is_target[0, 2] = is_target[1, 0] = True
    probs = geometry.smoothed_targets(is_target, 0.2)
    torch.testing.assert_close(probs[0], torch.tensor([0.05, 0.05, 0.85, 0.05]))
    padded = geometry.pad_abstain_target(probs)
    assert padded.shape == (2, 5) and torch.all(padded[:, -1] == 0)


def test_radial_nll_and_grad_match_radial_nll_and_autograd():
    tiny = torch.finfo(torch.float32).tiny
    r = torch.tensor([0.0, tiny / 2, tiny, 1e-6, 0.3, 0.8, 1.0, 4.0], dtype=torch.float64, requires_grad=True)
    for d in (2, 10, 512):
        value = geometry.radial_nll(r, d)
        (expected,) = torch.autograd.grad(value.sum(), r)
        nll, grad = geometry.radial_nll_and_grad(r.detach(), d)
        assert torch.allclose(nll, value.detach(), rtol=1e-12, atol=0)
        assert torch.allclose(grad, expected, rtol=1e-12, atol=0)


def test_abstention_possible_bound():
    """Below g * mean_square(c) = -bias no input abstains; above it the origin does."""
    from halo_embed.inference import HALOHead

    torch.manual_seed(0)
    c = torch.randn(150, 384)
    c = c - c.mean(0)
    c = c / c.pow(2).mean().sqrt()  # centred, unit mean square
    bias = geometry.abstain_bias(384, 150, 0.1)  # -7.1
    low, high = HALOHead(c, 2.5, bias), HALOHead(c, 20.0, bias)
    assert not low.can_abstain and high.can_abstain
    # probes where the sink has its best chances: the origin, tiny and huge inputs, away from every centroid
    probes = torch.cat([torch.zeros(1, 384), 1e-3 * torch.randn(64, 384), -c[:32] * 50, torch.randn(64, 384) * 30])
    assert not low(probes).abstained.any()
    assert high(torch.zeros(1, 384)).abstained.all()
    # the bound's edge: temperature * mean square against -bias
    m = float(c.double().pow(2).mean())
    assert geometry.abstention_possible(c, -bias / m + 1e-3, bias)
    assert not geometry.abstention_possible(c, -bias / m - 1e-3, bias)
    # centroids off-centre: an input far on the side away from all of them abstains even at a low temperature
    shifted = c + 3.0
    assert geometry.abstention_possible(shifted, 2.5, bias)
    assert HALOHead(shifted, 2.5, bias)(-100 * torch.ones(1, 384)).abstained.all()
    with pytest.raises(ValueError, match="temperature must be the effective"):
        geometry.abstention_possible(c, 0.0, bias)
    with pytest.raises(ValueError, match="centroids must have 2 dimension"):
        geometry.abstention_possible(c[0], 2.5, bias)
