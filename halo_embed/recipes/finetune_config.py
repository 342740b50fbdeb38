"""Every option of ``halo-embed finetune``, declared once: its default, its command-line flag and its help.

Flag names follow open_clip's trainer (``--train-data``, ``--batch-size``,
``--accum-freq``, ``--lock-image``, ``--precision`` ...); see README for where
a meaning differs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.images import DEFAULT_MAX_PIXELS
from .options import add_dataclass_arguments, dataclass_from_args, option

LOSSES = ("halo", "clip", "siglip")
#: --precision -> accelerate's mixed_precision
PRECISIONS = {"fp32": "no", "amp": "fp16", "fp16": "fp16", "amp_bf16": "bf16", "bf16": "bf16"}


@dataclass
class FinetuneConfig:
    """The recipe's options and their defaults."""

    # model
    family: str = option("open_clip", "the model's library", choices=("open_clip", "transformers"))
    model: str = option("halo-tiny-vit", "open_clip architecture (or hf-hub:/local-dir:/config .json), "
                                         "or a transformers model id or folder")
    pretrained: str | None = option(None, "open_clip pretrained tag or local checkpoint file")
    # data
    train_data: str = option("shapes", "'shapes' (built-in), a CSV/TSV, an image folder, or an HF dataset")
    val_data: str | None = option(None, "the same kinds (default for shapes: its val split; for an HF dataset: "
                                        "--hf-val-split)")
    dataset_type: str = option("auto", "how to read --train-data / --val-data",
                               choices=("auto", "shapes", "csv", "imagefolder", "hf"))
    csv_img_key: str | None = option(None, "image path column (default: filepath, else image)")
    csv_caption_key: str | None = option(None, "caption column (default: title, else caption)")
    csv_separator: str | None = option(None, "CSV field separator (default: from the file's suffix)")
    caption_template: str = option("a photo of a {}.", "imagefolder: caption with {} for the class name")
    hf_image_column: str = option("image", "HF dataset: image column")
    hf_text_column: str = option("text", "HF dataset: caption column")
    hf_train_split: str = option("train", "HF dataset: training split")
    hf_val_split: str = option("validation", "HF dataset: validation split")
    shapes_train_images: int = option(3000, "built-in shapes: training images")
    shapes_val_images: int = option(400, "built-in shapes: validation images")
    ood_data: list[str] = option([], "folders or .npz files of OOD images for the rejection report")
    strict_images: bool = option(False, "stop at the first broken image (default: skip and count it)")
    max_image_pixels: int = option(DEFAULT_MAX_PIXELS, "larger training images count as broken (PIL's bomb limit)")
    workers: int = option(0, "DataLoader worker processes")
    # optimisation
    loss: str = option("halo", "one loss, or several to compare (same initial weights, data and seed)",
                       choices=LOSSES, nargs="+")
    epochs: int = option(5, "passes over the training data")
    max_steps: int | None = option(None, "stop after this many optimizer steps (overrides --epochs)")
    batch_size: int = option(64, "pairs per process and micro-batch")
    accum_freq: int = option(1, "micro-batches per optimizer step (each contrasts only its own pairs)")
    lr: float = option(5e-4, "peak learning rate")
    wd: float = option(0.1, "AdamW weight decay (none on gains, biases and temperatures)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.98, "AdamW beta2")
    eps: float = option(1e-6, "AdamW epsilon")
    warmup: int = option(50, "linear warm-up steps before the cosine decay")
    grad_clip_norm: float | None = option(1.0, "clip the gradient norm to this (none: no clipping)")
    precision: str = option("fp32", "autocast: amp / fp16 (CUDA), amp_bf16 / bf16; weights stay fp32",
                            choices=tuple(PRECISIONS))
    lock_image: bool = option(False, "freeze the image tower")
    lock_text: bool = option(False, "freeze the text tower")
    grad_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory)")
    # HALO
    label_smoothing: float = option(0.1, "HALO: label smoothing (also sets the abstain bias)")
    distill: bool = option(True, "HALO: label smoothing instead of self-distilled soft targets",
                           flags=("--no-distill",))
    symmetric: bool = option(True, "HALO: image->text term only", flags=("--no-symmetric",))
    rejection_weight: float = option(0.0, "HALO: weight of the absent-positive term (the sink must beat every "
                                          "wrong candidate)")
    norm_weight: float = option(0.0, "HALO: weight of the radial term on |x|^2/D")
    normalization: str = option("fixed", "HALO: centre and scale each modality with statistics measured once "
                                         "(fixed) or with every training batch's, tracked for scoring (running)",
                                choices=("fixed", "running"))
    normalization_momentum: float = option(0.05, "HALO, --normalization running: weight of each batch in the "
                                                 "running statistics")
    calibration_samples: int = option(512, "HALO: training samples that set the feature adapter's statistics")
    # run
    seed: int = option(0, "initial weights, data order and augmentation")
    logs: str = option("runs", "folder for run folders (open_clip's name; --output is the same, and torchrun-safe)",
                       flags=("--logs", "--output"))
    name: str | None = option(None, "run folder name (default: finetune-<loss>, or finetune-compare)")
    save_every: int = option(200, "save a resumable checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = option(2, "resumable checkpoints kept")
    log_every: int = option(10, "log.jsonl / TensorBoard record every this many steps")
    resume: str | None = option(None, "a checkpoint folder, or 'latest' (this run's)")
    eval_images: int = option(500, "validation images evaluated (and OOD images per set)")
    progress: bool = option(True, "no progress bar", flags=("--no-progress",))

    def run_dir(self) -> Path:
        return Path(self.logs) / (self.name or f"finetune-{self.loss}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, FinetuneConfig)


def configs_from_args(args: argparse.Namespace) -> list[FinetuneConfig]:
    """One config per requested loss (a comparison trains them in sequence, each in its own folder)."""
    losses = list(dict.fromkeys(args.loss if isinstance(args.loss, list) else [args.loss]))
    configs = []
    for loss in losses:
        config = dataclass_from_args(FinetuneConfig, args, loss=loss)
        if len(losses) > 1:
            base = Path(config.logs) / (config.name or "finetune-compare")
            config.logs, config.name = str(base), loss
        validate(config)
        configs.append(config)
    return configs


def validate(config: FinetuneConfig) -> None:
    """Raises ``ValueError`` naming the option of the first invalid value."""
    if config.loss not in LOSSES:
        raise ValueError(f"--loss must be one of {list(LOSSES)}, got {config.loss!r}")
    for name in ("batch_size", "accum_freq", "epochs", "save_every", "log_every", "keep_checkpoints", "eval_images",
                 "max_image_pixels"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.max_steps is not None and config.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1 (leave it out to train --epochs epochs), got {config.max_steps}")
    if config.loss == "halo" and config.batch_size < 2:
        raise ValueError("--batch-size must be >= 2 for HALO (each image needs other captions to compete with)")
    if config.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {config.lr}")
    if not 0 < config.normalization_momentum <= 1:
        raise ValueError(f"--normalization-momentum must be in (0, 1], got {config.normalization_momentum}")
    if config.precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {list(PRECISIONS)}, got {config.precision}")
    if PRECISIONS[config.precision] == "fp16" and not torch.cuda.is_available():
        raise ValueError("--precision amp/fp16 needs a CUDA GPU; use amp_bf16 or fp32 on CPU")
