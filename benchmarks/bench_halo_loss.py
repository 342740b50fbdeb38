"""HALOLoss (fused and faithful) against linear + cross-entropy, forward + backward.

Usage: python benchmarks/bench_halo_loss.py [--repeats 7]

Sizes (N, D, K) = (1024, 512, 1000) and (4096, 128, 100). The baseline is
``F.linear`` + ``F.cross_entropy(label_smoothing=0.1)`` with the same
embeddings and class weights; HALO gets (embeddings, labels, centroids) and
returns its loss and true logits. Times: median of interleaved repeats in this
process. Peak memory: what one forward+backward adds to the process's peak
RSS, in a fresh process per variant (CPU) or the CUDA allocator's peak (GPU).
Targets: fused time <= 1.2x and memory <= 1.5x of the baseline.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from _common import extra_peak_in_subprocess, interleaved_times, memory_worker, print_table, save

from halo_embed import HALOLoss

SIZES = {"1024x512x1000": (1024, 512, 1000), "4096x128x100": (4096, 128, 100)}
VARIANTS = ("linear+cross_entropy", "halo fused", "halo faithful")


def setup(size: str, device: str = "cpu"):
    n, d, k = SIZES[size]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).to(device).requires_grad_(True)
    w = torch.randn(k, d, generator=g).to(device).requires_grad_(True)
    y = torch.randint(0, k, (n,), generator=g).to(device)
    losses = {
        "halo fused": HALOLoss(d, k, implementation="fused").to(device),
        "halo faithful": HALOLoss(d, k, implementation="faithful").to(device),
    }
    return x, w, y, losses


def step(variant: str, state) -> None:
    x, w, y, losses = state
    if variant == "linear+cross_entropy":
        loss = F.cross_entropy(F.linear(x, w), y, label_smoothing=0.1)
    else:
        loss, _ = losses[variant](x, y, w)
    loss.backward()
    x.grad = w.grad = None


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-worker":
        variant, size = sys.argv[2], sys.argv[3]
        memory_worker(lambda: setup(size), lambda state: step(variant, state))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, payload = [], {"device": device}
    for size in SIZES:
        state = setup(size, device)
        times = interleaved_times({v: (lambda v=v: step(v, state)) for v in VARIANTS}, repeats=args.repeats,
                                  sync=device == "cuda")
        if device == "cuda":
            memory = {}
            for v in VARIANTS:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step(v, state)
                memory[v] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            memory = {v: extra_peak_in_subprocess(__file__, v, size) for v in VARIANTS}
        base_t, base_m = times[VARIANTS[0]], memory[VARIANTS[0]]
        for v in VARIANTS:
            rows.append([size, v, f"{1000 * times[v]:.1f}", f"{times[v] / base_t:.2f}", f"{memory[v]:.1f}",
                         f"{memory[v] / max(base_m, 1e-9):.2f}"])
        payload[size] = {"time_s": times, "extra_peak_mb": memory}
    print(f"forward+backward on {device}, {torch.get_num_threads()} threads")
    print_table(["N x D x K", "variant", "ms", "time ratio", "extra peak MiB", "memory ratio"], rows)
    save("halo_loss", payload)


if __name__ == "__main__":
    main()
