"""Largest relative error of HALOLoss (fused and faithful) against the plain restatement of the
published loss in tests/reference_halo.py, fp32, over distill on/off, label smoothing 0.05/0.1/0.3,
reductions mean/none and two sizes; loss, true logits and the gradients of embeddings, centroids, gamma.

Usage: .venv/bin/python experiments/reference_agreement.py
"""

import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from reference_halo import ReferenceHALOLoss  # noqa: E402

from halo_embed import HALOLoss  # noqa: E402

QUANTITIES = ("loss", "true logits", "d/dx", "d/dc", "d/dgamma")


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


def outputs(module: torch.nn.Module, x, y, c, k):
    x, c = x.clone().requires_grad_(), c.clone().requires_grad_()
    loss, true = module(x, y, c, torch.arange(k))
    loss.sum().backward()
    return loss.detach(), true.detach(), x.grad, c.grad, module.gamma.grad


def main() -> None:
    worst = {impl: [0.0] * len(QUANTITIES) for impl in ("fused", "faithful")}
    settings = itertools.product((True, False), (0.05, 0.1, 0.3), ("mean", "none"), [(64, 16, 10), (256, 64, 100)])
    for distill, ls, reduction, (n, d, k) in settings:
        torch.manual_seed(0)
        x, c, y = torch.randn(n, d), torch.randn(k, d), torch.randint(0, k, (n,))
        expected = outputs(ReferenceHALOLoss(d, k, distill=distill, label_smoothing=ls, reduction=reduction), x, y, c, k)
        for impl in worst:
            got = outputs(HALOLoss(d, k, distill=distill, label_smoothing=ls, reduction=reduction,
                                   implementation=impl), x, y, c, k)
            worst[impl] = [max(w, relative_error(a, b)) for w, a, b in zip(worst[impl], got, expected)]
    for impl, errors in worst.items():
        print(f"{impl:9s} max relative error: " + ", ".join(f"{q} {e:.1e}" for q, e in zip(QUANTITIES, errors)))


if __name__ == "__main__":
    main()
