"""Image-caption pairs from a CSV/TSV, a Hugging Face ``datasets`` dataset, or the built-in shapes.

A *pair source* is any object with ``len(source)``, ``source[i] ->
(image, caption, group)`` and ``source.text_and_group(i) -> (caption, group)``
(without loading the image). ``image`` is a path or a PIL image; pairs with
the same ``group`` are each other's positives: the captions of one image, or
the images of one class when captions are class names.
:class:`PairDataset` turns a source into training samples: deterministic
per-sample augmentation, and broken images reported instead of raised deep
inside a DataLoader worker.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from .images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image
from .tables import CAPTION_COLUMNS, IMAGE_COLUMNS, read_csv

__all__ = [
    "CSVPairs",
    "EpochSampler",
    "HFPairs",
    "PairDataset",
    "collate_pairs",
    "training_sample",
]


class CSVPairs:
    """Pairs from a CSV/TSV file with an image-path column and a caption column (open_clip's layout).

    Args:
        path: the file; ``.tsv``/``.tab`` files default to tab-separated.
        img_key / caption_key: column names (open_clip: ``--csv-img-key``, ``--csv-caption-key``);
            ``None``: open_clip's ``filepath`` / ``title``, else ``image`` / ``caption``.
        separator: column separator (default: by extension).
        root: folder that relative image paths are relative to (default: the file's folder).

    Rows with the same image path share an image id (several captions per image).
    """

    def __init__(self, path: str | os.PathLike, img_key: str | None = None, caption_key: str | None = None,
                 separator: str | None = None, root: str | os.PathLike | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"caption file not found: {path}")
        table, (img_key, caption_key) = read_csv(path, [(img_key or IMAGE_COLUMNS, "--csv-img-key"),
                                                        (caption_key or CAPTION_COLUMNS, "--csv-caption-key")],
                                                 separator)
        #: rows that could not be used (e.g. not valid UTF-8), with their errors; reported, not trained on
        self.bad_rows = [f"{path}, line {row.line}: {row.error}" for row in table if row.error]
        if self.bad_rows:
            warnings.warn(f"{len(self.bad_rows)} row(s) of {path} skipped, e.g. {self.bad_rows[0]}", stacklevel=2)
        rows = [(row.values.get(img_key) or "", row.values.get(caption_key) or "") for row in table if not row.error]
        if not rows:
            raise ValueError(f"{path} has no rows")
        base = Path(root) if root is not None else path.parent
        ids: dict[str, int] = {}
        self.pairs = []
        for image, caption in rows:
            image_path = Path(image.strip())
            full = image_path if image_path.is_absolute() else base / image_path
            self.pairs.append((str(full), caption.strip(), ids.setdefault(str(full), len(ids))))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[str, str, int]:
        return self.pairs[index]

    def text_and_group(self, index: int) -> tuple[str, int]:
        return self.pairs[index][1], self.pairs[index][2]


class HFPairs:
    """Pairs from a Hugging Face dataset (hub name, a ``save_to_disk`` folder, or a data folder).

    Args:
        name_or_path: hub dataset name, or a local folder.
        split: the split to read (``"train"``).
        image_column / text_column: columns; the text column may hold one
            caption or a list of captions per image (COCO style).
    """

    def __init__(self, name_or_path: str, split: str = "train", image_column: str = "image",
                 text_column: str = "text") -> None:
        import datasets

        path = Path(name_or_path)
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()
                              or (path / "dataset_dict.json").exists()):
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise ValueError(f"{path} has no split {split!r} (splits: {list(data)})")
                data = data[split]
        else:
            data = datasets.load_dataset(name_or_path, split=split)
        for column in (image_column, text_column):
            if column not in data.column_names:
                raise ValueError(f"dataset {name_or_path} has no column {column!r} (columns: {data.column_names})")
        self.data, self.image_column = data, image_column
        self.pairs: list[tuple[int, str]] = []
        for row, texts in enumerate(data[text_column]):  # reads the text column only, images stay lazy
            for text in texts if isinstance(texts, (list, tuple)) else [texts]:
                self.pairs.append((row, str(text)))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Any, str, int]:
        row, caption = self.pairs[index]
        return self.data[row][self.image_column], caption, row

    def text_and_group(self, index: int) -> tuple[str, int]:
        row, caption = self.pairs[index]
        return caption, row


class EpochSampler(Sampler[int]):
    """A shuffled order that depends only on ``(seed, epoch)``, so a resumed run replays it exactly.

    It yields *draw ids* ``epoch * n + i``; :class:`PairDataset` maps them back to
    sample ``i`` and seeds that draw's augmentation with the draw id.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True) -> None:
        self.num_samples, self.seed, self.shuffle, self.epoch = num_samples, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = range(self.num_samples)
        offset = self.epoch * self.num_samples
        return iter([offset + i for i in order])


class PairDataset(Dataset):
    """Training/evaluation samples from a pair source.

    Args:
        source: see the module docstring.
        transform: PIL image -> tensor (the backbone's ``image_transform``).
        seed: seeds each draw's augmentation together with the draw id, so
            augmentation does not depend on worker count, order or resumption.
        max_pixels: larger images count as broken (see :func:`~halo_embed.data.images.load_image`).

    ``dataset[draw_id]`` returns a dict with ``pixels`` (or ``None`` when the
    image is broken), ``caption``, ``image_id`` and ``error`` (the message).
    """

    def __init__(self, source: Any, transform: Callable, seed: int = 0,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.source, self.transform, self.seed, self.max_pixels = source, transform, seed, max_pixels

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, draw_id: int) -> dict[str, Any]:
        image, caption, image_id = self.source[draw_id % len(self.source)]
        return training_sample(image, caption, int(image_id), self.transform, self.seed * 1_000_003 + int(draw_id),
                               self.max_pixels)


def training_sample(image: Any, caption: str, image_id: int, transform: Callable, augmentation_seed: int,
                    max_pixels: int | None, name: str | None = None) -> dict[str, Any]:
    """One training sample: ``pixels`` through ``transform`` with the augmentation seeded by
    ``augmentation_seed`` (the global RNG untouched), or ``None`` and the ``error`` for a broken image."""
    sample = {"pixels": None, "caption": caption, "image_id": image_id, "error": None}
    try:
        pil = load_image(image, max_pixels=max_pixels, name=name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(augmentation_seed % 2 ** 63)
            sample["pixels"] = transform(pil)
    except (ImageLoadError, TypeError) as error:
        sample["error"] = str(error)
    return sample


def collate_pairs(samples: Sequence[dict[str, Any]], tokenize: Callable[[list[str]], Any]) -> dict[str, Any]:
    """Stack the good samples, tokenize their captions, and list the broken ones.

    Returns ``pixels (B, 3, H, W)``, ``tokens``, ``image_ids (B,)``, ``captions``
    and ``errors`` (messages of the skipped samples); ``B`` may be 0.
    """
    good = [s for s in samples if s["pixels"] is not None]
    errors = [s["error"] for s in samples if s["pixels"] is None]
    if not good:
        return {"pixels": None, "tokens": None, "image_ids": None, "captions": [], "errors": errors}
    captions = [s["caption"] for s in good]
    return {
        "pixels": torch.stack([s["pixels"] for s in good]),
        "tokens": tokenize(captions),
        "image_ids": torch.tensor([s["image_id"] for s in good], dtype=torch.long),
        "captions": captions,
        "errors": errors,
    }
