"""Every option of ``halo-embed cifar``, declared once (default, flag, help), its presets and validation."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Collection

from .._validation import check_device
from ..inference import DECISION_RULES
from .classification import LOSSES
from .options import add_dataclass_arguments, option, resume_help

__all__ = ["DATASETS", "PRESETS", "CifarConfig", "add_arguments", "apply_preset", "parse_init_gamma", "validate"]

DATASETS = ("cifar10", "cifar100", "imagefolder")

PRESETS: dict[str, dict[str, Any]] = {
    # the published setting's scale (a GPU: ~30 s/epoch/loss on an H100-class card with bf16)
    "full": {},
    # 2 CPU cores: a narrower network, a data subset and a few epochs (minutes)
    "small": {"width": 16, "epochs": 4, "train_limit": 10000, "test_limit": 2000, "ood_limit": 1000,
              "batch_size": 128},
    # 2 CPU cores, ~6 minutes per run: the same network on twice the images for twice the epochs
    "medium": {"width": 16, "epochs": 8, "train_limit": 20000, "test_limit": 2000, "ood_limit": 1000,
               "batch_size": 128},
    # 2 CPU cores, ~10 minutes per run: every training image, 6 epochs
    "large": {"width": 16, "epochs": 6, "train_limit": None, "test_limit": 2000, "ood_limit": 1000,
              "batch_size": 128},
}


#: options that may differ when a run is resumed (the rest define the run and must be the run's)
RESUMABLE_OPTIONS = ("epochs", "device", "progress", "seeds", "preset", "download", "data_dir",
                     "near_ood", "far_ood", "ood_limit", "name", "output", "calibration_ood", "keep", "decision")


def parse_init_gamma(text: str) -> float | None:
    """``--init-gamma``: a positive starting temperature, or ``reference`` (``None``: the published start)."""
    if text == "reference":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'reference', got {text!r}")
    return value


@dataclass
class CifarConfig:
    """Every option of the CIFAR recipe and its default."""

    dataset: str = option("cifar10", "imagefolder: any labelled images in <data-dir>/train/<class>/ and "
                                     "<data-dir>/test/<class>/", choices=DATASETS)
    data_dir: str = option("data", "torchvision root, or a folder with train/<class>/ and test/<class>/")
    download: bool = option(False, "download the torchvision datasets that are missing")
    near_ood: list[str] = option([], "near-OOD sets: cifar10/cifar100/svhn/mnist, or folders/.npz/idx "
                                     "(default: the other CIFAR)")
    far_ood: list[str] = option([], "far-OOD sets (default: svhn)")
    loss: str = option("halo", "the loss of a single run (compare trains both)", choices=LOSSES)
    embed_dim: int | None = option(None, "HALO's embedding size (default: the number of classes, as published)")
    init_gamma: float | None = option(2.0, "HALO's starting temperature, or 'reference' for the published "
                                           "20/(2-(1-2/D))", type=parse_init_gamma)
    width: int = option(64, "ResNet-18 stage-1 channels (64 = standard)")
    epochs: int = option(200, "training epochs")
    batch_size: int = option(128, "images per batch")
    lr: float = option(0.1, "SGD learning rate for batch 128; scaled linearly with the batch size")
    momentum: float = option(0.9, "SGD (Nesterov) momentum")
    weight_decay: float = option(5e-4, "on the network and centroids (none on HALO's temperature); --wd is the "
                                       "same (finetune's and open_clip's name)", flags=("--weight-decay", "--wd"))
    warmup_epochs: int = option(1, "linear warm-up before the cosine decay")
    temperature_lr: float = option(1.0, "HALO's temperature learns at this multiple of the learning rate")
    temperature_schedule: str = option("cosine", "HALO's temperature rate: decays with the network's (cosine) or "
                                                 "stays at its peak after the warm-up (constant), free to grow late",
                                       choices=("cosine", "constant"))
    label_smoothing: float = option(0.1, "both losses")
    calibration_split: float = option(0.1, "share of each class's training images held out (never trained on) "
                                           "to set the decision: HALO's sink, CCE's thresholds; in (0, 1)")
    calibration_ood: list[str] = option([], "held-out OOD sets (like --near-ood) for the decision: thresholds "
                                            "then separate them from the held-out ID images instead of keeping "
                                            "--keep of those; never the test OOD sets")
    keep: float = option(0.95, "the decision keeps this share of the held-out ID images (without "
                               "--calibration-ood); in (0, 1]")
    decision: str = option("sink", "HALO's decision: the sink against the classes (the K+1 argmax) with a "
                                   "calibrated bias, or also a limit on the distance to the nearest prototype",
                           choices=DECISION_RULES)
    train_limit: int | None = option(None, "train on a fixed random subset of this many images")
    test_limit: int | None = option(None, "evaluate on a fixed random subset of this many test images")
    ood_limit: int | None = option(None, "images per OOD set")
    preset: str | None = option(None, "a budget: small / medium / large (2 CPU cores), full (published scale); "
                                      "options given explicitly win", choices=tuple(PRESETS))
    seed: int = option(0, "initialisation, batch order and augmentation (the data subsets are fixed)")
    seeds: int = option(1, "compare: run seeds seed..seed+N-1 and report mean ± std (resumable)")
    device: str | None = option(None, "default: cuda if available")
    output: str = option("runs", "folder for run folders (--logs is the same: finetune's and open_clip's name)",
                         flags=("--output", "--logs"))
    name: str | None = option(None, "run folder name (default: cifar-<dataset>)")
    resume: str | None = option(None, resume_help("a checkpoint file (a run's checkpoints/latest.pt)", RESUMABLE_OPTIONS))
    progress: bool = option(True, "no progress bar", flags=("--no-progress",))

    def run_dir(self) -> Path:
        return Path(self.output) / (self.name or f"cifar-{self.dataset}") / self.loss


def apply_preset(config: CifarConfig, explicit: Collection[str]) -> CifarConfig:
    """A preset's values, except for options given explicitly on the command line."""
    if config.preset is None:
        return config
    if config.preset not in PRESETS:
        raise ValueError(f"--preset must be one of {list(PRESETS)}, got {config.preset!r}")
    return replace(config, **{k: v for k, v in PRESETS[config.preset].items() if k not in explicit})


def validate(config: CifarConfig) -> None:
    if config.dataset not in DATASETS:
        raise ValueError(f"--dataset must be one of {DATASETS}, got {config.dataset!r}")
    if config.dataset == "imagefolder" and not (config.near_ood and config.far_ood):
        raise ValueError("--dataset imagefolder needs --near-ood and --far-ood (there is no default OOD set)")
    if config.loss not in LOSSES:
        raise ValueError(f"--loss must be one of {LOSSES}, got {config.loss!r}")
    for name in ("width", "epochs", "batch_size", "seeds"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.embed_dim is not None and config.embed_dim < 2:
        raise ValueError(f"--embed-dim must be >= 2, got {config.embed_dim}")
    if config.init_gamma is not None and not config.init_gamma > 0:
        raise ValueError(f"--init-gamma must be a positive temperature or 'reference', got {config.init_gamma}")
    if not (config.temperature_lr >= 0.0 and config.temperature_lr != float("inf")):
        raise ValueError(f"--temperature-lr must be a finite number >= 0, got {config.temperature_lr}")
    if config.temperature_schedule not in ("cosine", "constant"):
        raise ValueError(f"--temperature-schedule must be cosine or constant, got {config.temperature_schedule!r}")
    if not 0.0 < config.calibration_split < 1.0:
        raise ValueError(f"--calibration-split must be in (0, 1), got {config.calibration_split}")
    tested = set(config.near_ood or ["cifar100" if config.dataset == "cifar10" else "cifar10"]) | \
        set(config.far_ood or ["svhn"])
    for spec in config.calibration_ood:
        if spec in tested:
            raise ValueError(f"--calibration-ood {spec} is also a test OOD set: the decision would be set on "
                             "the images it is measured on")
    if not 0.0 < config.keep <= 1.0:
        raise ValueError(f"--keep must be in (0, 1], got {config.keep}")
    if config.decision not in DECISION_RULES:
        raise ValueError(f"--decision must be one of {DECISION_RULES}, got {config.decision!r}")
    if config.device is not None:
        check_device("--device", config.device)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=("train", "compare"), default="train",
                        help="train one loss (default) or compare both with the same seed and budget")
    add_dataclass_arguments(parser, CifarConfig)
