"""The pretrained-CLIP fine-tuning workflow in miniature: a real pretrained start, fine-tune, what was kept, WiSE-FT.

1. **Pretrain** (``pretrain``): ``lit_pretrain.py``: EfficientNet-Lite0 (ImageNet weights) and the MiniLM
   sentence encoder, both locked, joined by projections trained with CLIP's loss on 150 Tiny-ImageNet-200
   class prompts; saved as an open_clip ``local-dir:`` folder (``runs/lit/lit-effnet-minilm``). 50 classes
   are never trained on; their test images are the zero-shot set here.
2. **Fine-tune** (``finetune``): ``halo-embed finetune`` on Flickr8k-1000 (800 images / 4,000 captions for
   training, 200 images for validation) from that folder, with ``--loss halo clip`` (same initial weights,
   data, steps and seed), HALO on the sphere (``--normalization sphere``) with its decision fitted on held-out
   training images (``--calibration-split 0.1``), ``--zeroshot-data`` on the unseen classes (zero-shot top-1
   before the first step and at the end) and ``--wise-ft`` over 5 alphas.
3. **Report** (``report``): each loss's WiSE-FT table and one trade-off plot (Flickr mean recall vs zero-shot
   top-1) with both curves, written to ``<out>/report.md`` and ``<out>/wise_ft_tradeoff.png``.

The seeded comparison of the same workflow (four variants, locked and partly unlocked towers) is
``real_start.py``; this script is the one-seed walk-through a user would follow.

    .venv/bin/python experiments/pretrained_workflow.py all
    .venv/bin/python experiments/pretrained_workflow.py finetune --finetune-args "--lr 1e-4 --epochs 5"

A stage whose output exists is skipped, so an interrupted run is continued by running the same command
again. Everything is written under ``runs/workflow`` (``--out``; the pretrained model under ``--lit``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from _shared import SMOKE_FINETUNE, add_common_options, datasets, flickr_csvs

TEMPLATE = "a photo of a {}."
HALO_EMBED = str(Path(sys.executable).parent / "halo-embed")
#: ``--smoke``: the smoke fine-tuning without a held-out split (a decision fit needs 50 images)
SMOKE_WORKFLOW = [*SMOKE_FINETUNE, "--calibration-split", "0"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("pretrain", "finetune", "report", "all"))
    add_common_options(parser)
    parser.add_argument("--out", help="default: <--runs>/workflow (workflow-smoke)")
    parser.add_argument("--lit", help="lit_pretrain.py's --out (default: <--runs>/lit, lit-smoke)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--losses", nargs="+", default=["halo", "clip"])
    parser.add_argument("--alphas", nargs="+", default=["0", "0.25", "0.5", "0.75", "1"])
    parser.add_argument("--zeroshot-images", type=int, default=1000)
    parser.add_argument("--finetune-args", default="--preset small-data --lock-image-freeze-bn-stats",
                        help="further halo-embed finetune options")
    args = parser.parse_args(argv)
    suffix = "-smoke" if args.smoke else ""
    args.out = args.out or str(Path(args.runs) / f"workflow{suffix}")
    args.lit = args.lit or str(Path(args.runs) / f"lit{suffix}")
    if args.smoke:
        args.alphas = ["0", "1"]
        args.finetune_args = shlex.join([*shlex.split(args.finetune_args), *SMOKE_WORKFLOW])
    return args


# ---------------------------------------------------------------------------
# 1. The pretrained start
# ---------------------------------------------------------------------------


def pretrain(args) -> None:
    import lit_pretrain

    lit_pretrain.main(["--out", args.lit, "--data", args.data, "--runs", args.runs, "--seed", str(args.seed)]
                      + (["--smoke"] if args.smoke else []))


# ---------------------------------------------------------------------------
# 2. Fine-tune on Flickr8k-1000 with each loss
# ---------------------------------------------------------------------------


def finetune_command(out: str | Path, zeroshot_images: int, lit: str | Path) -> list[str]:
    """``halo-embed finetune`` from the pretrained start on Flickr8k-1000 (MiniLM locked) with the unseen
    Tiny-ImageNet classes as zero-shot data: what this script and ``small_data_preset.py`` run."""
    out, lit = Path(out), Path(lit)
    flickr, zeroshot = out / "flickr", lit / "zeroshot-unseen"
    return [HALO_EMBED, "finetune", "--model", f"local-dir:{lit / 'lit-effnet-minilm'}",
            "--lock-text", "--lock-text-freeze-layer-norm", "--calibration-split", "0.1",
            "--train-data", str(flickr / "train.csv"), "--val-data", str(flickr / "val.csv"),
            "--zeroshot-data", str(zeroshot / "images"), "--zeroshot-classnames", str(zeroshot / "classnames.tsv"),
            "--zeroshot-templates", TEMPLATE, "--zeroshot-images", str(zeroshot_images),
            "--eval-images", "200", "--no-progress"]


def finetune(args) -> None:
    shared = datasets(args)
    flickr_csvs(shared, Path(args.out) / "flickr", val_images=8 if args.smoke else 200)
    if all((Path(args.out) / "finetune" / loss / "report.md").exists() for loss in args.losses):
        print("fine-tuning runs exist")
        return
    command = [*finetune_command(args.out, args.zeroshot_images, args.lit), "--loss", *args.losses,
               "--ood-data", str(shared / "svhn-partial.npz"), "--wise-ft", *args.alphas,
               "--seed", str(args.seed), "--output", args.out, "--name", "finetune",
               *shlex.split(args.finetune_args)]
    if (Path(args.out) / "finetune").exists():
        command += ["--resume", "latest"]
    print("+ " + shlex.join(command), flush=True)
    subprocess.run(command, check=True)


# ---------------------------------------------------------------------------
# 3. One table and one plot
# ---------------------------------------------------------------------------


def report(args) -> None:
    from halo_embed.io import atomic_write_text
    from halo_embed.recipes.finetune_report import tradeoff_plot, wise_ft_table

    root = Path(args.out)
    pre = json.loads((Path(args.lit) / "pretrain.json").read_text())
    sweeps = {loss: json.loads((root / "finetune" / loss / "wise_ft" / "wise_ft.json").read_text())["alphas"]
              for loss in args.losses}
    tradeoff_plot(root / "wise_ft_tradeoff.png", sweeps)
    unseen = pre["zeroshot"]["unseen classes"]
    sections = [f"# Pretrained-CLIP workflow in miniature\n\nPretrained start: zero-shot top-1 "
                f"{100 * unseen['top1']:.2f} % (cosine) on {unseen['images']} images of the "
                f"{len(pre['unseen'])} Tiny-ImageNet classes it never trained on; Flickr8k-1000 validation: 200 images."]
    for loss, points in sweeps.items():
        sections.append(f"## {loss}\n\n" + wise_ft_table(points))
    text = "\n\n".join(sections) + "\n\n![trade-off](wise_ft_tradeoff.png)\n"
    atomic_write_text(root / "report.md", text)
    print(text)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.stage in ("pretrain", "all"):
        pretrain(args)
    if args.stage in ("finetune", "all"):
        finetune(args)
    if args.stage in ("report", "all"):
        report(args)


if __name__ == "__main__":
    main()
