"""Image loading with errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["ImageLoadError", "load_image"]


class ImageLoadError(ValueError):
    """An image file that is missing or cannot be decoded (the message names it)."""


def load_image(source: Any):
    """A PIL image in RGB from a path or a PIL image.

    Raises:
        ImageLoadError: the file is missing, unreadable or not an image.
        TypeError: ``source`` is neither a path nor a PIL image.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"an image must be a file path or a PIL image, got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise ImageLoadError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(f"cannot read image {path}: {error}") from error
