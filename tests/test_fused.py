"""The fused and chunked paths give the faithful computation's numbers (loss, true logits, every gradient)."""

import pytest
import torch

from halo_embed import HALOLoss
from halo_embed.losses import PairedHALOLoss


def rel_err(a, b):
    scale = b.abs().max().item()
    diff = (a.double() - b.double()).abs().max().item()
    return diff if scale == 0 else diff / scale


def batch(n=40, d=12, k=9, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype) * 1.3
    c = torch.randn(k, d, generator=g, dtype=dtype)
    return x, c, torch.randint(0, k, (n,), generator=g)


def grads(loss_fn, x, y, c, use_true, upstream_seed=1):
    x = x.clone().requires_grad_(True)
    c = c.clone().requires_grad_(True)
    loss, true = loss_fn(x, y, c)
    g = torch.Generator().manual_seed(upstream_seed)
    total = loss if loss.dim() == 0 else (loss * torch.rand(loss.shape, generator=g, dtype=loss.dtype)).sum()
    if use_true and true is not None:
        total = total + (true * torch.randn(true.shape, generator=g, dtype=true.dtype)).sum() * 0.1
    total.backward()
    return [loss.detach(), None if true is None else true.detach(), x.grad, c.grad, loss_fn.gamma.grad]


CASES = [(distill, ls, reduction) for distill in (True, False) for ls in (0.0, 0.1, 0.3)
         for reduction in ("mean", "sum", "none")]


@pytest.mark.parametrize("distill,ls,reduction", CASES)
@pytest.mark.parametrize("use_true", [False, True])
def test_fused_matches_faithful(distill, ls, reduction, use_true):
    x, c, y = batch()
    kwargs = dict(distill=distill, label_smoothing=ls, reduction=reduction)
    fused = grads(HALOLoss(12, 9, implementation="fused", **kwargs), x, y, c, use_true)
    faithful = grads(HALOLoss(12, 9, implementation="faithful", **kwargs), x, y, c, use_true)
    for a, b in zip(fused, faithful):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("distill", [True, False])
def test_chunked_matches_faithful(reduction, distill):
    x, c, y = batch(n=37, k=50)
    chunked = grads(HALOLoss(12, 50, chunk_size=8, reduction=reduction, distill=distill), x, y, c, False)
    faithful = grads(HALOLoss(12, 50, implementation="faithful", reduction=reduction, distill=distill), x, y, c, False)
    assert chunked[1] is None  # the N x K true logits are never built
    for i in (0, 2, 3, 4):
        assert rel_err(chunked[i], faithful[i]) <= 1e-5


def test_fused_float64_is_exact():
    x, c, y = batch(dtype=torch.float64)
    fused = grads(HALOLoss(12, 9).double(), x, y, c, True)
    faithful = grads(HALOLoss(12, 9, implementation="faithful").double(), x, y, c, True)
    for a, b in zip(fused, faithful):
        assert rel_err(a, b) <= 1e-12


def test_fused_with_permuted_centroid_targets_and_coincident_point():
    x, c, y = batch(n=12, k=5)
    x[0] = c[y[0]]  # exactly on its centroid: the clamp acts
    perm = torch.tensor([3, 0, 4, 1, 2])
    out = []
    for implementation in ("fused", "faithful"):
        xx, cc = x.clone().requires_grad_(True), c[perm].clone().requires_grad_(True)
        loss_fn = HALOLoss(12, 5, implementation=implementation)
        loss, true = loss_fn(xx, y, cc, perm)
        (loss + true.sum() * 0.01).backward()
        out.append([loss, true, xx.grad, cc.grad, loss_fn.gamma.grad])
    for a, b in zip(*out):
        assert torch.isfinite(a).all() and rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_paired_fused_matches_faithful(chunk_size):
    g = torch.Generator().manual_seed(2)
    images = torch.randn(10, 8, generator=g)
    texts = images + 0.7 * torch.randn(10, 8, generator=g)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 6])
    results = []
    for implementation, chunk in (("fused", chunk_size), ("faithful", None)):
        img, txt = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
        loss_fn = PairedHALOLoss(8, num_candidates=10, implementation=implementation, chunk_size=chunk)
        loss = loss_fn(img, txt, ids)
        loss.backward()
        results.append([loss, img.grad, txt.grad, loss_fn.gamma.grad])
    for a, b in zip(*results):
        assert rel_err(a, b) <= 1e-5


def test_chunk_size_validation():
    with pytest.raises(ValueError, match="chunk_size needs implementation='fused'"):
        HALOLoss(8, 3, implementation="faithful", chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        HALOLoss(8, 3, chunk_size=0)
    with pytest.raises(ValueError, match="implementation must be one of"):
        HALOLoss(8, 3, implementation="triton")


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_second_backward_through_retained_graph(chunk_size):
    # the first backward hands its precomputed gradients over; a second one must recompute them
    x, c, y = batch()
    results = []
    for implementation in ("fused", "faithful"):
        loss_fn = HALOLoss(12, 9, implementation=implementation, chunk_size=chunk_size if implementation == "fused" else None)
        xg, cg = x.clone().requires_grad_(True), c.clone().requires_grad_(True)
        loss, _ = loss_fn(xg, y, cg)
        loss.backward(retain_graph=True)
        first = [xg.grad.clone(), cg.grad.clone(), loss_fn.gamma.grad.clone()]
        (3.0 * loss).backward()
        results.append(first + [xg.grad, cg.grad, loss_fn.gamma.grad])
    for a, b in zip(*results):
        assert rel_err(a, b) <= 1e-5


def test_non_finite_loss_names_the_input():
    x, c, y = batch()
    loss_fn = HALOLoss(12, 9)
    bad = c.clone()
    bad[3, 2] = float("inf")
    with pytest.raises(ValueError, match="centroids contains NaN or inf"):
        loss_fn(x, y, bad)
    with pytest.raises(ValueError, match="not finite although its inputs are"):
        loss_fn(x * 1e30, y, c)


def test_no_grad_forward_gives_the_same_loss():
    # without a possible backward the fused path skips its gradient work; the value must not change
    x, c, y = batch()
    loss_fn = HALOLoss(12, 9)
    with torch.no_grad():
        cheap, _ = loss_fn(x, y, c)
    full, _ = loss_fn(x.clone().requires_grad_(True), y, c)
    assert rel_err(cheap, full.detach()) <= 1e-6


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-14), (torch.float32, 3e-6)])
@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_in_place_exp_matches_torch(dtype, rtol, scale):
    # the CPU form (exp2 of log2-scaled arguments) against torch.exp of the same values, down to the floor
    from halo_embed.losses.fused import EXP_FLOOR, _exp_

    z = torch.linspace(-EXP_FLOOR / scale, 0.0, 10_001, dtype=torch.float64).to(dtype).reshape(73, 137)
    block = z.clone()
    out = _exp_(block, scale)
    assert out.data_ptr() == block.data_ptr()
    reference = torch.exp(z.double() * scale)
    assert ((out.double() - reference).abs() / reference).max().item() <= rtol


@pytest.mark.parametrize("chunk_size", [None, 5])
@pytest.mark.parametrize("distill", [True, False])
def test_logits_far_below_the_maximum(distill, chunk_size):
    # rows whose logits span hundreds of units: the fused path floors exp's arguments at
    # EXP_FLOOR below the row maximum (torch's exp is slow on underflow); loss, true logits
    # and every gradient must still be the faithful ones
    from halo_embed.geometry import shifted_logits
    from halo_embed.losses.fused import EXP_FLOOR

    torch.manual_seed(3)
    x, c = torch.randn(16, 8) * 6, torch.randn(30, 8) * 6
    y = torch.randint(0, 30, (16,))
    kwargs = dict(distill=distill, label_smoothing=0.1)
    use_true = chunk_size is None   # the chunked path returns no true logits
    fast = grads(HALOLoss(8, 30, chunk_size=chunk_size, **kwargs), x, y, c, use_true)
    faithful = grads(HALOLoss(8, 30, implementation="faithful", **kwargs), x, y, c, use_true)
    spread = shifted_logits(x, c, HALOLoss(8, 30).temperature.detach())
    assert (spread.amax(1) - spread.amin(1)).min() > EXP_FLOOR      # the floor acts in every row
    assert (spread.amax(1, keepdim=True) - spread).div(0.1).gt(EXP_FLOOR).float().mean() > 0.5
    for a, b in zip(fast, faithful):
        if a is not None:
            assert rel_err(a, b) <= 1e-5


CLASS_CHUNK_CASES = [(distill, ls, reduction) for distill in (True, False) for ls in (0.0, 0.1)
                     for reduction in ("mean", "sum", "none")]


@pytest.mark.parametrize("distill,ls,reduction", CLASS_CHUNK_CASES)
def test_class_chunked_equals_unchunked(monkeypatch, distill, ls, reduction):
    # blocks of 5 rows, at most 20 logits each: 4 candidates at a time (13 = 4 + 4 + 4 + 1), two passes
    from halo_embed.losses import fused

    monkeypatch.setattr(fused, "CLASS_CHUNK_ELEMENTS", 20)
    x, c, y = batch(n=23, d=6, k=13, seed=4, dtype=torch.float64)
    kwargs = dict(distill=distill, label_smoothing=ls, reduction=reduction)
    chunked = grads(HALOLoss(6, 13, chunk_size=5, **kwargs).double(), x, y, c, False)
    whole = grads(HALOLoss(6, 13, **kwargs).double(), x, y, c, False)
    faithful = grads(HALOLoss(6, 13, implementation="faithful", **kwargs).double(), x, y, c, False)
    for i in (0, 2, 3, 4):
        assert rel_err(chunked[i], whole[i]) <= 1e-12
        assert rel_err(chunked[i], faithful[i]) <= 1e-10


def test_class_chunked_second_backward_and_no_grad(monkeypatch):
    from halo_embed.losses import fused

    monkeypatch.setattr(fused, "CLASS_CHUNK_ELEMENTS", 20)
    x, c, y = batch(n=11, d=6, k=13, seed=5)
    loss_fn = HALOLoss(6, 13, chunk_size=4)
    with torch.no_grad():
        cheap, _ = loss_fn(x, y, c)
    xg, cg = x.clone().requires_grad_(True), c.clone().requires_grad_(True)
    loss, _ = loss_fn(xg, y, cg)
    loss.backward(retain_graph=True)
    first = [xg.grad.clone(), cg.grad.clone(), loss_fn.gamma.grad.clone()]
    (2.0 * loss).backward()
    assert rel_err(cheap, loss.detach()) <= 1e-6
    for a, b in zip(first, [xg.grad, cg.grad, loss_fn.gamma.grad]):
        assert rel_err(b, 3.0 * a) <= 1e-6


@pytest.mark.parametrize("class_chunk_elements", [None, 12])
def test_paired_class_chunked_matches_faithful(monkeypatch, class_chunk_elements):
    # several positives per row (equal ids), some in another chunk of candidates than others
    from halo_embed.losses import fused

    if class_chunk_elements is not None:
        monkeypatch.setattr(fused, "CLASS_CHUNK_ELEMENTS", class_chunk_elements)
    g = torch.Generator().manual_seed(6)
    images = torch.randn(10, 8, generator=g, dtype=torch.float64)
    texts = images + 0.7 * torch.randn(10, 8, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 3, 1, 2, 0, 2, 3, 4, 0, 6])
    for distill in (True, False):
        results = []
        for implementation, chunk in (("fused", 3), ("faithful", None)):
            img, txt = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
            loss_fn = PairedHALOLoss(8, num_candidates=10, implementation=implementation, chunk_size=chunk,
                                     distill=distill).double()
            loss_fn(img, txt, ids).backward()
            results.append([img.grad, txt.grad, loss_fn.gamma.grad])
        for a, b in zip(*results):
            assert rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("cancellation", [None, 0.0])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_radial_distance_near_the_centroid(monkeypatch, chunk_size, cancellation):
    # away from the origin and close to their centroids: |x|^2 - 2 x.c + |c|^2 cancels, so those rows
    # take the distance directly, the others (farther from theirs) from the logits; without the
    # direct rows (cancellation 0) the loss and the gradients are off
    from halo_embed.losses import fused

    if cancellation is not None:
        monkeypatch.setattr(fused, "RADIAL_CANCELLATION", cancellation)
    g = torch.Generator().manual_seed(7)
    c = torch.randn(6, 12, generator=g) + 3.0
    y = torch.randint(0, 6, (16,), generator=g)
    x = c[y] + torch.randn(16, 12, generator=g) * torch.logspace(-3, 0.5, 16).unsqueeze(1)
    # (not through the true logits: near 0 their clamp's mask follows rounding, in either implementation)
    fast = grads(HALOLoss(12, 6, chunk_size=chunk_size), x, y, c, False)
    faithful = grads(HALOLoss(12, 6, implementation="faithful"), x, y, c, False)
    worst = max(rel_err(fast[i], faithful[i]) for i in (0, 2, 3))
    if cancellation is None:
        assert worst <= 1e-5
        # the temperature's gradient sums terms much larger than itself here (centroids far from the
        # origin): ~1e-4 in fp32 in this implementation and the previous one alike
        assert rel_err(fast[4], faithful[4]) <= 1e-3
    else:
        assert worst > 1e-3
