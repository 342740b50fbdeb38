"""Heads-only training on locked towers, with and without the feature cache: steps per second and the weights.

Usage: python benchmarks/bench_feature_cache.py [--lit runs/lit/lit-effnet-minilm] [--images 512] [--epochs 3]

Both runs are ``halo-embed finetune`` (``recipes.clip_finetune.train``) with both towers locked and no random
augmentation (``--train-augment none``), HALO's loss, the same data, seed and steps; one computes the towers
every step (``--feature-cache off``), the other once (``--feature-cache run``: the first epoch fills the
cache). The model is the real pretrained dual encoder of ``experiments/lit_pretrain.py`` (EfficientNet-Lite0
at 160 px + MiniLM) when ``--lit`` exists, else a tiny dual encoder from random weights (the code path only).
Data: rendered shapes images, two captions each. The table shows seconds per step in the first epoch and in
the later ones, the ratio, and the largest difference between the two runs' trained weights.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import print_table, save

REPO = Path(__file__).resolve().parents[1]


def tiny_model(directory: Path) -> dict:
    import sys

    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import lit_dual_encoder

    parts = lit_dual_encoder(directory)
    return {"model": str(parts["config"]), "pretrained_image": str(parts["image_weights"]), "image_mean": [0.5],
            "image_std": [0.5], "image_interpolation": "bicubic"}


def main() -> None:
    from safetensors.torch import load_file

    from halo_embed.recipes.clip_finetune import FinetuneConfig, train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lit", default=str(REPO / "runs" / "lit" / "lit-effnet-minilm"))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-feature-cache-"))
    model = {"model": f"local-dir:{args.lit}"} if Path(args.lit).is_dir() else tiny_model(work / "tiny")
    common = dict(**model, train_data="shapes", shapes_train_images=args.images, shapes_val_images=16,
                  eval_images=16, batch_size=args.batch_size, epochs=args.epochs, warmup=5, lr=1e-3,
                  logs=str(work), progress=False, report_to="none", lock_image=True, lock_text=True,
                  lock_text_freeze_layer_norm=True, train_augment="none", normalization="sphere",
                  log_every=1, save_every=10_000)
    results, weights = {}, {}
    for name, cache in (("towers every step", "off"), ("feature cache", "run")):
        started = time.perf_counter()
        train(FinetuneConfig(name=name.replace(" ", "-"), feature_cache=cache, **common))
        total = time.perf_counter() - started
        run = work / name.replace(" ", "-")
        steps = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]
        per_epoch: dict[int, list[float]] = {}
        for record in steps:  # one record per step (--log-every 1): its seconds from the samples/s it logged
            per_epoch.setdefault(record["epoch"], []).append(args.batch_size / record["samples_per_s"])
        first = per_epoch[min(per_epoch)]
        later = [s for epoch, values in per_epoch.items() if epoch != min(per_epoch) for s in values]
        results[name] = {"seconds_per_step_first_epoch": sum(first) / len(first),
                         "seconds_per_step_later": sum(later) / len(later) if later else None,
                         "run_seconds": total, "steps": len(steps)}
        weights[name] = load_file(str(run / "final" / "model.safetensors"))
    difference = max(float((weights["feature cache"][k] - v).abs().max())
                     for k, v in weights["towers every step"].items() if v.is_floating_point())
    base, cached = results["towers every step"], results["feature cache"]
    rows = [[name, f"{r['seconds_per_step_first_epoch']:.3f}",
             "-" if r["seconds_per_step_later"] is None else f"{r['seconds_per_step_later']:.3f}",
             f"{r['run_seconds']:.1f}"] for name, r in results.items()]
    print(f"model: {model['model']}; {args.images} images x 2 captions, batch {args.batch_size}, {args.epochs} epochs")
    print_table(["run", "s/step, first epoch", "s/step, later epochs", "whole run (s, with evaluation)"], rows)
    speedup = base["seconds_per_step_later"] / cached["seconds_per_step_later"] if cached["seconds_per_step_later"] \
        else None
    print(f"later epochs: {speedup:.1f}x the steps per second with the cache; largest weight difference "
          f"{difference:.2e}" if speedup else f"largest weight difference {difference:.2e}")
    save("feature_cache", {"args": vars(args), "model": model["model"], "results": results,
                           "steps_per_second_ratio_later_epochs": speedup, "max_weight_difference": difference})


if __name__ == "__main__":
    main()
