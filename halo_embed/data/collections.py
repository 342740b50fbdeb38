"""Image collections: class folders captioned with their class name, and unlabelled image sets (OOD).

``ImageFolderPairs("cifar10/train", "a photo of a {}.")`` turns an ImageFolder
layout (``<root>/<class>/*.jpg``) into image-caption pairs whose captions name
the class; pairs of one class are each other's positives (their group is the
class). ``ImageCollection`` reads unlabelled images from a folder (recursively),
an ``.npz`` file with an ``x`` array ``(N, H, W[, 3])`` of uint8, or MNIST's
idx format (an ``*-idx3-ubyte[.gz]`` file, or a folder holding one).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["IMAGE_SUFFIXES", "ImageCollection", "ImageFolderPairs", "class_folders", "read_idx_images"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def class_folders(root: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    """``(class names, [(file, class index)])`` of an ImageFolder layout, classes sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected <root>/<class>/<image>)")
    items = [(path, label) for label, name in enumerate(classes) for path in _image_files(root / name)]
    if not items:
        raise ValueError(f"{root} has class folders but no image files")
    return classes, items


class ImageFolderPairs:
    """Pairs ``(image, template.format(class name), class index)`` from ``<root>/<class>/<image>``.

    Args:
        root: the folder.
        template: caption template with one ``{}`` for the class name
            (underscores in folder names become spaces).
        limit_per_class: keep at most this many images of each class (in file order).
    """

    def __init__(self, root: str | os.PathLike, template: str = "a photo of a {}.", limit_per_class: int | None = None) -> None:
        if "{}" not in template:
            raise ValueError(f"template must contain '{{}}', got {template!r}")
        self.classes, items = class_folders(root)
        if limit_per_class is not None:
            kept, counts = [], {}
            for path, label in items:
                if counts.get(label, 0) < limit_per_class:
                    kept.append((path, label))
                    counts[label] = counts.get(label, 0) + 1
            items = kept
        self.items = items
        self.captions = [template.format(name.replace("_", " ")) for name in self.classes]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Path, str, int]:
        path, label = self.items[index]
        return path, self.captions[label], label

    def image_key(self, index: int) -> str:
        return str(self.items[index][0])

    def text_and_group(self, index: int) -> tuple[str, int]:
        label = self.items[index][1]
        return self.captions[label], label


class ImageCollection:
    """Unlabelled images from a folder (recursive) or an ``.npz`` with key ``x``.

    ``collection[i]`` is a PIL RGB image (greyscale arrays are replicated to 3 channels).
    """

    def __init__(self, path: str | os.PathLike, limit: int | None = None) -> None:
        path = Path(path)
        self.path = path
        self._files: list[Path] | None = None
        self._array: Any = None
        idx = sorted(path.glob("*-idx3-ubyte*")) if path.is_dir() else []
        if idx and not _image_files(path):
            path = idx[0]
        if path.is_file() and "-idx3-ubyte" in path.name:
            self._array = read_idx_images(path)[:limit]
        elif path.is_dir():
            self._files = _image_files(path)[:limit]
            if not self._files:
                raise ValueError(f"no image files under {path}")
        elif path.suffix == ".npz" and path.is_file():
            import numpy as np

            with np.load(path) as data:
                if "x" not in data:
                    raise ValueError(f"{path} has no array 'x' (keys: {list(data.keys())})")
                self._array = data["x"][:limit]
            if self._array.ndim not in (3, 4) or self._array.dtype != np.uint8:
                raise ValueError(f"{path}: 'x' must be uint8 (N, H, W) or (N, H, W, 3), got {self._array.dtype} {self._array.shape}")
        else:
            raise FileNotFoundError(f"image collection not found (a folder or an .npz file): {path}")

    @property
    def name(self) -> str:
        if self.path.is_dir() or not self.path.suffix:
            return self.path.name
        return self.path.name.split(".")[0]

    def __len__(self) -> int:
        return len(self._files) if self._files is not None else len(self._array)

    def __getitem__(self, index: int):
        from PIL import Image

        from .images import load_image

        if self._files is not None:
            return load_image(self._files[index])
        pixels = self._array[index]
        return Image.fromarray(pixels).convert("RGB")


def read_idx_images(path: str | os.PathLike):
    """MNIST's idx3 image format (optionally gzipped) as a uint8 array ``(N, H, W)``."""
    import gzip

    import numpy as np

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 16 or int.from_bytes(data[:4], "big") != 0x00000803:
        raise ValueError(f"{path} is not an idx3 image file")
    count, rows, cols = (int.from_bytes(data[4 * i : 4 * i + 4], "big") for i in (1, 2, 3))
    if len(data) != 16 + count * rows * cols:
        raise ValueError(f"{path} is truncated: {len(data) - 16} bytes for {count} images of {rows}x{cols}")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols)
