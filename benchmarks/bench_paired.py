"""PairedHALOLoss against open_clip's ClipLoss at a large batch, and its tiled mode at a huge one.

Usage: python benchmarks/bench_paired.py [--batch 4096] [--dim 512] [--tiled-batch 32768] [--chunk 1024]

Both losses get the same (B, D) image and text features (ClipLoss L2-normalised
with logit scale 1/0.07, HALO un-normalised), forward + backward. Times: median
of interleaved repeats in this process; memory: the peak RSS one step adds in a
fresh process. Targets: time <= 1.3x and memory <= 1.5x of ClipLoss at B=4096;
the tiled mode (chunk_size rows at a time) keeps memory linear in B.
"""

from __future__ import annotations

import argparse
import sys

import torch

from _common import extra_peak_in_subprocess, interleaved_times, median_time, memory_worker, print_table, save

from halo_embed.losses import PairedHALOLoss

VARIANTS = ("open_clip ClipLoss", "halo fused", "halo tiled")


def setup(batch: int, dim: int, chunk: int):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, dim, generator=g).requires_grad_(True)
    texts = (images.detach() + torch.randn(batch, dim, generator=g)).requires_grad_(True)
    return images, texts, {
        "halo fused": PairedHALOLoss(dim, num_candidates=batch),
        "halo tiled": PairedHALOLoss(dim, num_candidates=batch, chunk_size=chunk),
    }


def step(variant: str, state) -> None:
    images, texts, losses = state
    if variant.startswith("open_clip"):
        from open_clip.loss import ClipLoss

        normalize = torch.nn.functional.normalize
        loss = ClipLoss()(normalize(images, dim=-1), normalize(texts, dim=-1), torch.tensor(1 / 0.07))
    else:
        loss = losses[variant](images, texts)
    loss.backward()
    images.grad = texts.grad = None


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-worker":
        variant, size = sys.argv[2], sys.argv[3]
        batch, dim, chunk = map(int, size.split(","))
        memory_worker(lambda: setup(batch, dim, chunk), lambda state: step(variant, state))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--tiled-batch", type=int, default=32768)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    state = setup(args.batch, args.dim, args.chunk)
    times = interleaved_times({v: (lambda v=v: step(v, state)) for v in VARIANTS}, repeats=args.repeats)
    size = f"{args.batch},{args.dim},{args.chunk}"
    memory = {v: extra_peak_in_subprocess(__file__, v, size) for v in VARIANTS}
    base_t, base_m = times[VARIANTS[0]], memory[VARIANTS[0]]
    rows = [[v, f"{1000 * times[v]:.0f}", f"{times[v] / base_t:.2f}", f"{memory[v]:.0f}", f"{memory[v] / max(base_m, 1e-9):.2f}"]
            for v in VARIANTS]
    print(f"B={args.batch} D={args.dim}, {torch.get_num_threads()} threads")
    print_table(["variant", "ms (fwd+bwd)", "time ratio", "extra peak MiB", "memory ratio"], rows)
    payload = {"args": vars(args), "time_s": times, "extra_peak_mb": memory}
    if args.tiled_batch:
        big = f"{args.tiled_batch},{args.dim},{args.chunk}"
        tiled_mb = extra_peak_in_subprocess(__file__, "halo tiled", big)
        big_state = setup(args.tiled_batch, args.dim, args.chunk)
        tiled_s = median_time(lambda: step("halo tiled", big_state), repeats=1, warmup=0)
        print(f"tiled mode at B={args.tiled_batch}: {tiled_s:.1f} s, extra peak {tiled_mb:.0f} MiB "
              f"(a single B x B float32 matrix would be {args.tiled_batch ** 2 * 4 / 2 ** 20:.0f} MiB)")
        payload["tiled"] = {"batch": args.tiled_batch, "time_s": tiled_s, "extra_peak_mb": tiled_mb}
    save("paired", payload)


if __name__ == "__main__":
    main()
