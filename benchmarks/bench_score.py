"""`halo-embed score --pairs` against open_clip's own encode_image / encode_text + cosine, files to scores file.

Usage: python benchmarks/bench_score.py [--pairs 2000] [--model halo-tiny-vit] [--batch-size 64] [--workers N]

Both sides start from the same files: one open_clip model (random weights from
its config, seed 0; saved once as open_clip's weights file and once as the
HALOCLIP checkpoint `halo-embed score` reads), JPEG images (256 x 320, the
size of a resized photo; 200 distinct files, cycled) and a pairs CSV. Each
side loads its model, reads the CSV, decodes and transforms the images in
``--workers`` DataLoader processes, tokenizes in the same processes, runs both
towers at ``--batch-size`` and writes a CSV of scores:

* open_clip: ``create_model_and_transforms(name, pretrained=FILE)``, a
  ``Dataset`` of (preprocess(image), tokenize(caption)) as open_clip's own
  CsvDataset does, cosine of the normalised embeddings;
* halo-embed: the CLI in this process (``halo_embed.cli.main``): bad-row checks,
  truncation check, the resume journal, accept/reject, then the output file.

Reports pairs per second of each (median of interleaved repeats) and the ratio
(target >= 0.9). ``scoring_throughput`` is also the device check's scoring part.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from _common import interleaved_times, print_table, save


def make_inputs(folder: Path, model_name: str, pairs: int, distinct: int = 200) -> dict[str, Any]:
    """The model files, images and pairs CSV both sides read."""
    import numpy as np
    from PIL import Image

    from halo_embed.clip import HALOCLIP, load_backbone, save_checkpoint

    torch.manual_seed(0)
    backbone = load_backbone("open_clip", model_name)
    weights = folder / "open_clip_weights.pt"
    torch.save(backbone.model.state_dict(), weights)
    transform = backbone.image_transform(train=False)
    rng = np.random.default_rng(0)
    names = []
    for i in range(distinct):
        # smooth random colour fields: JPEG sizes like photos', unlike noise
        small = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
        Image.fromarray(small).resize((320, 256), Image.BICUBIC).save(folder / f"{i}.jpg", quality=90)
        names.append(f"{i}.jpg")
    captions = [f"a photo of a {('dog', 'cat', 'red car', 'child on a swing')[i % 4]} number {i}" for i in range(pairs)]
    with open(folder / "pairs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows((names[i % distinct], captions[i]) for i in range(pairs))
    model = HALOCLIP(backbone, num_candidates=64)
    calibration = [(torch.stack([transform(Image.open(folder / names[j]).convert("RGB")) for j in range(s, s + 32)]),
                    backbone.tokenize(captions[s : s + 32])) for s in (0, 32)]
    model.fit_adapter(calibration)
    checkpoint = save_checkpoint(model, folder / "checkpoint")
    return {"folder": folder, "weights": weights, "checkpoint": checkpoint, "pairs": folder / "pairs.csv"}


class _OpenClipPairs(torch.utils.data.Dataset):
    """What open_clip's CsvDataset does: the image through preprocess, the caption through the tokenizer."""

    def __init__(self, path: Path, preprocess, tokenizer) -> None:
        with open(path, newline="") as handle:
            self.rows = list(csv.DictReader(handle))
        self.root, self.preprocess, self.tokenizer = path.parent, preprocess, tokenizer

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        from PIL import Image

        row = self.rows[index]
        image = self.preprocess(Image.open(self.root / row["image"]))
        return image, self.tokenizer([row["caption"]])[0]


def open_clip_scores(inputs: dict[str, Any], model_name: str, device: torch.device, batch: int, workers: int,
                     output: Path) -> None:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(inputs["weights"]),
                                                                 device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    loader = torch.utils.data.DataLoader(_OpenClipPairs(inputs["pairs"], preprocess, tokenizer), batch_size=batch,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    cosines = []
    with torch.no_grad():
        for images, tokens in loader:
            image_features = F.normalize(model.encode_image(images.to(device, non_blocking=True)), dim=-1)
            text_features = F.normalize(model.encode_text(tokens.to(device, non_blocking=True)), dim=-1)
            cosines.append((image_features * text_features).sum(-1).cpu())
    with open(output, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "cosine"])
        writer.writerows(enumerate(torch.cat(cosines).tolist(), start=1))


def halo_scores(inputs: dict[str, Any], device: torch.device, batch: int, workers: int, output: Path) -> None:
    from halo_embed.cli import main

    code = main(["score", "--checkpoint", str(inputs["checkpoint"]), "--pairs", str(inputs["pairs"]), "--output",
                 str(output), "--device", str(device), "--batch-size", str(batch), "--workers", str(workers)])
    if code != 0:
        raise RuntimeError(f"halo-embed score exited with {code}")


def scoring_throughput(device: torch.device, model_name: str, pairs: int, batch: int, workers: int,
                       repeats: int) -> dict[str, Any]:
    """Pairs per second of both sides (median of interleaved repeats) and halo-embed's ratio to open_clip's."""
    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        inputs = make_inputs(Path(tmp), model_name, pairs)
        runs = itertools.count()  # a new output file per call: a finished output is never overwritten
        variants = {
            "open_clip encode + cosine": lambda: open_clip_scores(inputs, model_name, device, batch, workers,
                                                                  Path(tmp) / f"open_clip-{next(runs)}.csv"),
            "halo-embed score": lambda: halo_scores(inputs, device, batch, workers, Path(tmp) / f"halo-{next(runs)}.csv"),
        }
        seconds = interleaved_times(variants, repeats=repeats, warmup=1, sync=device.type == "cuda")
    per_s = {name: pairs / s for name, s in seconds.items()}
    return {"seconds": seconds, "pairs_per_s": per_s,
            "time_ratio": seconds["halo-embed score"] / seconds["open_clip encode + cosine"],
            "throughput_ratio": per_s["halo-embed score"] / per_s["open_clip encode + cosine"],
            "pairs": pairs, "batch": batch, "workers": workers, "model": model_name}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--model", default="halo-tiny-vit", help="an open_clip model name (random weights)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    result = scoring_throughput(torch.device(args.device), args.model, args.pairs, args.batch_size, args.workers,
                                args.repeats)
    print(f"{args.pairs} pairs, {args.model}, batch {args.batch_size}, {args.workers} workers, {args.device}, "
          f"{torch.get_num_threads()} threads ({time.perf_counter() - start:.0f} s)")
    print_table(["variant", "s", "pairs/s"], [[name, f"{s:.2f}", f"{result['pairs_per_s'][name]:.0f}"]
                                              for name, s in result["seconds"].items()])
    print(f"throughput ratio halo-embed / open_clip: {result['throughput_ratio']:.2f} (target >= 0.9)")
    save("score", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
