"""Why the fused loss floors its softmax inputs: torch's exp on arguments that underflow.

Usage: python benchmarks/bench_exp_underflow.py [--repeats 21]

Part 1 times ``torch.exp`` and ``torch.softmax`` on a 4096 x 100 fp32 block whose
values lie in [-80, 0] (every exp a normal float) and in [-400, -110] (every exp
underflows to 0). Part 2 times the fused HALO loss (forward + backward, N x D x K =
4096 x 128 x 100) with its floor (``fused.EXP_FLOOR``) and without it, on
embeddings scaled so that most logits lie more than 87 below their row's maximum
(as after training with a large temperature), next to linear + cross-entropy on
the same tensors. Same process, interleaved repeats, medians.
"""

from __future__ import annotations

import argparse

import torch

from _common import LossSteps, interleaved_times, print_table, save

from halo_embed import geometry
from halo_embed.losses import fused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    blocks = {"[-80, 0]": torch.empty(4096, 100).uniform_(-80, 0, generator=g),
              "[-400, -110]": torch.empty(4096, 100).uniform_(-400, -110, generator=g)}
    ops = {f"{name} {values}": (lambda op=op, block=block: op(block))
           for values, block in blocks.items()
           for name, op in (("exp", torch.exp), ("softmax", lambda t: torch.softmax(t, dim=1)))}
    op_times = interleaved_times(ops, repeats=args.repeats, warmup=2)
    rows = [[name, f"{1000 * t:.3f}"] for name, t in op_times.items()]
    print("torch ops on a 4096 x 100 fp32 block, values in the given range")
    print_table(["op", "ms"], rows)

    n, d, k = 4096, 128, 100
    data = LossSteps(n, d, k, scale=12.0)
    with torch.no_grad():
        s = geometry.shifted_logits(data.x, data.w, data.loss_fn.temperature)
        far = ((s.amax(1, keepdim=True) - s) > 87.0).float().mean().item()

    def floor(value: float):
        return lambda: setattr(fused, "EXP_FLOOR", value)

    default_floor = fused.EXP_FLOOR
    try:
        loss_times = interleaved_times({"linear+cross_entropy": data.cross_entropy,
                                        f"halo fused, floor {default_floor:g}": data.halo(floor(default_floor)),
                                        "halo fused, no floor": data.halo(floor(float("inf")))},
                                       repeats=args.repeats, warmup=2)
    finally:
        fused.EXP_FLOOR = default_floor
    base = loss_times["linear+cross_entropy"]
    print(f"\nforward+backward, {n}x{d}x{k}, {100 * far:.0f}% of the HALO logits more than 87 below their row maximum")
    print_table(["variant", "ms", "time ratio"],
                [[name, f"{1000 * t:.2f}", f"{t / base:.2f}"] for name, t in loss_times.items()])
    save("exp_underflow", {"ops_s": op_times, "loss_s": loss_times, "far_fraction": far})


if __name__ == "__main__":
    main()
