"""Where a fine-tuned HALO CLIP puts images and captions, and which pair rule it should use.

Usage: .venv/bin/python experiments/pair_diagnostics.py RUN_DIR [RUN_DIR ...]
       .venv/bin/python experiments/pair_diagnostics.py --smoke     # a 2-step shapes run, then its diagnosis

RUN_DIR is a HALO run of `halo-embed finetune` (it holds `config.json` and
`final/`, e.g. `runs/shapes/halo` after `experiments/shapes.sh`). On the
run's own validation pairs (the same ones its report uses) this prints:

- caption geometry: mean-square distance (``|a - b|^2 / D``) between two
  distinct caption strings (mean and the closest pair), and from each image to its own
  caption and to the nearest caption of another group (means over images);
- the pair rule: pooled rejection AUROC and the built-in threshold's accuracy
  for the unit-shell rule that halo-embed uses (``g (1 - |x - t|^2/D)`` against
  the abstain bias) and for the literal two-candidate softmax with the image's
  own norm (``g (|x|^2 - |x - t|^2)/D`` against the same bias).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _shared import SMOKE_FINETUNE, add_common_options  # noqa: E402

from halo_embed import geometry  # noqa: E402
from halo_embed.io import unused_path  # noqa: E402
from halo_embed.clip.checkpoint import load_checkpoint  # noqa: E402
from halo_embed.clip.evaluate import HALOView, evaluate_alignment  # noqa: E402
from halo_embed.recipes.runs import FINAL, run_path  # noqa: E402
from halo_embed.recipes.finetune_config import FinetuneConfig  # noqa: E402
from halo_embed.recipes.finetune_data import eval_data_for  # noqa: E402


class LiteralHALOView(HALOView):
    """The pair score of the training softmax: the caption's shifted logit with the image's own norm."""

    def pair_scores(self, images, texts):
        return geometry.shifted_logits_from_sq_distances(
            images, (images - texts).pow(2).sum(-1, keepdim=True), float(self.model.temperature.detach())).squeeze(-1)


def caption_geometry(embeddings: dict, captions: list[str]) -> dict[str, float]:
    first = {caption: i for i, caption in reversed(list(enumerate(captions)))}   # one row per distinct string
    texts = embeddings["texts"][sorted(first.values())]
    text_sq = torch.cdist(texts, texts).pow(2) / texts.shape[1]
    distinct = ~torch.eye(len(texts), dtype=torch.bool)
    return {"captions": len(texts), "caption_pair_mean": float(text_sq[distinct].mean()),
            "caption_pair_min": float(text_sq[distinct].min())}


def image_to_caption(embeddings: dict, text_groups: torch.Tensor) -> dict[str, float]:
    images, texts, groups = embeddings["images"], embeddings["texts"], embeddings["image_groups"]
    sq = torch.cdist(images, texts).pow(2) / images.shape[1]
    own = groups.unsqueeze(1) == text_groups.unsqueeze(0)
    own_sq = torch.where(own, sq, torch.inf).amin(1)
    other_sq = torch.where(own | (text_groups < 0).unsqueeze(0), torch.inf, sq).amin(1)
    return {"own_caption": float(own_sq.mean()), "nearest_other_caption": float(other_sq.mean()),
            "image_mean_square": float(geometry.mean_square(images).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                        help="run folders of halo-embed finetune (config.json + final/)")
    add_common_options(parser, data=False)
    args = parser.parse_args()
    if args.smoke:
        from halo_embed.cli import main as halo_embed

        folder = unused_path(Path(args.runs) / "pair-diagnostics-smoke")
        if halo_embed(["finetune", "--loss", "halo", "--output", str(folder.parent), "--name", folder.name,
                       *SMOKE_FINETUNE]):
            raise SystemExit("the smoke run's fine-tuning failed")
        args.run_dirs = [str(folder)]
    if not args.run_dirs:
        parser.error("give at least one RUN_DIR (or --smoke)")
    for run in map(Path, args.run_dirs):
        fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
        config = FinetuneConfig(**{k: v for k, v in json.loads((run / "config.json").read_text()).items()
                                   if k in fields})
        model = load_checkpoint(run_path(run, FINAL)).eval()
        data = eval_data_for(config)
        rows = {}
        for name, view in (("unit shell (halo-embed)", HALOView(model)), ("literal K+1 softmax", LiteralHALOView(model))):
            result = evaluate_alignment(view, data)
            pooled = result["rejection"]["all mismatched"]
            rows[name] = (pooled["auroc"], pooled["builtin_threshold_accuracy"])
        geometry_numbers = {**caption_geometry(result["embeddings"], data.texts),
                            **image_to_caption(result["embeddings"], data.text_groups)}
        g, bias = float(model.temperature.detach()), float(model.abstain_bias)
        # the unit-shell rule accepts when g (1 - |x - t|^2 / D) >= bias, i.e. below this mean-square distance
        print(f"== {run}  (temperature {g:.3f}, abstain bias {bias:.3f}: a pair is accepted when "
              f"|x - t|^2/D <= {1 - bias / g:.3f})")
        print("caption geometry (mean-square distances |a - b|^2 / D):")
        for key, value in geometry_numbers.items():
            print(f"  {key:24s} {value:.4g}")
        print("pair rule                  pooled AUROC %   built-in threshold accuracy %")
        for name, (auroc, accuracy) in rows.items():
            print(f"  {name:24s} {100 * auroc:14.2f}   {100 * accuracy:14.2f}")


if __name__ == "__main__":
    main()
