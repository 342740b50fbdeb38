"""The built-in image-caption dataset: rendered shapes whose captions name colour, shape, size and position.

Needs no files and no network. Every sample is a deterministic function of
``(seed, split, index)``. Some (colour, shape) combinations are held out of
the training split and make up the ``"unseen"`` split, so a model is also
measured on combinations of known words it never saw together. Each image has
several captions (paraphrases) that share its image id. For rejection
benchmarks it provides hard negatives (the caption with one attribute word
changed) and out-of-distribution images (textures with no shape at all).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

__all__ = ["COLOURS", "POSITIONS", "SHAPES", "SIZES", "ShapeSample", "ShapesDataset", "ood_texture"]

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 230), "yellow": (235, 215, 30),
    "purple": (140, 40, 170), "orange": (245, 140, 20), "white": (250, 250, 250), "cyan": (30, 210, 220),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
SIZES = {"small": 0.22, "large": 0.42}
POSITIONS = {
    "top left": (0.28, 0.28), "top right": (0.72, 0.28), "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72), "center": (0.5, 0.5),
}
TEMPLATES = ("a {size} {colour} {shape} in the {position}", "{position}: a {size} {colour} {shape}")
SPLITS = ("train", "val", "test", "unseen")


@dataclass(frozen=True)
class ShapeSample:
    colour: str
    shape: str
    size: str
    position: str

    def caption(self, template: int = 0) -> str:
        return TEMPLATES[template].format(**self.__dict__)

    def with_attribute(self, attribute: str, value: str) -> "ShapeSample":
        values = dict(self.__dict__)
        values[attribute] = value
        return ShapeSample(**values)


def _held_out_pairs(seed: int) -> set[tuple[str, str]]:
    """One (colour, shape) pair in six, never rendered in train/val/test."""
    pairs = list(itertools.product(COLOURS, SHAPES))
    random.Random(seed).shuffle(pairs)
    return set(pairs[: len(pairs) // 6])


def render(sample: ShapeSample, image_size: int = 64, jitter: tuple[float, float] = (0.0, 0.0), background: int = 90):
    """Draw ``sample`` as a PIL image."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (image_size, image_size), (background,) * 3)
    draw = ImageDraw.Draw(image)
    cx, cy = POSITIONS[sample.position]
    cx, cy = (cx + jitter[0]) * image_size, (cy + jitter[1]) * image_size
    r = SIZES[sample.size] * image_size / 2
    colour = COLOURS[sample.colour]
    box = (cx - r, cy - r, cx + r, cy + r)
    if sample.shape == "circle":
        draw.ellipse(box, fill=colour)
    elif sample.shape == "square":
        draw.rectangle(box, fill=colour)
    elif sample.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
    elif sample.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    elif sample.shape == "cross":
        w = r / 3
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
    elif sample.shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    return image


def ood_texture(index: int, seed: int = 0, image_size: int = 64):
    """An out-of-distribution image: stripes, checkerboards or noise, no shape."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng((seed, index, 7))
    kind = index % 3
    if kind == 0:
        pixels = rng.integers(0, 256, (image_size, image_size, 3))
    else:
        period = int(rng.integers(4, 16))
        grid = np.indices((image_size, image_size))
        pattern = (grid[0] // period) % 2 if kind == 1 else ((grid[0] // period + grid[1] // period) % 2)
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        pixels = np.where(pattern[..., None] == 1, a, b)
    return Image.fromarray(pixels.astype(np.uint8))


class ShapesDataset:
    """Deterministic rendered shapes with captions (a pair source, see :mod:`halo_embed.data.pairs`).

    Args:
        split: ``"train"``, ``"val"``, ``"test"`` or ``"unseen"`` (held-out colour-shape pairs).
        num_images: images in the split; each has ``captions_per_image`` captions.
        seed: the dataset seed (the held-out combinations depend on it, not on the split).
        image_size: rendered size in pixels.
    """

    def __init__(self, split: str = "train", num_images: int = 2000, seed: int = 0, image_size: int = 64,
                 captions_per_image: int = 2) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 1 <= captions_per_image <= len(TEMPLATES):
            raise ValueError(f"captions_per_image must be in [1, {len(TEMPLATES)}], got {captions_per_image}")
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        self.split, self.seed, self.image_size = split, seed, image_size
        self.captions_per_image = captions_per_image
        held_out = _held_out_pairs(seed)
        combos = [
            ShapeSample(c, s, z, p)
            for c, s, z, p in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS)
            if ((c, s) in held_out) == (split == "unseen")
        ]
        rng = random.Random(f"{seed}-{split}")
        self.samples = [rng.choice(combos) for _ in range(num_images)]
        self.jitter = [(rng.uniform(-0.06, 0.06), rng.uniform(-0.06, 0.06)) for _ in range(num_images)]
        self.backgrounds = [rng.randint(60, 140) for _ in range(num_images)]

    def __len__(self) -> int:
        return len(self.samples) * self.captions_per_image

    @property
    def num_images(self) -> int:
        return len(self.samples)

    def image(self, image_id: int):
        return render(self.samples[image_id], self.image_size, self.jitter[image_id], self.backgrounds[image_id])

    def __getitem__(self, index: int) -> tuple:
        """``(image, caption, image_id)`` of pair ``index``."""
        image_id, template = divmod(index, self.captions_per_image)
        return self.image(image_id), self.samples[image_id].caption(template), image_id

    def text_and_group(self, index: int) -> tuple[str, int]:
        image_id, template = divmod(index, self.captions_per_image)
        return self.samples[image_id].caption(template), image_id

    def hard_negative(self, index: int, rng: random.Random) -> str:
        """Pair ``index``'s caption with exactly one attribute (colour, shape, size or position) changed."""
        sample = self.samples[index // self.captions_per_image]
        attribute = rng.choice(("colour", "shape", "size", "position"))
        choices = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}[attribute]
        value = rng.choice([v for v in choices if v != getattr(sample, attribute)])
        return sample.with_attribute(attribute, value).caption(0)
