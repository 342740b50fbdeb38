"""``halo-embed demo``: the three jobs of halo-embed on embedded data, offline, in a few minutes on 2 CPU cores.

(a) Classification with abstention: cross-entropy vs HALO on scikit-learn's
    digits, with digits 7-9 held out as unknowns and uniform noise as far-OOD
    (accuracy, ECE, OOD table).
(b) CLIP-style fine-tuning with HALO on the built-in rendered shapes: captions
    are the images' centroids, the origin is the abstain candidate (retrieval
    and rejection numbers).
(c) The alignment scorer on a few pairs from (b): the built-in threshold
    accepts or rejects each pair, no threshold tuned.

Everything lands in ``runs/demo/`` (``report.md`` links the three parts).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

from ..eval import markdown_table, side_by_side, write_report

#: ``halo-embed demo`` (:mod:`halo_embed.cli`): the one-line help (the description is the docstring)
HELP = "a tour of HALO on embedded data, offline, in minutes"


def shapes_config(run_dir: Path, progress: bool):
    """The fine-tuning of part (b): the recipe's defaults on a smaller budget (~2.5 minutes on 2 cores)."""
    from .finetune_config import FinetuneConfig

    return FinetuneConfig(
        train_data="shapes", shapes_train_images=1500, shapes_val_images=200, eval_images=200, batch_size=64,
        max_steps=150, warmup=20, save_every=150, logs=str(run_dir), name="shapes-halo", progress=progress,
    )


def score_examples(checkpoint: Path, run_dir: Path, seed: int = 0) -> list[dict[str, Any]]:
    """Four pairs from the shapes validation split: own caption, another image's, a one-word change, and OOD."""
    from ..clip import AlignmentScorer
    from ..data.shapes import ShapesDataset, ood_texture

    scorer = AlignmentScorer.from_checkpoint(str(checkpoint))
    val = ShapesDataset("val", 200, seed=seed)
    rng = random.Random(seed)
    image_a, image_b = val.image(0), val.image(1)
    texture = ood_texture(0, seed)
    pairs = [
        ("shape 0", image_a, val.text_and_group(0)[0], "its own caption"),
        ("shape 0", image_a, val.text_and_group(val.captions_per_image)[0], "the caption of another image"),
        ("shape 1", image_b, val.hard_negative(val.captions_per_image, rng), "its caption with one attribute changed"),
        ("texture", texture, val.text_and_group(0)[0], "an out-of-distribution image"),
    ]
    for name, image in (("shape 0", image_a), ("shape 1", image_b), ("texture", texture)):
        image.resize((96, 96)).save(run_dir / f"{name.replace(' ', '_')}.png")
    scores = scorer.score([p[1] for p in pairs], [p[2] for p in pairs])
    return [
        {"image": name, "caption": caption, "kind": kind, "probability": float(p), "accept": bool(a)}
        for (name, _, caption, kind), p, a in zip(pairs, scores.probability, scores.accept)
    ]


def tour(output: str | Path = "runs/demo", progress: bool = True) -> Path:
    from .clip_finetune import train
    from .finetune_report import headline
    from .runs import FINAL
    from .digits import run as run_digits

    run_dir = Path(output)
    run_dir.mkdir(parents=True, exist_ok=True)

    print("(a) classification with abstention: cross-entropy vs HALO on scikit-learn digits, 7-9 held out")
    digits = run_digits(run_dir=run_dir / "digits", progress=progress)
    print(digits["summary_table"])

    print("(b) CLIP-style HALO fine-tuning on the built-in rendered shapes (150 steps of 64 pairs)")
    config = shapes_config(run_dir, progress)
    shapes = train(config)
    flat = headline(shapes)
    rows = [("R@1 image_to_text", "image -> text R@1 %"), ("R@5 image_to_text", "image -> text R@5 %"),
            ("R@1 text_to_image", "text -> image R@1 %"),
            ("AUROC shuffled", "rejection AUROC %, another image's caption"),
            ("AUROC hard negatives", "rejection AUROC %, one attribute changed"),
            ("AUROC OOD: textures", "rejection AUROC %, OOD images"),
            ("built-in threshold accuracy", "built-in threshold, balanced accuracy %"),
            ("tuned threshold accuracy", "best threshold (tuned on half), balanced accuracy %")]
    shapes_table = side_by_side({"HALO": flat}, rows)
    print(shapes_table)

    print("(c) scoring pairs with the built-in threshold")
    examples = score_examples(config.run_dir() / FINAL, run_dir)
    example_rows = [[f"![{e['image']}]({e['image'].replace(' ', '_')}.png)", e["caption"], e["kind"],
                     f"{e['probability']:.3f}", "ACCEPT" if e["accept"] else "REJECT"] for e in examples]
    for e in examples:
        print(f"  {'ACCEPT' if e['accept'] else 'REJECT'}  p={e['probability']:.3f}  {e['image']:8s} {e['caption']!r} "
              f"({e['kind']})")

    sections = [
        "A tour of the three jobs on embedded data (no download). Each part has its own report.\n",
        "## (a) Classification with abstention: digits\n\n"
        "scikit-learn's digits 0-6 train an MLP with cross-entropy and with HALO; digits 7-9 and uniform noise are "
        "never seen. Report: [digits/report.md](digits/report.md).\n\n" + digits["summary_table"],
        "## (b) Fine-tuning CLIP with HALO: rendered shapes\n\n"
        "A small ViT + text transformer (random init) trained for 150 steps with the paired HALO loss. "
        "Report: [shapes-halo/report.md](shapes-halo/report.md).\n\n" + shapes_table,
        "## (c) Scoring pairs with the built-in threshold\n\n"
        "`AlignmentScorer` on the checkpoint of (b): p(the caption belongs to the image) and the decision of HALO's "
        "abstain bias (accept when p >= 0.5); no threshold was tuned.\n\n"
        + markdown_table(["image", "caption", "pair", "p(belongs)", "decision"], example_rows),
    ]
    report = write_report(run_dir, "halo-embed demo", {"digits": digits["headline"], "shapes": flat,
                                                         "scored_pairs": examples}, sections)
    print(f"report: {report}")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="runs/demo",
                        help="run folder for report.md, metrics.json and plots (a taken one gets a -2, -3 ... suffix)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    from ..io import unused_path

    tour(unused_path(args.output), progress=args.progress)
    return 0
