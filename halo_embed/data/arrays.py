"""Small-image datasets held in memory as one uint8 tensor, with batch augmentation on the device.

CIFAR-sized data (50,000 x 3 x 32 x 32 bytes = 150 MB) fits in GPU memory:
keeping it there and doing random-crop + flip on whole batches removes the
data loader from the training loop (on CPU the same code beats per-image PIL
loading with workers). Order and augmentation depend only on ``(seed, epoch)``,
so a resumed run sees the same batches.

Sources: torchvision datasets (``cifar10``, ``cifar100``, ``svhn``, ``mnist``,
downloaded when asked), ImageFolder layouts, and anything
:class:`~halo_embed.data.collections.ImageCollection` reads (folders, ``.npz``,
idx files).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ImageArray", "AugmentedBatches", "TORCHVISION_SETS", "load_image_folder", "load_ood", "load_torchvision"]

TORCHVISION_SETS = ("cifar10", "cifar100", "svhn", "mnist")


@dataclass
class ImageArray:
    """``images``: uint8 ``(N, 3, H, W)``; ``labels``: long ``(N,)`` or ``None``; ``classes``: names."""

    images: Tensor
    labels: Tensor | None
    name: str
    classes: list[str] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, count: int | None, seed: int = 0) -> "ImageArray":
        """A fixed random subset of ``count`` images (stratified by nothing; ``None`` keeps all)."""
        if count is None or count >= len(self):
            return self
        keep = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:count].sort().values
        labels = self.labels[keep] if self.labels is not None else None
        return ImageArray(self.images[keep], labels, self.name, self.classes)


    def split_per_class(self, fraction: float, seed: int = 0) -> tuple["ImageArray", "ImageArray"]:
        """``(kept, held_out)``: ``round(fraction * n_c)`` random images of each class ``c`` held out.

        Raises:
            ValueError: no labels, ``fraction`` outside ``(0, 1)``, or a class left with no image on a side
                (the class is named).
        """
        if self.labels is None:
            raise ValueError(f"{self.name} has no labels to split by class")
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
        generator = torch.Generator().manual_seed(seed)
        held_out = []
        labels = range(len(self.classes)) if self.classes else torch.unique(self.labels).tolist()
        for label in labels:
            members = torch.nonzero(self.labels == label).flatten()
            count = int(round(fraction * len(members)))
            if count == 0 or count == len(members):
                name = self.classes[label] if self.classes and 0 <= label < len(self.classes) else label
                side = "held-out" if count == 0 else "training"
                raise ValueError(f"class {name!r} has {len(members)} image(s): holding out {fraction:g} of them "
                                 f"leaves no {side} image")
            held_out.append(members[torch.randperm(len(members), generator=generator)[:count]])
        mask = torch.zeros(len(self), dtype=torch.bool)
        mask[torch.cat(held_out)] = True
        part = lambda keep: ImageArray(self.images[keep], self.labels[keep], self.name, self.classes)  # noqa: E731
        return part(~mask), part(mask)


def _to_array(images: np.ndarray, size: int = 32) -> Tensor:
    """(N, H, W[, C]) uint8 numpy -> (N, 3, size, size) uint8 tensor (grey replicated, resized if needed)."""
    array = np.ascontiguousarray(images)
    x = torch.from_numpy(array if array.flags.writeable else array.copy())  # read-only arrays (mmap, npz)
    if x.dim() == 3:
        x = x.unsqueeze(-1)
    x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
    return x.contiguous()


def load_torchvision(name: str, root: str | os.PathLike, train: bool, download: bool) -> ImageArray:
    """A torchvision dataset's split as an :class:`ImageArray` (SVHN: ``train``/``test`` splits)."""
    from torchvision import datasets

    if name not in TORCHVISION_SETS:
        raise ValueError(f"dataset must be one of {TORCHVISION_SETS}, got {name!r}")
    try:
        if name == "cifar10":
            ds = datasets.CIFAR10(root, train=train, download=download)
            return ImageArray(_to_array(ds.data), torch.tensor(ds.targets), name, list(ds.classes))
        if name == "cifar100":
            ds = datasets.CIFAR100(root, train=train, download=download)
            return ImageArray(_to_array(ds.data), torch.tensor(ds.targets), name, list(ds.classes))
        if name == "svhn":
            ds = datasets.SVHN(root, split="train" if train else "test", download=download)
            return ImageArray(_to_array(ds.data.transpose(0, 2, 3, 1)), torch.from_numpy(ds.labels).long(), name)
        ds = datasets.MNIST(root, train=train, download=download)
        return ImageArray(_to_array(ds.data.numpy()), ds.targets.long(), name)
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted. You can use download=True"
        raise FileNotFoundError(
            f"{name} not found under {root} ({error}); pass --download to fetch it, or a local copy"
        ) from error


def load_image_folder(root: str | os.PathLike, size: int = 32, classes: list[str] | None = None) -> ImageArray:
    """``<root>/<class>/<image>`` decoded once into memory (class order: sorted names, or ``classes``)."""
    from PIL import Image

    from .collections import class_folders
    from .images import load_image

    names, items = class_folders(root)
    if classes is not None and names != classes:
        raise ValueError(f"{root} has classes {names}, expected {classes}")
    pixels = np.empty((len(items), size, size, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(items):
        image = load_image(path)  # any mode as 8-bit RGB; a broken or oversized file is named in the error
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        pixels[i] = np.asarray(image)
    labels = torch.tensor([label for _, label in items])
    return ImageArray(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), labels, Path(root).name, names)


def load_ood(spec: str, root: str | os.PathLike, download: bool, limit: int | None, size: int = 32) -> ImageArray:
    """An OOD set: a torchvision name (its test split, from ``root``) or a path for ImageCollection."""
    if spec in TORCHVISION_SETS:
        return load_torchvision(spec, root, train=False, download=download).subset(limit)
    from .collections import ImageCollection

    collection = ImageCollection(spec, limit=limit)
    if getattr(collection, "_array", None) is not None:
        return ImageArray(_to_array(collection._array, size), None, collection.name)
    pixels = np.stack([np.asarray(collection[i].resize((size, size))) for i in range(len(collection))])
    return ImageArray(_to_array(pixels, size), None, collection.name)


class AugmentedBatches:
    """Batches of an :class:`ImageArray`, normalised, on ``device``; optional crop (pad 4) + flip.

    Args:
        data: the images (moved to ``device`` once).
        batch_size: images per batch.
        mean / std: per-channel normalisation (0-1 scale).
        device: where the data lives and batches are built.
        train: shuffle, augment and drop the last partial batch.
        seed: order and augmentation are functions of ``(seed, epoch)``.
        channels_last: return batches in channels-last memory format.
    """

    def __init__(self, data: ImageArray, batch_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 device: torch.device | str = "cpu", train: bool = False, seed: int = 0,
                 channels_last: bool = False) -> None:
        self.device = torch.device(device)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device) if data.labels is not None else None
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255
        self.channels_last = channels_last

    def __len__(self) -> int:
        n = self.images.shape[0]
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def _augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
        b, _, h, w = x.shape
        padded = F.pad(x, (4, 4, 4, 4))
        dy = torch.randint(0, 9, (b,), generator=generator).to(x.device)
        dx = torch.randint(0, 9, (b,), generator=generator).to(x.device)
        flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]            # (B, H, 1)
        cols = dx[:, None] + torch.arange(w, device=x.device)                          # (B, W)
        cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]              # (B, 1, W)
        batch = torch.arange(b, device=x.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)

    def epoch(self, epoch: int = 0) -> Iterator[tuple[Tensor, Tensor | None]]:
        """The batches of one epoch: ``(images float (B, 3, H, W), labels or None)``."""
        n = self.images.shape[0]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=generator).to(self.device) if self.train else None
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size] if order is not None else slice(start, start + self.batch_size)
            x = self.images[index]
            if self.train:
                x = self._augment(x, generator)
            x = (x.float() - self.mean) / self.std
            # An explicit layout: the crop's gather leaves channels-last strides, and torch 2.14's CPU
            # convolution backward aborts ("double free") on channels-last inputs to a contiguous model.
            x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
            yield x, (self.labels[index] if self.labels is not None else None)
