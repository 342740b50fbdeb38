"""Large label spaces: HALOLoss(chunk_size=...) against torch's chunked F.linear_cross_entropy.

Usage: python benchmarks/bench_chunked.py [--n 4096] [--d 256] [--k 262144] [--chunk 128] [--repeats 3]

Neither side ever holds the N x K logits. Times: median of interleaved
repeats in this process (forward + backward). Memory: the peak RSS one
forward+backward adds in a fresh process, minus the gradients of the inputs
(N x D + K x D floats), i.e. the extra memory the loss itself needs.
Targets: <= 64 MiB extra (was ~1 GiB), time <= 1.3x of torch's chunked linear cross-entropy.
torch's chunked path only runs without label smoothing (given 0.1 it warns and
falls back to the full logits), so the baseline has none; HALO keeps its
defaults (label smoothing 0.1, distillation, the radial term).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from _common import extra_peak_in_subprocess, interleaved_times, memory_worker, print_table, save

from halo_embed import HALOLoss

VARIANTS = ("torch linear_cross_entropy (chunked, ls=0)", "halo chunked")


def setup(n: int, d: int, k: int, chunk: int):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, d, generator=g) * 0.5).requires_grad_(True)
    w = torch.randn(k, d, generator=g).requires_grad_(True)
    y = torch.randint(0, k, (n,), generator=g)
    return x, w, y, HALOLoss(d, k, chunk_size=chunk)


def step(variant: str, state) -> None:
    x, w, y, halo = state
    if variant.startswith("torch"):
        from torch.nn import LinearCrossEntropyOptions

        # torch's chunked path needs label_smoothing == 0 (with 0.1 it silently builds the N x K logits)
        loss = F.linear_cross_entropy(x, w, y, options=LinearCrossEntropyOptions())
    else:
        loss, _ = halo(x, y, w)
    loss.backward()
    x.grad = w.grad = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--k", type=int, default=262_144)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-worker":
        variant, size = sys.argv[2], sys.argv[3]
        n, d, k, chunk = map(int, size.split(","))
        memory_worker(lambda: setup(n, d, k, chunk), lambda state: step(variant, state))
        return
    args = parser.parse_args()
    state = setup(args.n, args.d, args.k, args.chunk)
    times = interleaved_times({v: (lambda v=v: step(v, state)) for v in VARIANTS}, repeats=args.repeats)
    size = f"{args.n},{args.d},{args.k},{args.chunk}"
    grads_mb = (args.n + args.k) * args.d * 4 / 2**20
    memory = {v: extra_peak_in_subprocess(__file__, v, size) - grads_mb for v in VARIANTS}
    base = times[VARIANTS[0]]
    rows = [[v, f"{times[v]:.2f}", f"{times[v] / base:.2f}", f"{memory[v]:.0f}"] for v in VARIANTS]
    print(f"N={args.n} D={args.d} K={args.k}, HALO chunk_size={args.chunk}, {torch.get_num_threads()} threads")
    print_table(["variant", "s (fwd+bwd)", "time ratio", "extra MiB beyond inputs+grads"], rows)
    save("chunked", {"args": vars(args), "time_s": times, "extra_mb_beyond_grads": memory})


if __name__ == "__main__":
    main()
