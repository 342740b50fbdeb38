"""The fine-tuning recipe's data: which reader a ``--train-data`` needs, the training loader, the pairs the
feature adapter's statistics are measured on, and the evaluation sets."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from .finetune_config import FinetuneConfig

__all__ = ["PairSubset", "adapter_batches", "calibration_data_for", "calibration_pairs", "eval_data_for", "load_pairs", "source_kind",
           "split_calibration", "training_loader"]


def source_kind(path: str, declared: str) -> str:
    """``shapes``, ``csv``, ``imagefolder``, ``webdataset`` or ``hf`` (``declared`` unless it is ``auto``)."""
    from ..data.shards import input_kind

    if declared != "auto":
        return declared
    if path == "shapes":
        return "shapes"
    if input_kind(path) == "webdataset":
        return "webdataset"
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
    if kind != "webdataset" and split == "train" and (config.train_num_samples or config.dataset_resampled):
        raise ValueError(f"--{'train-num-samples' if config.train_num_samples else 'dataset-resampled'} applies to "
                         f"webdataset shards; --train-data {path} is read as {kind} (an epoch is all of it)")
    if kind == "webdataset":
        from ..data.shard_training import ShardPairs

        if split == "train" and config.train_num_samples is None:
            raise ValueError("--train-num-samples is required with webdataset shards (they have no length; it "
                             "defines the epoch, as in open_clip_train)")
        return ShardPairs(path, "--train-data" if split == "train" else "--val-data", seed=config.seed)
    if kind == "csv":
        return CSVPairs(path, config.csv_img_key, config.csv_caption_key, config.csv_separator)
    if kind == "imagefolder":
        return ImageFolderPairs(path, config.caption_template)
    return HFPairs(path, config.hf_train_split if split == "train" else config.hf_val_split,
                   config.hf_image_column, config.hf_text_column)


class PairSubset:
    """The pairs ``indices`` of a pair source, read through it (the training or the calibration part)."""

    def __init__(self, source, indices: list[int]) -> None:
        self.source, self.indices = source, list(indices)
        self.bad_rows = getattr(source, "bad_rows", [])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.source[self.indices[index]]

    def text_and_group(self, index: int):
        return self.source.text_and_group(self.indices[index])

    def image_key(self, index: int):
        key_of = getattr(self.source, "image_key", None)
        return key_of(self.indices[index]) if key_of else self.source.text_and_group(self.indices[index])[1]


def split_calibration(config: FinetuneConfig, source):
    """``(training pairs, calibration pairs or None)``: ``--calibration-split`` of the images (all captions of
    an image on one side), a seeded random choice, never trained on.

    Raises:
        ValueError: a split that leaves fewer images than a stable fit needs, or no training image.
    """
    from ..clip.decision import check_min_images
    from ..data.shard_training import CALIBRATION_IMAGES, ShardPairs

    if not config.calibration_split:
        return source, None
    if isinstance(source, ShardPairs):  # held out by a hash of each sample's key; the first ones calibrate
        source = source.with_holdout(config.calibration_split)
        calibration = source.read(CALIBRATION_IMAGES, held_out=True)
        check_min_images(len(calibration), f"--calibration-split {config.calibration_split:g} of the shards' "
                                           f"samples (at most {CALIBRATION_IMAGES} read)")
        return source, calibration
    key_of = getattr(source, "image_key", None)
    by_image: dict = {}
    for index in range(len(source)):
        key = key_of(index) if key_of else source.text_and_group(index)[1]
        by_image.setdefault(key, []).append(index)
    keys = list(by_image)
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(config.seed)).tolist()
    count = round(config.calibration_split * len(keys))
    what = f"--calibration-split {config.calibration_split:g} of {len(keys)} training images"
    check_min_images(count, what)
    if count >= len(keys):
        raise ValueError(f"{what} leaves no image to train on")
    held_out = {keys[i] for i in order[:count]}
    train = [i for key in keys if key not in held_out for i in by_image[key]]
    calibration = [i for key in keys if key in held_out for i in by_image[key]]
    return PairSubset(source, train), PairSubset(source, calibration)


def calibration_data_for(config: FinetuneConfig, source=None):
    """The calibration pairs (``None`` without ``--calibration-split``): every held-out image with one of
    its captions (aligned) and another image's caption (mismatched), as
    :class:`~halo_embed.clip.evaluate.AlignmentEvalData` with sets ``aligned`` and ``shuffled``."""
    _, calibration = split_calibration(config, source if source is not None else load_pairs(config, "train"))
    return calibration_pairs(calibration, config.seed)


def calibration_pairs(calibration, seed: int):
    """:func:`calibration_data_for` of an already split-off :class:`PairSubset` (``None`` passes through)."""
    from ..clip.evaluate import build_eval_data

    if calibration is None:
        return None
    return build_eval_data(calibration, max_images=len(calibration), seed=seed)


def training_loader(config: FinetuneConfig, source, backbone, accelerator=None):
    """Batches of augmented pairs in an order that depends only on ``(seed, epoch)`` (full batches only);
    for webdataset shards a :class:`~halo_embed.data.shard_training.ShardLoader` of this process's share,
    which ``accelerator.prepare`` must not wrap."""
    from torch.utils.data import DataLoader

    from ..data.pairs import EpochSampler, PairDataset, collate_pairs
    from ..data.shard_training import ShardLoader, ShardPairs

    transform = backbone.image_transform(train=config.train_augment == "model")
    if isinstance(source, ShardPairs):
        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
        return ShardLoader(source, transform, backbone.tokenize, config.batch_size, config.train_num_samples, rank,
                           world, config.workers, config.seed, config.dataset_resampled, config.max_image_pixels,
                           accelerator.device if accelerator else "cpu")

    dataset = PairDataset(source, transform, seed=config.seed, max_pixels=config.max_image_pixels)
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=EpochSampler(len(dataset), seed=config.seed),
                        num_workers=config.workers, drop_last=True,
                        collate_fn=partial(collate_pairs, tokenize=backbone.tokenize))
    if len(loader) == 0:
        raise ValueError(f"the training data has {len(dataset)} pairs, fewer than one batch of {config.batch_size}")
    return loader


def adapter_batches(config: FinetuneConfig, source, backbone) -> list[tuple[torch.Tensor, object]]:
    """``(pixels, tokens)`` of ``--adapter-samples`` training pairs for the feature adapter.

    A seeded random sample (files are often sorted by class), without
    augmentation, the same on every process, so every rank gets the same
    statistics.
    """
    from ..data.images import ImageLoadError
    from ..data.pairs import PairDataset, collate_pairs
    from ..data.shard_training import ShardPairs

    if isinstance(source, ShardPairs):  # the first samples in shard order (no random access)
        source = source.read(config.adapter_samples)
    dataset = PairDataset(source, backbone.image_transform(train=False), seed=config.seed,
                          max_pixels=config.max_image_pixels)
    count = min(config.adapter_samples, len(dataset))
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed))[:count].tolist()
    batches = [collate_pairs([dataset[i] for i in chosen[s : s + 64]], backbone.tokenize)
               for s in range(0, count, 64)]
    usable = [(b["pixels"], b["tokens"]) for b in batches if b["pixels"] is not None]
    if not usable:
        errors = [e for b in batches for e in b["errors"]]
        raise ImageLoadError(f"none of the {count} samples for the adapter's statistics could be read, e.g. {errors[0]}"
                             if errors else "the training data has no usable sample to measure the adapter's statistics on")
    return usable


def eval_data_for(config: FinetuneConfig):
    """The validation pairs, their mismatches (shuffled, hard negatives for shapes) and the OOD images."""
    from ..clip.evaluate import build_eval_data
    from ..data.collections import ImageCollection
    from ..data.shapes import ShapesDataset, ood_texture

    from ..data.shard_training import ShardPairs

    source = load_pairs(config, "val")
    if isinstance(source, ShardPairs):  # the first --eval-images samples of the validation shards
        source = source.read(config.eval_images)
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
