import math

import pytest
import torch

from halo_embed import HALOLoss, HALOModel, geometry
from reference_halo import ReferenceHALOLoss


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Max-norm relative error ``|a - b|_inf / |b|_inf`` (0 when both are zero)."""
    scale = ref.abs().max().item()
    diff = (ours.double() - ref.double()).abs().max().item()
    return diff if scale == 0 else diff / scale


def make_batch(n=24, d=16, k=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(n, d, generator=g, dtype=dtype)
    cen = torch.randn(k, d, generator=g, dtype=dtype)
    cen = cen - cen.mean(0, keepdim=True)
    target = torch.randint(0, k, (n,), generator=g)
    return pos, target, cen


def run(loss_fn, pos, target, cen, weights=None):
    """Loss, true logits, and gradients of embeddings, centroids and gamma."""
    pos = pos.clone().requires_grad_(True)
    cen = cen.clone().requires_grad_(True)
    loss, true = loss_fn(pos, target, cen, torch.arange(cen.shape[0]))
    # A random weighting also exercises the gradient of the returned logits.
    total = loss if loss.dim() == 0 else (loss * weights).sum()
    total = total + 0.01 * (true * torch.linspace(-1, 1, true.numel()).view_as(true)).sum()
    total.backward()
    return loss.detach(), true.detach(), pos.grad, cen.grad, loss_fn.gamma.grad


PARITY_CASES = [
    (distill, ls, reduction)
    for distill in (True, False)
    for ls in (0.05, 0.1, 0.3)
    for reduction in ("mean", "none")
] + [(False, 0.0, "mean"), (False, 0.0, "none")]


@pytest.mark.parametrize("distill,ls,reduction", PARITY_CASES)
@pytest.mark.parametrize("d,k", [(2, 3), (16, 7), (10, 10), (64, 100)])
def test_matches_reference_fp32(distill, ls, reduction, d, k):
    pos, target, cen = make_batch(n=32, d=d, k=k, seed=d + k)
    weights = torch.rand(32, generator=torch.Generator().manual_seed(1))
    ours = HALOLoss(d, k, distill=distill, label_smoothing=ls, reduction=reduction)
    ref = ReferenceHALOLoss(d, k, distill=distill, label_smoothing=ls, reduction=reduction)
    assert ours.abstain_bias == ref.abstain_bias
    assert torch.equal(ours.gamma.detach(), ref.gamma.detach())
    for a, b in zip(run(ours, pos, target, cen, weights), run(ref, pos, target, cen, weights)):
        assert a.dtype == torch.float32
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("implementation", ["fused", "faithful"])
@pytest.mark.parametrize("distill,ls,reduction", PARITY_CASES)
def test_fp32_error_is_the_reference_own_at_d2_k3(implementation, distill, ls, reduction):
    """Against the reference evaluated in float64, over 20 random batches at N, D, K = 5, 2, 3: every output
    within 1e-5 of its largest entry, except where the reference's own fp32 evaluation is off by more. The
    gradient of gamma is one number summed from N x K terms that cancel, so any fp32 evaluation can lose
    digits there (the reference's own fp32 reaches 8e-6 over 200 batches; experiments/reference_agreement.py);
    twice the reference's own error is the bar where it exceeds 5e-6."""
    for seed in range(20):
        pos, target, cen = make_batch(n=5, d=2, k=3, seed=seed)
        weights = torch.rand(5, generator=torch.Generator().manual_seed(seed))
        options = {"distill": distill, "label_smoothing": ls, "reduction": reduction}
        reference_module = ReferenceHALOLoss(2, 3, **options)
        exact_module = ReferenceHALOLoss(2, 3, **options, dtype=torch.float64)
        with torch.no_grad():  # both from the fp32-rounded gamma
            exact_module.gamma.copy_(reference_module.gamma)
        exact = run(exact_module, pos.double(), target, cen.double(), weights.double())
        reference = run(reference_module, pos, target, cen, weights)
        ours = run(HALOLoss(2, 3, **options, implementation=implementation), pos, target, cen, weights)
        for got, own, truth in zip(ours, reference, exact):
            assert rel_err(got.double(), truth) <= max(1e-5, 2 * rel_err(own.double(), truth)), seed


@pytest.mark.parametrize("distill", [True, False])
def test_matches_reference_fp64_gradients(distill):
    """In float64 our analytic gradients equal the reference's to ~1e-12."""
    pos, target, cen = make_batch(n=12, d=8, k=5, seed=3, dtype=torch.float64)
    ours = HALOLoss(8, 5, distill=distill).double()
    ref = ReferenceHALOLoss(8, 5, distill=distill, dtype=torch.float64)
    with torch.no_grad():  # both start from the fp32-rounded gamma
        ref.gamma.copy_(ours.gamma)
    for a, b in zip(run(ours, pos, target, cen), run(ref, pos, target, cen)):
        assert a.dtype == torch.float64
        assert rel_err(a, b) <= 1e-12


def test_gradcheck_float64_label_smoothing():
    """Full gradcheck (embeddings, centroids, gamma) where the targets are constant."""
    loss_fn = HALOLoss(6, 4, distill=False, label_smoothing=0.2).double()
    pos, target, cen = make_batch(n=5, d=6, k=4, seed=4, dtype=torch.float64)
    gamma = loss_fn.gamma.detach().clone().requires_grad_(True)

    def f(p, c, g):
        return torch.func.functional_call(loss_fn, {"gamma": g}, (p, target, c))

    assert torch.autograd.gradcheck(f, (pos.requires_grad_(True), cen.requires_grad_(True), gamma))


def test_gradcheck_geometry_float64():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    gamma = torch.tensor([1.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: geometry.shifted_logits(a, b, s), (x, c, gamma))
    assert torch.autograd.gradcheck(
        lambda a, b, s: geometry.true_logits(geometry.shifted_logits(a, b, s), a, s) - 10.0, (x, c, gamma)
    )
    r = torch.rand(5, generator=g, dtype=torch.float64).add(0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: geometry.radial_nll(t, 6), (r,))


# --------------------------------------------------------------------------
# Where the reference is broken
# --------------------------------------------------------------------------


@pytest.mark.parametrize("distill", [True, False])
def test_embedding_on_its_centroid_is_finite(distill):
    pos, target, cen = make_batch(n=6, d=8, k=3)
    pos[0] = cen[target[0]]
    ref_loss, *_ = run(ReferenceHALOLoss(8, 3, distill=distill), pos, target, cen)
    assert not torch.isfinite(ref_loss)  # the defect this port fixes
    loss, true, g_pos, g_cen, g_gamma = run(HALOLoss(8, 3, distill=distill), pos, target, cen)
    for t in (loss, true, g_pos, g_cen, g_gamma):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_fp32(dtype):
    pos, target, cen = make_batch(n=16, d=32, k=10)
    pos_h, cen_h = pos.to(dtype), cen.to(dtype)
    loss_fn = HALOLoss(32, 10)
    loss, true = loss_fn(pos_h, target, cen_h)
    assert loss.dtype == torch.float32 and true.dtype == torch.float32
    expected, expected_true = loss_fn(pos_h.float(), target, cen_h.float())
    assert torch.equal(loss, expected) and torch.equal(true, expected_true)
    p = pos_h.clone().requires_grad_(True)
    loss_fn(p, target, cen_h)[0].backward()
    assert p.grad.dtype == dtype and torch.isfinite(p.grad.float()).all()


def test_autocast_does_not_lower_precision():
    pos, target, cen = make_batch(n=16, d=32, k=10)
    loss_fn = HALOLoss(32, 10)
    expected, expected_true = loss_fn(pos, target, cen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, true = loss_fn(pos, target, cen)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, expected) and torch.equal(true, expected_true)


@pytest.mark.parametrize("distill", [True, False])
def test_permuted_centroid_targets(distill):
    """Centroid j carries label perm[j]: same loss as centroids stored in label order."""
    pos, target, cen = make_batch(n=20, d=8, k=6, seed=7)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    shuffled = torch.empty_like(cen)
    shuffled[torch.arange(6)] = cen[perm]  # centroid j is class perm[j]
    loss_fn = HALOLoss(8, 6, distill=distill, reduction="none")
    loss_sorted, true_sorted = loss_fn(pos, target, cen)
    loss_perm, true_perm = loss_fn(pos, target, shuffled, perm)
    torch.testing.assert_close(loss_perm, loss_sorted, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(true_perm, true_sorted[:, perm], rtol=1e-6, atol=1e-6)


def test_sparse_label_set():
    """Labels need not be 0..K-1 when centroid_targets says which label each centroid has."""
    pos, target, cen = make_batch(n=10, d=8, k=3, seed=8)
    labels = torch.tensor([10, 42, 7])
    loss_fn = HALOLoss(8, 3, reduction="none")
    a, _ = loss_fn(pos, labels[target], cen, labels)
    b, _ = loss_fn(pos, target, cen)
    torch.testing.assert_close(a, b)


def test_zero_label_smoothing_with_distill_is_one_hot():
    """The reference divides by zero; we take the limit (hard targets), equal where it is finite."""
    pos, target, cen = make_batch(n=10, d=8, k=4, seed=9)
    ours, _ = HALOLoss(8, 4, distill=True, label_smoothing=0.0)(pos, target, cen)
    hard, _ = HALOLoss(8, 4, distill=False, label_smoothing=0.0)(pos, target, cen)
    ref, _ = ReferenceHALOLoss(8, 4, distill=True, label_smoothing=0.0)(pos, target, cen, torch.arange(4))
    assert torch.isfinite(ours)
    assert rel_err(ours, ref) <= 1e-6 and rel_err(ours, hard) <= 1e-6


def test_sum_reduction():
    pos, target, cen = make_batch(n=9, d=8, k=4)
    per_sample, _ = HALOLoss(8, 4, reduction="none")(pos, target, cen)
    total, _ = HALOLoss(8, 4, reduction="sum")(pos, target, cen)
    mean, _ = HALOLoss(8, 4, reduction="mean")(pos, target, cen)
    torch.testing.assert_close(total, per_sample.sum())
    torch.testing.assert_close(mean, per_sample.mean())


def test_learn_gamma_false_freezes_gamma():
    loss_fn = HALOLoss(8, 4, learn_gamma=False)
    assert not loss_fn.gamma.requires_grad
    pos, target, cen = make_batch(n=5, d=8, k=4)
    loss_fn(pos.requires_grad_(True), target, cen)[0].backward()
    assert loss_fn.gamma.grad is None


def test_state_dict_keys_match_reference():
    assert set(HALOLoss(8, 4).state_dict()) == {"gamma"}
    backbone = torch.nn.Linear(3, 8)
    assert set(HALOModel(backbone, 4, 8).state_dict()) == {"centroids", "model.weight", "model.bias"}


def test_model_centres_centroids_with_gradient():
    torch.manual_seed(0)
    model = HALOModel(torch.nn.Linear(3, 8), 5, 8)
    emb, cen = model(torch.randn(4, 3))
    assert emb.shape == (4, 8) and cen.shape == (5, 8)
    torch.testing.assert_close(cen.mean(0), torch.zeros(8), atol=1e-6, rtol=0)
    cen[0].sum().backward()
    # d(c_0 - mean c)/dc_j = delta_0j - 1/K
    expected = torch.full((5, 8), -1 / 5)
    expected[0] += 1
    torch.testing.assert_close(model.centroids.grad, expected)


def test_training_reduces_loss_and_separates_classes():
    """A few hundred steps on three Gaussian blobs: the loss falls and accuracy is perfect."""
    torch.manual_seed(0)
    means = torch.randn(3, 2) * 4
    y = torch.arange(3).repeat_interleave(50)
    x = means[y] + torch.randn(150, 2)
    model = HALOModel(torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)), 3, 8)
    loss_fn = HALOLoss(8, 3)
    opt = torch.optim.Adam(list(model.parameters()) + list(loss_fn.parameters()), lr=1e-2)
    first = None
    for _ in range(300):
        emb, cen = model(x)
        loss, true = loss_fn(emb, y, cen)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 2
    assert (true.argmax(1) == y).float().mean() == 1.0


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(emb_dims=1, num_classes=3), ValueError, "emb_dims must be >= 2, got 1"),
        (dict(emb_dims=8.0, num_classes=3), TypeError, "emb_dims must be an int"),
        (dict(emb_dims=8, num_classes=0), ValueError, "num_classes must be >= 1"),
        (dict(emb_dims=8, num_classes=3, reduction="avg"), ValueError, "reduction must be one of"),
        (dict(emb_dims=8, num_classes=3, label_smoothing=1.0), ValueError, "label_smoothing must be < 1"),
        (dict(emb_dims=8, num_classes=3, label_smoothing=-0.1), ValueError, "label_smoothing must be >= 0"),
        (dict(emb_dims=8, num_classes=3, distill=1), TypeError, "distill must be a bool"),
        (dict(emb_dims=8, num_classes=3, init_gamma=0.0), ValueError, "init_gamma must be a positive temperature, got 0.0"),
        (dict(emb_dims=8, num_classes=3, init_gamma=-2), ValueError, "init_gamma must be a positive temperature"),
        (dict(emb_dims=8, num_classes=3, init_gamma=float("nan")), ValueError, "init_gamma must be finite"),
        (dict(emb_dims=8, num_classes=3, init_gamma="2"), TypeError, "init_gamma must be a real number, got str"),
    ],
)
def test_constructor_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        HALOLoss(**kwargs)


def _bad_inputs():
    pos, target, cen = make_batch(n=4, d=8, k=3)
    nan_pos = pos.clone()
    nan_pos[1, 2] = float("nan")
    return [
        ((pos[0], target, cen), ValueError, r"embeddings must have 2 dimension\(s\) \(N, D\), got shape \(8,\)"),
        ((pos[:, :6], target, cen[:, :6]), ValueError, "embeddings has D=6 dimensions but the loss was built with emb_dims=8"),
        ((pos[:0], target[:0], cen), ValueError, r"embeddings must not be empty, got shape \(0, 8\)"),
        ((pos.long(), target, cen), TypeError, "embeddings must be a floating-point tensor"),
        ((pos.numpy(), target, cen), TypeError, "embeddings must be a torch.Tensor, got ndarray"),
        ((pos, target[:3], cen), ValueError, r"target must have one label per embedding, shape \(4,\), got \(3,\)"),
        ((pos, target.float(), cen), TypeError, "target must be an integer tensor"),
        ((pos, target.view(2, 2), cen), ValueError, r"target must have 1 dimension"),
        ((pos, target, cen[:2]), ValueError, r"centroids must have shape \(num_classes, emb_dims\) = \(3, 8\), got \(2, 8\)"),
        ((pos, torch.tensor([0, 1, 3, 2]), cen), ValueError, r"target has labels outside \[0, 3\): min 0, max 3"),
        ((pos, torch.tensor([0, -1, 2, 2]), cen), ValueError, r"target has labels outside \[0, 3\): min -1, max 2"),
        ((nan_pos, target, cen), ValueError, "embeddings contains NaN or inf"),
        ((pos, target, cen, torch.tensor([0, 1, 1])), ValueError, r"distinct label, got duplicates \[1\]"),
        ((pos, torch.tensor([0, 1, 5, 5]), cen, torch.tensor([0, 1, 2])), ValueError, r"not in centroid_targets\): \[5\]"),
        ((pos, target, cen, torch.tensor([0, 1])), ValueError, r"centroid_targets must have one label per centroid"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_forward_validation(case):
    args, error, match = _bad_inputs()[case]
    with pytest.raises(error, match=match):
        HALOLoss(8, 3)(*args)


def test_initial_constants_by_hand():
    # D=10, K=10, ls=0.1: r_target = 0.8, gamma0 = 20/1.2, t_ideal = gamma0 * 0.2 = 10/3,
    # margin = log(0.91 / 0.01) = log 91.
    loss_fn = HALOLoss(10, 10)
    assert math.isclose(loss_fn.temperature.item(), 50 / 3, rel_tol=1e-6)
    assert math.isclose(loss_fn.abstain_bias, 10 / 3 - math.log(91), rel_tol=1e-12)
    # D=4, K=3, ls=0: r_target = 0.5, gamma0 = 40/3, t_ideal = 20/3, margin = log(0.99 / (0.01/3)) = log 297.
    loss_fn = HALOLoss(4, 3, label_smoothing=0.0)
    assert math.isclose(loss_fn.temperature.item(), 40 / 3, rel_tol=1e-6)
    assert math.isclose(loss_fn.abstain_bias, 20 / 3 - math.log(297), rel_tol=1e-12)
    # D=512, K=1000, ls=0.3: gamma0 = 20 / (1 + 2/512), margin = log((0.7 + 0.0003) / 0.0003).
    loss_fn = HALOLoss(512, 1000, label_smoothing=0.3)
    gamma0 = 20 / (1 + 2 / 512)
    assert math.isclose(loss_fn.temperature.item(), gamma0, rel_tol=1e-6)
    assert math.isclose(loss_fn.abstain_bias, gamma0 * 2 / 512 - math.log(0.7003 / 0.0003), rel_tol=1e-12)


@pytest.mark.parametrize("init_gamma", [0.5, 2.0, 25.0])
def test_init_gamma_sets_only_the_starting_temperature(init_gamma):
    """The start is ``init_gamma`` (below and above softplus's identity range); the abstain bias stays the reference's."""
    loss_fn = HALOLoss(10, 10, init_gamma=init_gamma)
    assert math.isclose(loss_fn.temperature.item(), init_gamma, rel_tol=1e-6)
    assert loss_fn.abstain_bias == HALOLoss(10, 10).abstain_bias
    assert loss_fn.init_gamma == init_gamma and HALOLoss(10, 10).init_gamma is None


@pytest.mark.parametrize("implementation,chunk_size", [("faithful", None), ("fused", None), ("fused", 5)])
@pytest.mark.parametrize("distill", [True, False])
def test_init_gamma_matches_the_reference_at_that_temperature(implementation, chunk_size, distill):
    """With ``init_gamma`` every implementation equals the reference whose gamma is set to the same value."""
    pos, target, cen = make_batch(n=16, d=10, k=10, seed=5)
    ours = HALOLoss(10, 10, distill=distill, init_gamma=2.0, implementation=implementation, chunk_size=chunk_size)
    ref = ReferenceHALOLoss(10, 10, distill=distill)
    with torch.no_grad():
        ref.gamma.copy_(ours.gamma)
    results = []
    for loss_fn in (ours, ref):
        p, c = pos.clone().requires_grad_(True), cen.clone().requires_grad_(True)
        loss, _ = loss_fn(p, target, c, torch.arange(10))  # the chunked loss returns no true logits
        loss.backward()
        results.append((loss.detach(), p.grad, c.grad, loss_fn.gamma.grad))
    for a, b in zip(*results):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) <= 1e-5


def test_init_gamma_trains_and_resumes():
    """A loss started at ``init_gamma`` learns its temperature, and its state dict restores it exactly."""
    torch.manual_seed(0)
    model = HALOModel(torch.nn.Linear(6, 4), 3, 4)
    loss_fn = HALOLoss(4, 3, init_gamma=1.5)
    optimizer = torch.optim.SGD([*model.parameters(), *loss_fn.parameters()], lr=0.1)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    for _ in range(5):
        loss, _ = loss_fn(*model(x)[:1], y, model(x)[1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert math.isfinite(loss.item()) and loss_fn.temperature.item() != pytest.approx(1.5)
    restored = HALOLoss(4, 3)  # built with the default start, then loaded
    restored.load_state_dict(loss_fn.state_dict())
    assert torch.equal(restored.gamma, loss_fn.gamma)
