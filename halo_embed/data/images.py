"""Image loading with errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_MAX_PIXELS", "ImageLoadError", "load_image", "to_rgb"]

#: Images with more pixels are refused (PIL's own decompression-bomb limit; ~9,500 x 9,500).
DEFAULT_MAX_PIXELS = 89_478_485


class ImageLoadError(ValueError):
    """An image file that is missing, too large or cannot be decoded (the message names it)."""


def to_rgb(image):
    """An 8-bit RGB copy of a PIL image of any mode.

    ``convert("RGB")`` alone clips 16- and 32-bit greyscale to 255 (a white
    image) and warns on palette images with transparency; those are rescaled
    from their bit depth, or go through RGBA first. CMYK, YCbCr, LAB and HSV
    are converted by PIL.
    """
    import numpy as np
    from PIL import Image

    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        # I;16 uses 16 bits; a 32-bit "I" image is usually 16-bit data as well (PNG decodes it so)
        top = 65535.0 if image.mode != "I" or values.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0  # 0-1 floats or 0-255 floats
        grey = np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def _not_a_file(path: Path) -> str:
    """Why ``path`` is not an image file one can read: missing, a folder, a symlink loop, or another kind."""
    import errno
    import stat

    try:
        mode = path.stat().st_mode
    except OSError as error:
        if error.errno == errno.ELOOP:
            return f"image path is a symlink loop: {path}"
        return f"image file not found: {path}"
    if stat.S_ISDIR(mode):
        return f"image path is a folder, not a file: {path}"
    return f"image path is not a regular file (a pipe, socket or device): {path}"


def load_image(source: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str | None = None):
    """A PIL image in 8-bit RGB from a path, encoded bytes (JPEG, PNG, WebP ...) or a PIL image.

    Args:
        source: a file path, the bytes of an image file, or a PIL image.
        max_pixels: refuse larger images (``None``: no limit beyond PIL's).
        name: what error messages call an image given as bytes (e.g. ``shard.tar:key.jpg``).

    Raises:
        ImageLoadError: the file is missing, unreadable, not an image or over ``max_pixels``.
        TypeError: ``source`` is neither a path, bytes nor a PIL image.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, (bytes, bytearray, memoryview)):  # an encoded image (a shard's jpg, a parquet cell)
        path, opened = name or "image bytes", io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        path = opened = Path(source)
        if not path.is_file():
            raise ImageLoadError(_not_a_file(path))
    else:
        raise TypeError(f"an image must be a file path, encoded bytes or a PIL image, got {type(source).__name__}")
    # PIL refuses twice its own MAX_IMAGE_PIXELS before we can look; a larger max_pixels moves that guard
    pil_limit = Image.MAX_IMAGE_PIXELS
    raised = pil_limit is not None and (max_pixels is None or max_pixels > pil_limit)
    try:
        if raised:
            Image.MAX_IMAGE_PIXELS = max_pixels
        with Image.open(opened) as image:  # reads the header only
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageLoadError(f"image {path} has {width}x{height} pixels, over the limit of {max_pixels:,}")
            image.load()
            return to_rgb(image)
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"image {path} is too large to decode safely: {error}") from error
    except ImageLoadError:
        raise
    except UnidentifiedImageError as error:  # its message names the stream object: not the same twice
        raise ImageLoadError(f"cannot read image {path}: not an image format PIL can identify") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(f"cannot read image {path}: {error}") from error
    finally:
        if raised:
            Image.MAX_IMAGE_PIXELS = pil_limit
