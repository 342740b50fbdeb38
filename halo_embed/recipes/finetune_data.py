"""The fine-tuning recipe's data: which reader a ``--train-data`` needs, the training loader, the pairs the
feature adapter is calibrated on, and the evaluation sets."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from .finetune_config import FinetuneConfig

__all__ = ["calibration_batches", "eval_data_for", "load_pairs", "source_kind", "training_loader"]


def source_kind(path: str, declared: str) -> str:
    """``shapes``, ``csv``, ``imagefolder`` or ``hf`` (``declared`` unless it is ``auto``)."""
    if declared != "auto":
        return declared
    if path == "shapes":
        return "shapes"
    p = Path(path)
    if p.suffix.lower() in (".csv", ".tsv", ".tab"):
        return "csv"
    if p.is_dir() and any(c.is_dir() for c in p.iterdir()) and not (p / "dataset_info.json").exists() \
            and not (p / "dataset_dict.json").exists():
        return "imagefolder"
    return "hf"


def load_pairs(config: FinetuneConfig, split: str):
    """The pair source of ``split`` ("train" or "val") and, for the built-in data, its extras."""
    from ..data.collections import ImageFolderPairs
    from ..data.pairs import CSVPairs, HFPairs
    from ..data.shapes import ShapesDataset

    path = config.train_data if split == "train" else (config.val_data or config.train_data)
    kind = source_kind(path, config.dataset_type)
    if kind == "shapes":
        images = config.shapes_train_images if split == "train" else config.shapes_val_images
        return ShapesDataset("train" if split == "train" else "val", images, seed=config.seed)
    if split == "val" and config.val_data is None and kind != "hf":
        raise ValueError("--val-data is required for this --train-data (only the built-in shapes and HF datasets "
                         "with a validation split have one)")
    if kind == "csv":
        return CSVPairs(path, config.csv_img_key, config.csv_caption_key, config.csv_separator)
    if kind == "imagefolder":
        return ImageFolderPairs(path, config.caption_template)
    return HFPairs(path, config.hf_train_split if split == "train" else config.hf_val_split,
                   config.hf_image_column, config.hf_text_column)


def training_loader(config: FinetuneConfig, source, backbone):
    """Batches of augmented pairs in an order that depends only on ``(seed, epoch)`` (full batches only)."""
    from torch.utils.data import DataLoader

    from ..data.pairs import EpochSampler, PairDataset, collate_pairs

    dataset = PairDataset(source, backbone.image_transform(train=True), seed=config.seed,
                          max_pixels=config.max_image_pixels)
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=EpochSampler(len(dataset), seed=config.seed),
                        num_workers=config.workers, drop_last=True,
                        collate_fn=partial(collate_pairs, tokenize=backbone.tokenize))
    if len(loader) == 0:
        raise ValueError(f"the training data has {len(dataset)} pairs, fewer than one batch of {config.batch_size}")
    return loader


def calibration_batches(config: FinetuneConfig, source, backbone) -> list[tuple[torch.Tensor, object]]:
    """``(pixels, tokens)`` of ``--calibration-samples`` training pairs for the feature adapter.

    A seeded random sample (files are often sorted by class), without
    augmentation, the same on every process, so every rank gets the same
    statistics.
    """
    from ..data.images import ImageLoadError
    from ..data.pairs import PairDataset, collate_pairs

    dataset = PairDataset(source, backbone.image_transform(train=False), seed=config.seed,
                          max_pixels=config.max_image_pixels)
    count = min(config.calibration_samples, len(dataset))
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed))[:count].tolist()
    batches = [collate_pairs([dataset[i] for i in chosen[s : s + 64]], backbone.tokenize)
               for s in range(0, count, 64)]
    usable = [(b["pixels"], b["tokens"]) for b in batches if b["pixels"] is not None]
    if not usable:
        errors = [e for b in batches for e in b["errors"]]
        raise ImageLoadError(f"none of the {count} calibration samples could be read, e.g. {errors[0]}"
                             if errors else "the training data has no usable sample to calibrate on")
    return usable


def eval_data_for(config: FinetuneConfig):
    """The validation pairs, their mismatches (shuffled, hard negatives for shapes) and the OOD images."""
    from ..clip.evaluate import build_eval_data
    from ..data.collections import ImageCollection
    from ..data.shapes import ShapesDataset, ood_texture

    source = load_pairs(config, "val")
    ood = {}
    hard = None
    if isinstance(source, ShapesDataset):
        hard = source.hard_negative
        ood["textures"] = [ood_texture(i, config.seed) for i in range(config.eval_images)]
    for path in config.ood_data:
        collection = ImageCollection(path, limit=config.eval_images)
        ood[collection.name] = collection
    return build_eval_data(source, config.eval_images, config.seed, ood, hard)


def zeroshot_data_for(config: FinetuneConfig):
    """``(ZeroShotData, OOD images)`` of ``--zeroshot-data`` (``None`` when not given)."""
    from ..clip.zeroshot import load_zeroshot_data
    from ..data.collections import ImageCollection

    if config.zeroshot_data is None:
        return None
    data = load_zeroshot_data(config.zeroshot_data, config.zeroshot_classnames, limit=config.zeroshot_images,
                              seed=config.seed)
    ood = {}
    for path in config.ood_data:
        collection = ImageCollection(path, limit=config.eval_images)
        ood[collection.name] = collection
    return data, ood
