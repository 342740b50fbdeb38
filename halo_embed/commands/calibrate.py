"""``halo-embed calibrate``: fit the accept / reject decision on held-out pairs, and save a scorer.

    halo-embed calibrate --checkpoint runs/ft/checkpoint --pairs new-domain.csv --output scorer/   # a finetune run
    halo-embed calibrate --model ViT-B-32 --pretrained openai --pairs pairs.csv --output scorer/    # off the shelf
    halo-embed calibrate --model local-dir:my-clip/ --pairs pairs.csv --output scorer/
    halo-embed calibrate --family transformers --model openai/clip-vit-base-patch32 --pairs pairs.csv --output scorer/
    halo-embed score --checkpoint scorer/ --pairs more.csv --output scores.csv

``--pairs`` holds aligned (image, caption) pairs, as ``halo-embed score``
reads them, of images the model was not trained on. Each image is paired
with one of its captions (aligned) and with another image's caption
(mismatched); HALO's pair rule ``p = sigmoid(g (1 - |x - t|^2 / D) - bias)``
is fitted to them (:func:`~halo_embed.clip.decision.fit_pair_decision`) and
the result is written as a new checkpoint folder that ``halo-embed score``,
``AlignmentScorer`` and the evaluation load. A HALO checkpoint keeps its
geometry; a CLIP / SigLIP checkpoint or a pretrained model gets the
``"sphere"`` adapter and HALO's temperature from its logit scale (half of it),
so its ranking stays the model's cosine ranking and no weight changes.
Checked before any model is loaded: the pairs file (at least
:data:`~halo_embed.clip.decision.MIN_CALIBRATION_IMAGES` distinct images of
two or more groups), the checkpoint's kind (a dual encoder), an output folder
that does not exist yet. Exit status: 0 done, 1 some CSV rows were rejected
(reported; the rest used), 2 a usage or input error, 3 an internal error.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

HELP = "fit the accept/reject decision on held-out pairs (a finetune checkpoint or any pretrained CLIP)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("the model (one of)")
    model.add_argument("--checkpoint", help="a halo-embed checkpoint folder (HALO, CLIP or SigLIP)")
    model.add_argument("--model", help="open_clip architecture, hf-hub:, local-dir: or config .json; or, with "
                                       "--family transformers, a model id or folder")
    model.add_argument("--family", default="open_clip", choices=("open_clip", "transformers"),
                       help="--model's library (default open_clip)")
    model.add_argument("--pretrained", help="open_clip pretrained tag or weights file")
    model.add_argument("--pretrained-image", help="open_clip timm image tower: its weights file")
    model.add_argument("--image-mean", type=float, nargs=3, help="override the image normalisation mean")
    model.add_argument("--image-std", type=float, nargs=3, help="override the image normalisation std")
    model.add_argument("--image-interpolation", choices=("bicubic", "bilinear"), help="override the resize")
    data = parser.add_argument_group("the pairs")
    data.add_argument("--pairs", required=True, help="CSV/TSV of aligned pairs: an image path and a caption column")
    data.add_argument("--image-column", help="image path column (default: open_clip's filepath, else image)")
    data.add_argument("--text-column", help="caption column (default: open_clip's title, else caption)")
    data.add_argument("--max-images", type=int, default=None, help="use at most this many images (a seeded subset)")
    data.add_argument("--seed", type=int, default=0, help="the subset and the mismatched captions (default 0)")
    parser.add_argument("--keep-temperature", action="store_true",
                        help="fit the sink's bias alone, at the model's temperature (default: both)")
    parser.add_argument("--output", required=True, help="the new checkpoint folder (must not exist)")
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=64, help="images / captions per forward pass")


def _check(args: argparse.Namespace):
    """Everything that can be checked before a model is loaded; returns the calibration pairs."""
    from ..clip.checkpoint import CONTRASTIVE_FORMAT, FORMAT, read_config
    from ..clip.decision import check_min_images
    from ..clip.evaluate import build_eval_data
    from ..data.pairs import CSVPairs

    if (args.checkpoint is None) == (args.model is None):
        raise ValueError("give the model as --checkpoint FOLDER or as --model NAME (one of them)")
    if args.checkpoint is not None:
        given = [flag for flag, value in (("--pretrained", args.pretrained), ("--pretrained-image",
                                          args.pretrained_image), ("--image-mean", args.image_mean))
                 if value is not None]
        if given:
            raise ValueError(f"{given[0]} builds a model from --model; a --checkpoint brings its own weights")
        config = read_config(args.checkpoint)  # a folder that is not a halo-embed dual encoder is refused here
        if config.get("format") not in (FORMAT, CONTRASTIVE_FORMAT):
            raise ValueError(f"{args.checkpoint} is not a dual-encoder checkpoint")
    if Path(args.output).exists():
        raise ValueError(f"--output {args.output} exists; calibrate into a new folder (nothing is overwritten)")
    if args.device is not None:
        from .._validation import check_device

        check_device("--device", args.device)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {args.max_images}")
    with warnings.catch_warnings(record=True):  # the rejected rows are reported below, one line each
        warnings.simplefilter("always")
        pairs = CSVPairs(args.pairs, args.image_column, args.text_column)
    images = len({pairs.text_and_group(i)[1] for i in range(len(pairs))})
    check_min_images(min(images, args.max_images or images), f"--pairs {args.pairs} ({images} distinct images)")
    missing = [path for path, _, _ in pairs.pairs if not Path(path).is_file()]
    if missing:
        raise ValueError(f"--pairs {args.pairs}: {len(missing)} image file(s) not found, e.g. {missing[0]}")
    data = build_eval_data(pairs, max_images=args.max_images or images, seed=args.seed)
    return pairs, data


def _model(args: argparse.Namespace):
    """The HALOCLIP to calibrate: a HALO checkpoint as it is; anything else on the sphere at half its scale."""
    from ..clip import HALOCLIP, load_backbone, load_model

    if args.checkpoint is not None:
        model = load_model(args.checkpoint)
        if isinstance(model, HALOCLIP):
            return model, "checkpoint (HALO)"
        backbone, origin = model.backbone, f"checkpoint ({model.loss_name})"
    else:
        overrides = {"image_mean": args.image_mean and tuple(args.image_mean),
                     "image_std": args.image_std and tuple(args.image_std),
                     "image_interpolation": args.image_interpolation}
        backbone = load_backbone(args.family, args.model, args.pretrained, pretrained_image=args.pretrained_image,
                                 **(overrides if args.family == "open_clip" else {}))
        origin = f"pretrained {args.family} model {args.model}"
    scale = getattr(backbone.model, "logit_scale", None)
    init = 0.5 * math.exp(float(scale.detach().float().reshape(-1)[0])) if scale is not None else None
    return HALOCLIP(backbone, num_candidates=2, normalization="sphere", init_gamma=init), origin


def run(args: argparse.Namespace) -> int:
    import torch

    from ..clip.checkpoint import save_checkpoint
    from ..clip.evaluate import calibration_scores, view_of
    from ..io import atomic_write_json

    pairs, data = _check(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, origin = _model(args)
    model.to(device).eval()
    scores = calibration_scores(view_of(model), data, device, args.batch_size)
    decision = model.fit_decision(scores["images"], scores["aligned_texts"], scores["mismatched_texts"],
                                  fit_temperature=not args.keep_temperature,
                                  source=f"{len(data.images)} images of {args.pairs}")
    output = save_checkpoint(model.cpu(), args.output, extra={"calibrated_from": origin, "pairs": str(args.pairs)})
    atomic_write_json(output / "calibration.json", {"decision": decision.to_dict(), "model": origin,
                                                     "pairs": str(args.pairs), "images": len(data.images)})
    summary = (f"calibrated {origin} on {len(data.images)} images ({decision.fitted_on['aligned']} aligned, "
               f"{decision.fitted_on['mismatched']} mismatched pairs): temperature {decision.temperature:.3f}, "
               f"bias {decision.bias:.3f}, balanced accuracy on these pairs "
               f"{100 * decision.fitted_on['balanced_accuracy']:.1f} %")
    if model.adapter.normalization == "sphere":  # the same rule as a cosine threshold: 2 cos - 1 >= bias / g
        summary += f"; accepts a pair at cosine >= {0.5 * (1 + decision.bias / decision.temperature):.4f}"
    print(summary + f"; checkpoint {output}")
    for row in pairs.bad_rows:
        print(f"rejected: {row}", file=sys.stderr)
    return 1 if pairs.bad_rows else 0
