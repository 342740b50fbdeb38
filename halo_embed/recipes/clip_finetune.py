"""Fine-tune a CLIP model with HALO (or with CLIP's / SigLIP's loss, for comparison), driven by Accelerate.

    halo-embed finetune --model ViT-B-32 --pretrained openai --train-data train.csv --val-data val.csv
    accelerate launch -m halo_embed.recipes.clip_finetune --train-data ...        # several GPUs / machines
    halo-embed finetune --loss halo clip                                          # both, same init and data

What it produces: a run folder ``<logs>/<name>/`` with checkpoints you can
resume, ``log.jsonl`` and TensorBoard logs, the final model (for HALO a
checkpoint the scorer loads, ``checkpoint/``), and ``report.md`` /
``metrics.json`` with retrieval R@1/5/10 both ways and rejection of mismatched
pairs (shuffled captions, hard negatives, OOD images): AUROC, both FPR@95s,
AUPR, and the accuracy of HALO's built-in threshold next to the baseline's
tuned one. Measured numbers for the built-in data and real data are in README.md.

Method, in order:

1. Seeds first (python, numpy, torch); the data order is a function of
   ``(seed, epoch)`` and each sample's augmentation of ``(seed, draw)``, so a
   resumed run replays the same batches.
2. The backbone is built the way its library's users do
   (``open_clip.create_model_and_transforms(model, pretrained=...)`` or
   ``transformers.AutoModel.from_pretrained``); towers are optionally locked.
3. HALO: the feature adapter is calibrated on the first training samples
   (each modality centred and scaled to unit mean square, identical on every
   process), then :class:`~halo_embed.clip.HALOCLIP` trains with
   :class:`~halo_embed.losses.PairedHALOLoss` (captions as the images'
   centroids, the origin as abstain candidate, symmetric, teacher-free targets,
   radial term; its ``K`` is the global batch size). Baselines: open_clip's
   ``ClipLoss`` / ``SigLipLoss`` on L2-normalised features with the model's
   own logit scale (and bias), reused, not rewritten.
4. AdamW without weight decay on gains, biases and temperatures; linear
   warm-up then cosine decay; gradient clipping; mixed precision from
   Accelerate; gradient accumulation over ``--accum-freq`` micro-batches, each
   micro-batch contrasting only its own pairs (its negatives do not cross
   micro-batches, as in open_clip without feature caching).
5. Checkpoints every ``--save-every`` steps and at the end (written to a
   temporary folder and renamed); ``--resume`` restores model, optimizer,
   scheduler, RNG state and the position in the data.
6. Evaluation through :mod:`halo_embed.clip.evaluate` on the validation data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..data.images import DEFAULT_MAX_PIXELS
from ..io import atomic_write_json, atomic_write_text
from .common import print_reports, recipe_main, refuse_to_overwrite, seed_everything, warmup_cosine

LOSSES = ("halo", "clip", "siglip")
PRECISIONS = {"fp32": "no", "amp": "fp16", "fp16": "fp16", "amp_bf16": "bf16", "bf16": "bf16"}


# ---------------------------------------------------------------------------
# Defaults, in one place
# ---------------------------------------------------------------------------


@dataclass
class FinetuneConfig:
    """Every option of the recipe and its default (CLI names follow open_clip's trainer)."""

    # model
    family: str = "open_clip"            # open_clip | transformers
    model: str = "halo-tiny-vit"         # open_clip name / hf-hub: / local-dir: / config JSON; or HF id/folder
    pretrained: str | None = None        # open_clip tag or local checkpoint file
    # data
    train_data: str = "shapes"           # "shapes" (built-in), a CSV/TSV, an image folder, or an HF dataset
    val_data: str | None = None          # same kinds; default for shapes: its val split
    dataset_type: str = "auto"           # auto | shapes | csv | imagefolder | hf
    csv_img_key: str | None = None       # None: open_clip's "filepath", else "image"
    csv_caption_key: str | None = None   # None: open_clip's "title", else "caption"
    csv_separator: str | None = None
    caption_template: str = "a photo of a {}."   # imagefolder: captions name the class
    hf_image_column: str = "image"
    hf_text_column: str = "text"
    hf_train_split: str = "train"
    hf_val_split: str = "validation"
    shapes_train_images: int = 3000
    shapes_val_images: int = 400
    ood_data: list[str] = field(default_factory=list)  # folders / .npz of OOD images for the report
    strict_images: bool = False          # stop at the first broken image instead of skipping it
    workers: int = 0
    # optimisation
    loss: str = "halo"
    epochs: int = 5
    max_steps: int | None = None         # stop after this many optimizer steps (overrides epochs)
    batch_size: int = 64                 # per process
    accum_freq: int = 1
    lr: float = 5e-4
    wd: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup: int = 50
    grad_clip_norm: float | None = 1.0
    precision: str = "fp32"              # fp32 | amp / fp16 | amp_bf16 / bf16
    lock_image: bool = False
    lock_text: bool = False
    grad_checkpointing: bool = False
    # HALO
    label_smoothing: float = 0.1
    distill: bool = True
    symmetric: bool = True
    rejection_weight: float = 0.0        # absent-positive term (see PairedHALOLoss)
    norm_weight: float = 0.0             # radial NLL on |x|^2/D (see PairedHALOLoss)
    normalization: str = "fixed"         # feature adapter: "fixed" statistics or "running" (see FeatureAdapter)
    normalization_momentum: float = 0.05
    calibration_samples: int = 512
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # larger training images count as broken (PIL's bomb limit)
    # run
    seed: int = 0
    logs: str = "runs"
    name: str | None = None
    save_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: str | None = None            # a checkpoint folder, or "latest" (of this run)
    eval_images: int = 500
    progress: bool = True

    def run_dir(self) -> Path:
        return Path(self.logs) / (self.name or f"finetune-{self.loss}")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = FinetuneConfig()
    add = parser.add_argument
    add("--family", choices=("open_clip", "transformers"), default=d.family)
    add("--model", default=d.model, help="open_clip architecture (or hf-hub:/local-dir:/config .json), or an HF id/folder")
    add("--pretrained", default=d.pretrained, help="open_clip pretrained tag or local checkpoint file")
    add("--train-data", default=d.train_data, help="'shapes' (built-in), a CSV/TSV, an image folder, or an HF dataset")
    add("--val-data", default=d.val_data)
    add("--dataset-type", choices=("auto", "shapes", "csv", "imagefolder", "hf"), default=d.dataset_type)
    add("--csv-img-key", default=d.csv_img_key, help="image path column (default: filepath, else image)")
    add("--csv-caption-key", default=d.csv_caption_key, help="caption column (default: title, else caption)")
    add("--csv-separator", default=d.csv_separator)
    add("--caption-template", default=d.caption_template, help="imagefolder: caption with {} for the class name")
    add("--hf-image-column", default=d.hf_image_column)
    add("--hf-text-column", default=d.hf_text_column)
    add("--hf-train-split", default=d.hf_train_split)
    add("--hf-val-split", default=d.hf_val_split)
    add("--shapes-train-images", type=int, default=d.shapes_train_images)
    add("--shapes-val-images", type=int, default=d.shapes_val_images)
    add("--ood-data", nargs="*", default=[], help="folders or .npz files of OOD images for the rejection report")
    add("--strict-images", action="store_true", help="stop at the first broken image (default: skip and count)")
    add("--max-image-pixels", type=int, default=d.max_image_pixels, help="larger images count as broken")
    add("--workers", type=int, default=d.workers)
    add("--loss", nargs="+", choices=LOSSES, default=[d.loss], help="one loss, or several to compare (same init)")
    add("--epochs", type=int, default=d.epochs)
    add("--max-steps", type=int, default=d.max_steps)
    add("--batch-size", type=int, default=d.batch_size, help="per process")
    add("--accum-freq", type=int, default=d.accum_freq)
    add("--lr", type=float, default=d.lr)
    add("--wd", type=float, default=d.wd)
    add("--beta1", type=float, default=d.beta1)
    add("--beta2", type=float, default=d.beta2)
    add("--eps", type=float, default=d.eps)
    add("--warmup", type=int, default=d.warmup)
    add("--grad-clip-norm", type=float, default=d.grad_clip_norm)
    add("--precision", choices=tuple(PRECISIONS), default=d.precision)
    add("--lock-image", action="store_true")
    add("--lock-text", action="store_true")
    add("--grad-checkpointing", action="store_true")
    add("--label-smoothing", type=float, default=d.label_smoothing)
    add("--no-distill", dest="distill", action="store_false", help="HALO: label smoothing instead of soft targets")
    add("--no-symmetric", dest="symmetric", action="store_false", help="HALO: image->text term only")
    add("--rejection-weight", type=float, default=d.rejection_weight,
        help="HALO: weight of the absent-positive term (the sink must beat every wrong candidate)")
    add("--norm-weight", type=float, default=d.norm_weight, help="HALO: weight of the radial term on |x|^2/D")
    add("--normalization", choices=("fixed", "running"), default=d.normalization,
        help="HALO: centre and scale each modality with statistics measured once (fixed) or with every "
             "training batch's, tracked for scoring (running)")
    add("--normalization-momentum", type=float, default=d.normalization_momentum,
        help="HALO, --normalization running: weight of each batch in the running statistics")
    add("--calibration-samples", type=int, default=d.calibration_samples)
    add("--seed", type=int, default=d.seed)
    add("--logs", "--output", dest="logs", default=d.logs,
        help="folder for run folders (open_clip's name; --output is the same, and torchrun-safe)")
    add("--name", default=d.name)
    add("--save-every", type=int, default=d.save_every)
    add("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    add("--log-every", type=int, default=d.log_every)
    add("--resume", default=d.resume, help="a checkpoint folder, or 'latest'")
    add("--eval-images", type=int, default=d.eval_images)
    add("--no-progress", dest="progress", action="store_false")


def config_from_args(args: argparse.Namespace) -> list[FinetuneConfig]:
    """One config per requested loss (a comparison trains them in sequence, each in its own folder)."""
    values = {k: v for k, v in vars(args).items() if k in FinetuneConfig.__dataclass_fields__}
    losses = list(dict.fromkeys(values.pop("loss")))
    configs = []
    for loss in losses:
        config = FinetuneConfig(**values, loss=loss)
        if len(losses) > 1:
            base = Path(config.logs) / (config.name or "finetune-compare")
            config.logs, config.name = str(base), loss
        validate(config)
        configs.append(config)
    return configs


def check_run_folder(config: FinetuneConfig) -> None:
    """A run never overwrites another (see :func:`~halo_embed.recipes.common.refuse_to_overwrite`)."""
    refuse_to_overwrite(config.run_dir(), config.resume, ["checkpoints/latest", "checkpoint", "report.md"])


def validate(config: FinetuneConfig) -> None:
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


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def _kind(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    if path == "shapes":
        return "shapes"
    p = Path(path)
    if p.suffix.lower() in (".csv", ".tsv", ".tab"):
        return "csv"
    if p.is_dir() and any(c.is_dir() for c in p.iterdir()) and not (p / "dataset_info.json").exists() \
            and not (p / "dataset_dict.json").exists():
        return "imagefolder"
    return "hf"


def load_pairs(config: FinetuneConfig, split: str):
    """The pair source of ``split`` ("train" or "val") and, for the built-in data, its extras."""
    from ..data.collections import ImageFolderPairs
    from ..data.pairs import CSVPairs, HFPairs
    from ..data.shapes import ShapesDataset

    path = config.train_data if split == "train" else (config.val_data or config.train_data)
    kind = _kind(path, config.dataset_type)
    if kind == "shapes":
        images = config.shapes_train_images if split == "train" else config.shapes_val_images
        return ShapesDataset("train" if split == "train" else "val", images, seed=config.seed)
    if split == "val" and config.val_data is None and kind != "hf":
        raise ValueError("--val-data is required for this --train-data (only the built-in shapes and HF datasets "
                         "with a validation split have one)")
    if kind == "csv":
        return CSVPairs(path, config.csv_img_key, config.csv_caption_key, config.csv_separator)
    if kind == "imagefolder":
        return ImageFolderPairs(path, config.caption_template)
    return HFPairs(path, config.hf_train_split if split == "train" else config.hf_val_split,
                   config.hf_image_column, config.hf_text_column)


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


class ContrastiveCLIP(nn.Module):
    """The baselines: open_clip's ClipLoss / SigLipLoss on normalised features (the backbone's logit scale)."""

    def __init__(self, backbone, loss: str, rank: int, world_size: int) -> None:
        super().__init__()
        from open_clip.loss import ClipLoss, SigLipLoss

        self.backbone = backbone
        self.loss_name = loss
        inner = backbone.model
        self.logit_bias = getattr(inner, "logit_bias", None)
        if loss == "siglip":
            self.loss = SigLipLoss(rank=rank, world_size=world_size)
            if self.logit_bias is None:  # SigLIP's initialisation (Zhai et al. 2023): t = 10, b = -10
                self.logit_bias = nn.Parameter(torch.tensor(-10.0))
                with torch.no_grad():
                    inner.logit_scale.fill_(math.log(10.0))
        else:
            self.loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.backbone.model.logit_scale

    def forward(self, pixel_values, tokens, image_ids=None, return_parts: bool = False):
        images = nn.functional.normalize(self.backbone.encode_image(pixel_values).float(), dim=-1)
        texts = nn.functional.normalize(self.backbone.encode_text(tokens).float(), dim=-1)
        scale = self.logit_scale.float().exp().clamp(max=100.0)
        if self.loss_name == "siglip":
            loss = self.loss(images, texts, scale, self.logit_bias)
        else:
            loss = self.loss(images, texts, scale)
        if return_parts:
            return loss, {"logit_scale": scale.detach().reshape(())}
        return loss


def build_model(config: FinetuneConfig, rank: int = 0, world_size: int = 1):
    from ..clip import HALOCLIP, load_backbone

    torch.manual_seed(config.seed)  # same initial weights for every loss of a comparison
    backbone = load_backbone(config.family, config.model, config.pretrained)
    if config.lock_image:
        backbone.lock_image()
    if config.lock_text:
        backbone.lock_text()
    if config.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    if config.loss == "halo":
        return HALOCLIP(
            backbone, num_candidates=config.batch_size * world_size, symmetric=config.symmetric,
            distill=config.distill, label_smoothing=config.label_smoothing,
            rejection_weight=config.rejection_weight, norm_weight=config.norm_weight,
            normalization=config.normalization, momentum=config.normalization_momentum,
        )
    return ContrastiveCLIP(backbone, config.loss, rank, world_size)


def evaluation_view(model):
    from ..clip import HALOCLIP
    from ..clip.evaluate import CosineView, HALOView

    if isinstance(model, HALOCLIP):
        return HALOView(model)
    return CosineView(model.backbone, model.logit_scale, model.logit_bias if model.loss_name == "siglip" else None)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on gains, biases, norms, temperatures and embeddings of position."""
    no_decay_words = ("bias", "norm", "ln_", "bn", "logit_scale", "logit_bias", "gamma", "positional_embedding",
                      "class_embedding")
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or any(word in name for word in no_decay_words):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


class Progress:
    """The position in the run, saved with every checkpoint."""

    def __init__(self) -> None:
        self.step, self.epoch, self.batches_in_epoch, self.skipped_images = 0, 0, 0, 0

    def state_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    return sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if root.is_dir() else []


def save_training_state(accelerator, run_dir: Path, progress: Progress, keep: int) -> Path:
    """``accelerator.save_state`` into a temporary folder, renamed to ``checkpoints/step-N`` when complete."""
    target = run_dir / "checkpoints" / f"step-{progress.step:07d}"
    staging = run_dir / "checkpoints" / f".staging-step-{progress.step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(staging / "progress.json", progress.state_dict())
        shutil.rmtree(target, ignore_errors=True)
        os.rename(staging, target)
        atomic_write_text(run_dir / "checkpoints" / "latest", target.name + "\n")
        for old in _checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def resolve_resume(resume: str, run_dir: Path) -> Path:
    if resume == "latest":
        pointer = run_dir / "checkpoints" / "latest"
        if not pointer.is_file():
            raise FileNotFoundError(f"--resume latest: no checkpoint in {run_dir / 'checkpoints'}")
        path = run_dir / "checkpoints" / pointer.read_text().strip()
    else:
        path = Path(resume)
    if not (path / "progress.json").is_file():
        raise FileNotFoundError(f"--resume: {path} is not a training checkpoint (no progress.json)")
    return path


class JsonlLog:
    """Append-only JSON lines on the main process; on resume, entries after the checkpoint are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        elif enabled and resume_step is None and path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


def train(config: FinetuneConfig) -> dict[str, Any]:
    """Run one fine-tuning (and its evaluation); returns the metrics."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from ..data.images import ImageLoadError
    from ..data.pairs import EpochSampler, PairDataset, collate_pairs

    validate(config)
    seed_everything(config.seed)
    run_dir = config.run_dir()
    accelerator = Accelerator(
        # without CUDA, accelerate only joins a torchrun/MPI process group when told it is on CPU
        cpu=not torch.cuda.is_available(),
        mixed_precision=PRECISIONS[config.precision],
        step_scheduler_with_optimizer=False,  # one scheduler step per optimizer step, whatever the process count
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")),
    )
    main = accelerator.is_main_process
    check_run_folder(config)
    accelerator.wait_for_everyone()  # every rank has looked before the main one creates the folder

    model = build_model(config, accelerator.process_index, accelerator.num_processes)
    backbone = model.backbone
    train_source = load_pairs(config, "train")
    dataset = PairDataset(train_source, backbone.image_transform(train=True), seed=config.seed,
                          max_pixels=config.max_image_pixels)
    sampler = EpochSampler(len(dataset), seed=config.seed)
    loader = DataLoader(
        dataset, batch_size=config.batch_size, sampler=sampler, num_workers=config.workers, drop_last=True,
        collate_fn=partial(collate_pairs, tokenize=backbone.tokenize),
    )
    if len(loader) == 0:
        raise ValueError(f"the training data has {len(dataset)} pairs, fewer than one batch of {config.batch_size}")
    load_pairs(config, "val")  # a missing or malformed --val-data is reported now, not after training
    if main:  # the model and the data are usable: the run folder is created only now
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", asdict(config))

    resume_dir = resolve_resume(config.resume, run_dir) if config.resume else None
    if config.loss == "halo" and resume_dir is None:
        # a seeded random sample (files are often sorted by class), the same on every process,
        # so every rank gets the same statistics
        calibration = PairDataset(train_source, backbone.image_transform(train=False), seed=config.seed,
                                  max_pixels=config.max_image_pixels)
        count = min(config.calibration_samples, len(calibration))
        chosen = torch.randperm(len(calibration), generator=torch.Generator().manual_seed(config.seed))[:count].tolist()
        batches = [collate_pairs([calibration[i] for i in chosen[s : s + 64]], backbone.tokenize)
                   for s in range(0, count, 64)]
        usable = [(b["pixels"], b["tokens"]) for b in batches if b["pixels"] is not None]
        if not usable:
            errors = [e for b in batches for e in b["errors"]]
            raise ImageLoadError(f"none of the {count} calibration samples could be read, e.g. {errors[0]}"
                                 if errors else "the training data has no usable sample to calibrate on")
        stats = model.calibrate(usable)
        accelerator.print(f"adapter calibrated on {count} samples: {stats}")

    steps_per_epoch = math.ceil(len(loader) / config.accum_freq)
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(parameter_groups(model, config.wd), lr=config.lr,
                                  betas=(config.beta1, config.beta2), eps=config.eps)
    scheduler = warmup_cosine(optimizer, config.warmup, total_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        accelerator.print(f"resumed from {resume_dir} at step {progress.step}")
    accelerator.init_trackers("finetune", config={k: v for k, v in asdict(config).items()
                                                  if isinstance(v, (int, float, str, bool))})
    log = JsonlLog(run_dir / "log.jsonl", main, progress.step if resume_dir else None)

    bar = tqdm(total=total_steps, initial=progress.step, disable=not (main and config.progress),
               desc=f"finetune {config.loss}", dynamic_ncols=True)
    window_start, window_samples = time.perf_counter(), 0
    model.train()
    while progress.step < total_steps:
        loader.set_epoch(progress.epoch)
        batches = accelerator.skip_first_batches(loader, progress.batches_in_epoch) \
            if progress.batches_in_epoch else loader
        group: list[dict[str, Any]] = []
        whole_epoch, usable_batches, first_error = progress.batches_in_epoch == 0, 0, None
        for batch in batches:
            progress.batches_in_epoch += 1
            if batch["errors"]:
                progress.skipped_images += len(batch["errors"])
                first_error = first_error or batch["errors"][0]
                if config.strict_images:
                    raise ImageLoadError(f"broken training image (--strict-images): {batch['errors'][0]}")
            if batch["pixels"] is None:
                if accelerator.num_processes > 1:
                    raise ImageLoadError(f"every image of a batch is broken, e.g. {batch['errors'][0]}")
                continue
            usable_batches += 1
            group.append(batch)
            last_of_epoch = progress.batches_in_epoch == len(loader)
            if len(group) < config.accum_freq and not last_of_epoch:
                continue
            parts = optimizer_step(accelerator, model, optimizer, scheduler, group, config)
            window_samples += sum(len(b["captions"]) for b in group) * accelerator.num_processes
            group = []
            progress.step += 1
            bar.update(1)
            if progress.step % config.log_every == 0 or progress.step == total_steps:
                elapsed = time.perf_counter() - window_start
                record = {"step": progress.step, "epoch": progress.epoch, "lr": scheduler.get_last_lr()[0],
                          "samples_per_s": window_samples / max(elapsed, 1e-9),
                          "skipped_images": progress.skipped_images, **parts}
                accelerator.log({k: v for k, v in record.items() if k not in ("step",)}, step=progress.step)
                log.write(record)
                bar.set_postfix(loss=f"{parts['loss']:.3f}")
                window_start, window_samples = time.perf_counter(), 0
            if progress.step % config.save_every == 0 or progress.step == total_steps:
                save_training_state(accelerator, run_dir, progress, config.keep_checkpoints)
            if progress.step >= total_steps:
                break
        else:
            if whole_epoch and usable_batches == 0:  # every image broken: another epoch would loop forever
                raise ImageLoadError(f"no training image of a whole epoch could be read, e.g. {first_error}")
            progress.epoch += 1
            progress.batches_in_epoch = 0
            continue
        break
    bar.close()
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    metrics: dict[str, Any] = {"config": asdict(config), "steps": progress.step,
                               "skipped_images": progress.skipped_images,
                               "skipped_rows": len(getattr(train_source, "bad_rows", []))}
    if main:
        if config.loss == "halo":
            from ..clip import save_checkpoint

            save_checkpoint(unwrapped, run_dir / "checkpoint", extra={"step": progress.step, "config": asdict(config)})
        metrics.update(evaluate_run(unwrapped, config, accelerator.device))
        write_run_report(run_dir, config, metrics)
    accelerator.end_training()
    return metrics


def optimizer_step(accelerator, model, optimizer, scheduler, group: list[dict[str, Any]],
                   config: FinetuneConfig) -> dict[str, float]:
    """One optimizer step over the micro-batches of ``group`` (gradients synchronised on the last)."""
    import contextlib

    totals: dict[str, float] = {}
    for index, batch in enumerate(group):
        sync = index == len(group) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            with accelerator.autocast():
                loss, parts = model(batch["pixels"], batch["tokens"], batch["image_ids"], return_parts=True)
            accelerator.backward(loss / len(group))
        totals["loss"] = totals.get("loss", 0.0) + loss.item() / len(group)
        for key, value in parts.items():
            totals[key] = totals.get(key, 0.0) + float(value) / len(group)
    if accelerator.num_processes > 1:  # log the global batch's values, not rank 0's shard
        keys = sorted(totals)
        reduced = accelerator.reduce(torch.tensor([totals[k] for k in keys], device=accelerator.device), "mean")
        totals = dict(zip(keys, reduced.tolist()))
    if config.grad_clip_norm:
        totals["grad_norm"] = float(accelerator.clip_grad_norm_(model.parameters(), config.grad_clip_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return totals


# ---------------------------------------------------------------------------
# Evaluation and report
# ---------------------------------------------------------------------------


def eval_data_for(config: FinetuneConfig):
    from ..clip.evaluate import build_eval_data
    from ..data.collections import ImageCollection
    from ..data.shapes import ShapesDataset, ood_texture

    source = load_pairs(config, "val")
    ood = {}
    hard = None
    if isinstance(source, ShapesDataset):
        hard = source.hard_negative
        ood["textures"] = [ood_texture(i, config.seed) for i in range(config.eval_images)]
    for path in config.ood_data:
        collection = ImageCollection(path, limit=config.eval_images)
        ood[collection.name] = collection
    return build_eval_data(source, config.eval_images, config.seed, ood, hard)


def evaluate_run(model, config: FinetuneConfig, device) -> dict[str, Any]:
    """Retrieval and rejection on the validation data (and the unseen combinations of the built-in data)."""
    from ..clip.evaluate import build_eval_data, evaluate_alignment
    from ..data.shapes import ShapesDataset

    model.eval()
    view = evaluation_view(model)
    results = {"val": evaluate_alignment(view, eval_data_for(config), device)}
    if _kind(config.train_data, config.dataset_type) == "shapes":
        unseen = ShapesDataset("unseen", config.shapes_val_images, seed=config.seed)
        results["unseen combinations"] = evaluate_alignment(
            view, build_eval_data(unseen, config.eval_images, config.seed, hard_negative=unseen.hard_negative), device)
    return {"eval": results}


def headline(metrics: dict[str, Any], split: str = "val") -> dict[str, float]:
    """The flat numbers of the comparison table."""
    result = metrics["eval"][split]
    rejection = result["rejection"]
    flat = {f"R@{k} {d}": result["retrieval"][f"{d}_R@{k}"] for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    for name, values in rejection.items():
        flat[f"AUROC {name}"] = values["auroc"]
        flat[f"FPR@95 (aligned kept) {name}"] = values["fpr95_id_kept"]
    pooled = rejection["all mismatched"]
    flat["FPR@95 (mismatch caught) all mismatched"] = pooled["fpr95_ood_caught"]
    flat["AUPR-in all mismatched"] = pooled["aupr_in"]
    flat["built-in threshold accuracy"] = pooled.get("builtin_threshold_accuracy")
    flat["tuned threshold accuracy"] = pooled["tuned_threshold_accuracy"]
    return flat


def _plots(run_dir: Path, name: str, result: dict[str, Any]) -> dict[str, str]:
    from ..eval import roc_curves, score_histograms

    scores = result["scores"]
    negatives = {k: v for k, v in scores.items() if k != "aligned"}
    score_histograms(scores["aligned"], negatives, run_dir / f"{name}_pair_scores.png",
                     "pair scores: aligned (ID) vs mismatched")
    roc_curves(scores["aligned"], negatives, run_dir / f"{name}_roc.png", "aligned vs mismatched pairs")
    return {f"{name}: pair scores": f"{name}_pair_scores.png", f"{name}: ROC": f"{name}_roc.png"}


def _strip(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics without the raw arrays (for JSON)."""
    out = json.loads(json.dumps(metrics, default=lambda o: None))
    for result in out.get("eval", {}).values():
        result.pop("scores", None)
        result.pop("embeddings", None)
    return out


def write_run_report(run_dir: Path, config: FinetuneConfig, metrics: dict[str, Any]) -> Path:
    from ..eval import markdown_table, side_by_side, write_report

    plots: dict[str, str] = {}
    sections = [f"Loss `{config.loss}`, model `{config.model}` ({config.family}), data `{config.train_data}`, "
                f"{metrics['steps']} steps of {config.batch_size} pairs, seed {config.seed}; "
                f"{metrics['skipped_images']} broken training images skipped.\n"]
    for split, result in metrics["eval"].items():
        rows = [[name, *(f"{100 * v[k]:.2f}" for k in ("auroc", "fpr95_id_kept", "fpr95_ood_caught", "aupr_in")),
                 "-" if v.get("builtin_threshold_accuracy") is None else f"{100 * v['builtin_threshold_accuracy']:.2f}",
                 f"{100 * v['tuned_threshold_accuracy']:.2f}"] for name, v in result["rejection"].items()]
        sections.append(f"## {split}: rejection (aligned pairs vs mismatched)\n\n" + markdown_table(
            ["negatives", "AUROC %", "FPR@95 (aligned kept) %", "FPR@95 (mismatch caught) %", "AUPR-in %",
             "built-in threshold acc. %", "tuned threshold acc. %"], rows))
        sections.append(f"## {split}: retrieval\n\n" + side_by_side(
            {config.loss: result["retrieval"]}, [(k, k) for k in result["retrieval"]]))
        plots.update(_plots(run_dir, split.replace(" ", "_"), result))
    return write_report(run_dir, f"Fine-tune with `{config.loss}`", _strip(metrics), sections, plots)


def write_comparison(configs: Sequence[FinetuneConfig], results: Sequence[dict[str, Any]]) -> Path:
    from ..eval import side_by_side, write_report

    root = Path(configs[0].logs)
    splits = list(results[0]["eval"])
    sections = ["Same initial weights, data, steps and seed for every loss. Threshold accuracies are balanced "
                "accuracies on the report half of the pairs; the tuned threshold is chosen on the other half.\n"]
    for split in splits:
        flats = {c.loss: headline(r, split) for c, r in zip(configs, results)}
        keys = list(next(iter(flats.values())))
        sections.append(f"## {split}\n\n" + side_by_side(flats, [(k, k + (" %" if "accuracy" in k or "R@" in k
                                                                           or "AUROC" in k or "FPR" in k or "AUPR" in k else ""))
                                                                 for k in keys]))
    payload = {c.loss: _strip(r) for c, r in zip(configs, results)}
    return write_report(root, "Fine-tuning comparison: " + " vs ".join(c.loss for c in configs), payload, sections,
                        {f"{c.loss}: pair scores ({s})": f"{c.name}/{s.replace(' ', '_')}_pair_scores.png"
                         for c in configs for s in splits[:1]})


def run(args: argparse.Namespace) -> int:
    configs = config_from_args(args)
    for config in configs:  # a comparison fails before its first loss trains, not after
        check_run_folder(config)
    results = [train(config) for config in configs]
    print_reports(configs, results, write_comparison)
    skipped = sum(r["skipped_images"] for r in results), sum(r["skipped_rows"] for r in results)
    if any(skipped):  # exit status 1: done, but some input was rejected
        print(f"{skipped[0]} training image draw(s) and {skipped[1]} CSV row(s) were skipped (see the warnings "
              "above and skipped_images in log.jsonl)", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return recipe_main("halo_embed.recipes.clip_finetune", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
