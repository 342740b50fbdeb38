"""Training throughput of the same CLIP model with the HALO loss and with CLIP's loss.

Usage: python benchmarks/bench_finetune.py [--model halo-tiny-vit] [--batch-size 64] [--steps 20]

Both losses train the same architecture from the same initial weights on the
same pre-built batches (rendered shapes, tokenized captions) in this process,
alternating in rounds so that machine noise hits both alike. A step is
forward + backward + AdamW update; the table shows samples/s and the ratio
HALO / CLIP (>= 0.95 is the target).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import print_table, save

from halo_embed.clip import parameter_groups
from halo_embed.recipes.clip_finetune import FinetuneConfig, build_model


def make_batches(backbone, batch_size: int, count: int):
    from halo_embed.data.shapes import ShapesDataset

    data = ShapesDataset("train", batch_size * count, seed=0, captions_per_image=1)
    transform = backbone.image_transform(train=False)
    batches = []
    for b in range(count):
        items = [data[i] for i in range(b * batch_size, (b + 1) * batch_size)]
        pixels = torch.stack([transform(image) for image, _, _ in items])
        batches.append((pixels, backbone.tokenize([caption for _, caption, _ in items]),
                        torch.tensor([group for _, _, group in items])))
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="halo-tiny-vit")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round and loss")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    runs = {}
    for loss in ("halo", "clip"):
        config = FinetuneConfig(model=args.model, loss=loss, batch_size=args.batch_size)
        model = build_model(config)
        if loss == "halo":
            batches = make_batches(model.backbone, args.batch_size, 4)
            model.fit_adapter((p, t) for p, t, _ in batches)
        optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-4)
        runs[loss] = (model.train(), optimizer)

    def step(loss: str, batch) -> None:
        model, optimizer = runs[loss]
        pixels, tokens, ids = batch
        value = model(pixels, tokens, ids)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for loss in runs:  # warm-up
        step(loss, batches[0])
    rates = {loss: [] for loss in runs}
    for _ in range(args.rounds):
        for loss in runs:
            start = time.perf_counter()
            for i in range(args.steps):
                step(loss, batches[i % len(batches)])
            rates[loss].append(args.steps * args.batch_size / (time.perf_counter() - start))
    halo, clip = statistics.median(rates["halo"]), statistics.median(rates["clip"])
    print(f"training throughput, model {args.model}, batch {args.batch_size}, {torch.get_num_threads()} threads")
    print_table(["loss", "samples/s (median of rounds)", "rounds"],
                [["halo", f"{halo:.1f}", ", ".join(f"{r:.1f}" for r in rates["halo"])],
                 ["clip", f"{clip:.1f}", ", ".join(f"{r:.1f}" for r in rates["clip"])]])
    print(f"HALO / CLIP throughput ratio: {halo / clip:.3f}")
    save("finetune_throughput", {"args": vars(args), "halo_samples_per_s": halo, "clip_samples_per_s": clip,
                                 "ratio": halo / clip, "rounds": rates})


if __name__ == "__main__":
    main()
