"""How close HALOLoss (fused and faithful) is to the published loss, measured against the published loss's own
float64 evaluation (tests/reference_halo.py, a plain restatement of the reference): the largest relative error
(to the largest entry) of the loss, the true logits and the gradients of embeddings, centroids and gamma, over
distill on/off, label smoothing 0.05/0.1/0.3, reductions mean/none and the sizes (N, D, K) = (5, 2, 3),
(64, 16, 10), (256, 64, 100), all in fp32. The reference's own fp32 evaluation is measured the same way: its
error is what fp32 itself costs, the bar for the other two.

Usage (seconds; ``--smoke``: the smallest size only):

    .venv/bin/python experiments/reference_agreement.py
    .venv/bin/python experiments/reference_agreement.py --sizes 5,2,3 --draws 200      # 200 random batches
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from _shared import add_common_options  # noqa: E402
from reference_halo import ReferenceHALOLoss  # noqa: E402

from halo_embed import HALOLoss  # noqa: E402

QUANTITIES = ("loss", "true logits", "d/dx", "d/dc", "d/dgamma")
SIZES = ((5, 2, 3), (64, 16, 10), (256, 64, 100))


def relative_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    return ((value.double() - exact).abs().max() / exact.abs().max().clamp_min(1e-30)).item()


def outputs(module: torch.nn.Module, x, y, c, k):
    x, c = x.clone().requires_grad_(), c.clone().requires_grad_()
    loss, true = module(x, y, c, torch.arange(k))
    loss.sum().backward()
    return loss.detach(), true.detach(), x.grad, c.grad, module.gamma.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_options(parser, data=False)  # --smoke: the smallest size only; nothing is written under --runs
    parser.add_argument("--sizes", nargs="+", default=[",".join(map(str, size)) for size in SIZES],
                        help="N,D,K of each batch size")
    parser.add_argument("--draws", type=int, default=1, help="random batches per setting (seeds 0 ...)")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in size.split(",")) for size in args.sizes]
    sizes = sizes[:1] if args.smoke else sizes
    worst = {impl: [(0.0, "")] * len(QUANTITIES) for impl in ("reference fp32", "fused", "faithful")}
    grid = itertools.product(range(args.draws), (True, False), (0.05, 0.1, 0.3), ("mean", "none"), sizes)
    for seed, distill, ls, reduction, (n, d, k) in grid:
        torch.manual_seed(seed)
        x, c, y = torch.randn(n, d), torch.randn(k, d), torch.randint(0, k, (n,))
        options = {"distill": distill, "label_smoothing": ls, "reduction": reduction}
        exact = outputs(ReferenceHALOLoss(d, k, **options).double(), x.double(), y, c.double(), k)
        modules = {"reference fp32": ReferenceHALOLoss(d, k, **options),
                   "fused": HALOLoss(d, k, **options, implementation="fused"),
                   "faithful": HALOLoss(d, k, **options, implementation="faithful")}
        case = f"N,D,K={n},{d},{k} distill={distill} ls={ls} {reduction} seed {seed}"
        for impl, module in modules.items():
            errors = [relative_error(a, b) for a, b in zip(outputs(module, x, y, c, k), exact)]
            worst[impl] = [max(w, (e, case)) for w, e in zip(worst[impl], errors)]
    for impl, errors in worst.items():
        print(f"{impl:15s} max relative error against float64: "
              + ", ".join(f"{q} {e:.1e}" for q, (e, _) in zip(QUANTITIES, errors)))
        print(f"{'':15s} largest at: {max(errors)[1]} ({QUANTITIES[errors.index(max(errors))]})")


if __name__ == "__main__":
    main()
