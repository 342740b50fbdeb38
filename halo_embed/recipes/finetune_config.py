"""Every option of ``halo-embed finetune``, declared once: its default, its command-line flag and its help.

Flag names follow open_clip's trainer (``open_clip_train.main``): a flag with
one of its names has its meaning and accepts its values (``--precision``,
``--lock-image-unlocked-groups``, ``--save-frequency``, ``--log-every-n-steps``,
``--report-to``, ``--siglip`` ...); where a default differs, the help says
so. README's flag table maps every open_clip_train flag to supported /
different / not supported.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..clip.backbones import PRECISION_NAMES
from ..data.images import DEFAULT_MAX_PIXELS
from .options import add_dataclass_arguments, dataclass_from_args, given_options, option, resume_help

LOSSES = ("halo", "clip", "siglip")
#: open_clip's --precision values (their weight dtypes: halo_embed.clip.backbones.WEIGHT_DTYPES) and the
#: accelerate autocast of those that autocast; the others keep their weights' dtype, or fp32
PRECISIONS = PRECISION_NAMES
AUTOCAST = {"amp": "fp16", "amp_bf16": "bf16", "amp_bfloat16": "bf16"}
#: --preset: settings measured for one situation; options given on the command line win (README has the numbers)
PRESETS: dict[str, dict[str, object]] = {
    # a pretrained CLIP on a few hundred to a few thousand pairs: experiments/small_data_preset.py on Flickr8k-1000
    "small-data": {"lr": 3e-4, "warmup": 20, "epochs": 3, "batch_size": 64, "lock_image": True,
                   "lock_image_unlocked_groups": 2},
}
REPORT_TO = ("tensorboard", "wandb", "wandb,tensorboard", "tensorboard,wandb", "all", "none")


def optional_float(text: str) -> float | None:
    """A number, or ``none`` for no value (argparse type)."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


#: options that may differ when a run is resumed (the rest define the run and must be the run's): how long
#: it goes on, how it logs and saves, and what the final evaluation looks at
RESUMABLE_OPTIONS = ("max_steps", "epochs", "log_every", "save_every", "save_frequency", "keep_checkpoints",
                     "progress", "report_to", "workers", "feature_cache", "strict_images", "eval_images",
                     "ood_data", "zeroshot_data", "zeroshot_classnames", "zeroshot_templates", "zeroshot_images",
                     "wise_ft", "name", "logs")  # the last two: continuing a checkpoint in another folder


@dataclass
class FinetuneConfig:
    """The recipe's options and their defaults."""

    preset: str | None = option(None, "small-data: a pretrained CLIP on a few hundred to a few thousand pairs "
                                      "(measured settings, see README); options given explicitly win",
                                choices=tuple(PRESETS))
    # model
    family: str = option("open_clip", "the model's library", choices=("open_clip", "transformers"))
    model: str = option("halo-tiny-vit", "open_clip architecture (or hf-hub:/local-dir:/config .json), "
                                         "or a transformers model id or folder")
    pretrained: str | None = option(None, "open_clip pretrained tag or local checkpoint file")
    pretrained_image: str | None = option(None, "open_clip, a timm image tower (vision_cfg.timm_model_name): its "
                                                "pretrained weights from this file (timm keys, or the "
                                                "EfficientNet-PyTorch layout); open_clip_train's flag downloads "
                                                "timm's instead")
    image_mean: list[float] = option([], "override the model's image normalisation mean (3 values; open_clip's "
                                         "flag)")
    image_std: list[float] = option([], "override the model's image normalisation std (3 values; open_clip's flag)")
    image_interpolation: str | None = option(None, "override the model's resize interpolation (open_clip's flag)",
                                             choices=("bicubic", "bilinear", "random"))
    image_resize_mode: str | None = option(None, "override the model's resize mode for evaluation (open_clip's "
                                                 "flag)", choices=("shortest", "longest", "squash"))
    train_augment: str = option("model", "training images: 'model' = the model's training transform (random "
                                         "crops), 'none' = its evaluation transform (deterministic, so a locked "
                                         "image tower's features are computed once; see --feature-cache)",
                                choices=("model", "none"))
    feature_cache: str | None = option("auto", "outputs of locked towers (--lock-image / --lock-text with nothing "
                                               "unlocked before the projection), computed once and kept: 'run' = in "
                                               "the run folder, a folder (may be shared by runs), 'off', or 'auto' "
                                               "('run' without a GPU, 'off' with one: the cache hashes each input "
                                               "on the CPU, which a GPU does not need)")
    # data
    train_data: str = option("shapes", "'shapes' (built-in), a CSV/TSV, an image folder, or an HF dataset")
    val_data: str | None = option(None, "the same kinds (default for shapes: its val split; for an HF dataset: "
                                        "--hf-val-split)")
    dataset_type: str = option("auto", "how to read --train-data / --val-data (webdataset: tar shards, "
                                       "'shards/{00000..00099}.tar', '::'-separated lists or globs)",
                               choices=("auto", "shapes", "csv", "imagefolder", "hf", "webdataset"))
    train_num_samples: int | None = option(None, "webdataset: samples per epoch (required: shards have no "
                                                 "length; open_clip_train's meaning)")
    dataset_resampled: bool = option(False, "webdataset: draw shards with replacement, each worker its own "
                                            "seeded draw (open_clip_train's flag)")
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
    zeroshot_data: str | None = option(None, "labelled images (an image folder <class>/<image>, or a CSV with "
                                             "filepath/image and label/class columns) classified zero-shot from "
                                             "their class names before the first step and at the end")
    zeroshot_classnames: str | None = option(None, "class names: 'key<TAB>name' lines (folder name or label -> "
                                                   "name) or one name per line in label order (default: the "
                                                   "folder names / labels)")
    zeroshot_templates: list[str] = option(["a photo of a {}."], "prompt templates with {} (or one file with a "
                                                                  "template per line)")
    zeroshot_images: int = option(1000, "zero-shot images evaluated (a seeded random subset)")
    strict_images: bool = option(False, "stop at the first broken image (default: skip and count it)")
    max_image_pixels: int = option(DEFAULT_MAX_PIXELS, "larger training images count as broken (PIL's bomb limit)")
    workers: int = option(0, "DataLoader worker processes")
    # optimisation
    loss: str = option("halo", "one loss, or several to compare (same initial weights, data and seed); halo-embed's own option "
                                "(open_clip_train: CLIP, or --siglip)",
                       choices=LOSSES, nargs="+")
    siglip: bool = option(False, "open_clip's spelling of --loss siglip")
    epochs: int = option(5, "passes over the training data")
    max_steps: int | None = option(None, "stop after this many optimizer steps (overrides --epochs; halo-embed's own option)")
    batch_size: int = option(64, "pairs per process and micro-batch")
    accum_freq: int = option(1, "micro-batches per optimizer step; each contrasts only its own pairs (open_clip "
                                "caches a group's features so that negatives cross micro-batches)")
    lr: float = option(5e-4, "peak learning rate")
    wd: float = option(0.1, "AdamW weight decay (none on gains, biases and temperatures); --weight-decay is the "
                            "same (the CIFAR recipe's name)", flags=("--wd", "--weight-decay"))
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.98, "AdamW beta2")
    eps: float = option(1e-6, "AdamW epsilon")
    warmup: int = option(50, "linear warm-up steps before the cosine decay")
    grad_clip_norm: float | None = option(1.0, "clip the gradient norm to this; 'none' or 0: no clipping "
                                               "(default 1.0; open_clip's is none)", type=optional_float)
    precision: str = option("fp32", "open_clip's meanings: amp (fp16 autocast, CUDA) / amp_bf16 autocast with "
                                    "fp32 weights; fp16 / bf16 half-precision layer weights; pure_fp16 / pure_bf16 "
                                    "the whole model in half precision; fp32 (default fp32; open_clip's is amp)",
                            choices=tuple(PRECISIONS))
    lock_image: bool = option(False, "freeze the image tower (LiT)")
    lock_image_unlocked_groups: int = option(0, "with --lock-image: leave the last n layer groups of the image "
                                                "tower trainable (open_clip's groups)")
    lock_image_freeze_bn_stats: bool = option(False, "with --lock-image: freeze BatchNorm running statistics of the "
                                                     "locked layers (ResNet towers)")
    lock_text: bool = option(False, "freeze the text tower (its projection stays trainable for a Hugging Face "
                                    "text tower, as in open_clip)")
    lock_text_unlocked_layers: int = option(0, "with --lock-text: leave the last n layer groups of the text tower "
                                               "trainable")
    lock_text_freeze_layer_norm: bool = option(False, "with --lock-text: freeze the LayerNorms of the locked layers "
                                                      "too (Hugging Face text towers; open_clip's own text tower "
                                                      "always locks them with their layer)")
    grad_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory)")
    logit_scale: float | None = option(None, "CLIP / SigLIP: hold the logit scale at this value (not learnt; "
                                             "default: learnt from the model's own)", type=optional_float)
    # HALO
    label_smoothing: float = option(0.1, "HALO: label smoothing (also sets the abstain bias)")
    distill: bool = option(True, "HALO: label smoothing instead of self-distilled soft targets",
                           flags=("--no-distill",))
    symmetric: bool = option(True, "HALO: image->text term only", flags=("--no-symmetric",))
    rejection_weight: float = option(0.0, "HALO: weight of the absent-positive term (the sink must beat every "
                                          "wrong candidate)")
    norm_weight: float = option(0.0, "HALO: weight of the radial term on |x|^2/D")
    normalization: str = option("auto", "HALO: put every feature on the sphere of radius sqrt(D) (sphere: HALO "
                                        "ranks as the pretrained model's cosine does), or centre and scale each "
                                        "modality with statistics measured once (fixed) or with every training "
                                        "batch's, tracked for scoring (running); auto: sphere for a pretrained "
                                        "model (--pretrained, --pretrained-image, local-dir:, hf-hub:, "
                                        "transformers), fixed for random weights (measured: README)",
                                choices=("auto", "sphere", "fixed", "running"))
    init_temperature: str = option("auto", "HALO: starting temperature: a number, 'reference' (HALO's "
                                           "20 / (1 + 2/D)), 'model' (half the model's CLIP logit scale: HALO's "
                                           "softmax over captions is then CLIP's), or 'auto' (model for "
                                           "--normalization sphere, reference otherwise)")
    temperature_lr: float | None = option(None, "HALO: learning rate of the temperature (default: --lr times the "
                                                "starting temperature, so that it moves by the same fraction per "
                                                "step as CLIP's log-parameterised scale)", type=optional_float)
    normalization_momentum: float = option(0.05, "HALO, --normalization running: weight of each batch in the "
                                                 "running statistics")
    adapter_samples: int = option(512, "HALO, --normalization fixed/running: training samples on which the "
                                       "feature adapter's centre and scale are measured (not the decision: see "
                                       "--calibration-split)")
    calibration_split: float = option(0.0, "share of the training images held out (never trained on) to "
                                           "calibrate the accept / reject decision on their aligned and mismatched "
                                           "pairs at the end of training and for each WiSE-FT alpha (0: keep HALO's "
                                           "constant bias)")
    # run
    seed: int = option(0, "initial weights, data order and augmentation")
    logs: str = option("runs", "folder for run folders (open_clip's name; --output is the same, and torchrun-safe)",
                       flags=("--logs", "--output"))
    name: str | None = option(None, "run folder name (default: finetune-<loss>, or finetune-compare)")
    save_every: int = option(200, "save a resumable checkpoint every this many steps (and at the end); halo-embed's own "
                                 "option, open_clip saves per epoch (--save-frequency)")
    save_frequency: int = option(0, "also save one at the end of every n epochs (open_clip's option; default 0: "
                                    "only --save-every)")
    keep_checkpoints: int = option(2, "resumable checkpoints kept (halo-embed's own option; open_clip keeps every epoch's or, with "
                                     "--delete-previous-checkpoint, one)")
    log_every: int = option(10, "log.jsonl / tracker record every this many steps (default 10; open_clip's 100)",
                            flags=("--log-every-n-steps", "--log-every"))
    report_to: str = option("tensorboard", "trackers: tensorboard, wandb (installed separately), "
                                           "wandb,tensorboard, all, or none (default tensorboard; open_clip's is "
                                           "none)", choices=REPORT_TO)
    wise_ft: list[float] = option([], "WiSE-FT: after training, interpolate the initial and the fine-tuned "
                                      "weights at each alpha (0 = initial, 1 = fine-tuned), evaluate and save each "
                                      "(see halo-embed wise-ft)")
    resume: str | None = option(None, resume_help("a checkpoint folder", RESUMABLE_OPTIONS))
    eval_images: int = option(500, "validation images evaluated (and OOD images per set; halo-embed's own option, open_clip: "
                                   "--val-num-samples)")
    progress: bool = option(True, "no progress bar", flags=("--no-progress",))

    def run_dir(self) -> Path:
        return Path(self.logs) / (self.name or f"finetune-{self.loss}")

    def adapter_normalization(self) -> str:
        """``--normalization`` with ``auto`` resolved: ``sphere`` when the model's weights come from somewhere
        (the geometry the model was pretrained in: measured better there), ``fixed`` for random weights."""
        if self.normalization != "auto":
            return self.normalization
        pretrained = bool(self.pretrained or self.pretrained_image) or self.family == "transformers" \
            or self.model.startswith(("local-dir:", "hf-hub:"))
        return "sphere" if pretrained else "fixed"

    def feature_cache_dir(self) -> Path | None:
        """Where locked towers' features are kept (``None``: ``--feature-cache off``)."""
        choice = self.feature_cache
        if choice == "auto":
            choice = "off" if torch.cuda.is_available() else "run"
        if choice in (None, "off"):
            return None
        return self.run_dir() / "feature_cache" if choice == "run" else Path(choice)

    def preprocess_overrides(self) -> dict[str, object]:
        """The ``--image-*`` options as open_clip's ``create_model_and_transforms`` arguments (given ones only)."""
        triple = lambda values: tuple(values * 3 if len(values) == 1 else values) if values else None  # noqa: E731
        return {"image_mean": triple(self.image_mean), "image_std": triple(self.image_std),
                "image_interpolation": self.image_interpolation, "image_resize_mode": self.image_resize_mode}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, FinetuneConfig)


def configs_from_args(args: argparse.Namespace) -> list[FinetuneConfig]:
    """One config per requested loss (a comparison trains them in sequence, each in its own folder)."""
    losses = list(dict.fromkeys(args.loss if isinstance(args.loss, list) else [args.loss]))
    if getattr(args, "siglip", False):
        if "loss" in given_options(args) and losses != ["siglip"]:
            raise ValueError(f"--siglip means --loss siglip; it cannot be combined with --loss {' '.join(losses)}")
        losses = ["siglip"]
    given = given_options(args)
    preset = PRESETS.get(getattr(args, "preset", None) or "", {})
    configs = []
    for loss in losses:
        config = dataclass_from_args(FinetuneConfig, args, loss=loss,
                                     **{k: v for k, v in preset.items() if k not in given})
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
                 "max_image_pixels", "zeroshot_images"):
        if getattr(config, name) < 1:
            flag = "--log-every-n-steps" if name == "log_every" else f"--{name.replace('_', '-')}"
            raise ValueError(f"{flag} must be >= 1, got {getattr(config, name)}")
    for name in ("save_frequency", "lock_image_unlocked_groups", "lock_text_unlocked_layers"):
        if getattr(config, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}")
    for tower in ("image", "text"):
        partial = {"image": ("lock_image_unlocked_groups", "lock_image_freeze_bn_stats"),
                   "text": ("lock_text_unlocked_layers", "lock_text_freeze_layer_norm")}[tower]
        given = [name for name in partial if getattr(config, name)]
        if given and not getattr(config, f"lock_{tower}"):
            raise ValueError(f"--{given[0].replace('_', '-')} applies to a locked tower: add --lock-{tower}")
    bad_alphas = [alpha for alpha in config.wise_ft if not (math.isfinite(alpha) and 0 <= alpha <= 1)]
    if bad_alphas:
        raise ValueError(f"--wise-ft alphas must be in [0, 1], got {bad_alphas[0]}")
    if config.report_to not in REPORT_TO:
        raise ValueError(f"--report-to must be one of {list(REPORT_TO)}, got {config.report_to!r}")
    if "wandb" in config.report_to or config.report_to == "all":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ValueError(f"--report-to {config.report_to} needs wandb: pip install wandb (or --report-to "
                             "tensorboard)")
    if config.zeroshot_data is not None:
        from ..clip.zeroshot import read_templates

        if not Path(config.zeroshot_data).exists():
            raise ValueError(f"--zeroshot-data {config.zeroshot_data} does not exist")
        if config.zeroshot_classnames is not None and not Path(config.zeroshot_classnames).is_file():
            raise ValueError(f"--zeroshot-classnames {config.zeroshot_classnames} is not a file")
        try:
            read_templates(config.zeroshot_templates)
        except ValueError as error:
            raise ValueError(f"--zeroshot-templates: {error}") from None
    for name in ("image_mean", "image_std"):
        values = getattr(config, name)
        if values and (len(values) not in (1, 3) or not all(math.isfinite(v) for v in values)):
            raise ValueError(f"--{name.replace('_', '-')} takes 1 or 3 finite numbers, got {values}")
    if config.image_std and any(v <= 0 for v in config.image_std):
        raise ValueError(f"--image-std values must be > 0, got {config.image_std}")
    if config.family == "transformers":
        given = [name for name in ("pretrained", "pretrained_image", "image_mean", "image_std", "image_interpolation",
                                   "image_resize_mode") if getattr(config, name)]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is an open_clip option; a transformers model brings its "
                             "weights and image processor from its hub id or folder")
    if config.pretrained_image is not None and not Path(config.pretrained_image).is_file():
        raise ValueError(f"--pretrained-image {config.pretrained_image} is not a file")
    if config.feature_cache not in (None, "auto", "run", "off") and Path(config.feature_cache).is_file():
        raise ValueError(f"--feature-cache {config.feature_cache} is a file; give a folder, 'run' or 'off'")
    if config.train_num_samples is not None and config.train_num_samples < 1:
        raise ValueError(f"--train-num-samples must be >= 1, got {config.train_num_samples}")
    if config.max_steps is not None and config.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1 (leave it out to train --epochs epochs), got {config.max_steps}")
    if config.loss == "halo" and config.batch_size < 2:
        raise ValueError("--batch-size must be >= 2 for HALO (each image needs other captions to compete with)")
    if config.grad_clip_norm is not None and not config.grad_clip_norm >= 0:
        raise ValueError(f"--grad-clip-norm must be >= 0 or none, got {config.grad_clip_norm}")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {config.lr}")
    if not (math.isfinite(config.wd) and config.wd >= 0):
        raise ValueError(f"--wd must be a finite number >= 0, got {config.wd}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(config, name) < 1:
            raise ValueError(f"--{name} must be in [0, 1), got {getattr(config, name)}")
    if not (math.isfinite(config.eps) and config.eps > 0):
        raise ValueError(f"--eps must be a finite number > 0, got {config.eps}")
    if config.warmup < 0:
        raise ValueError(f"--warmup must be >= 0 (steps of linear warm-up), got {config.warmup}")
    if not 0 <= config.calibration_split < 1:
        raise ValueError(f"--calibration-split must be in [0, 1) (a share of the training images), got "
                         f"{config.calibration_split}")
    if config.logit_scale is not None and not (math.isfinite(config.logit_scale) and 0 < config.logit_scale <= 100):
        raise ValueError(f"--logit-scale must be in (0, 100] (open_clip clamps it at 100), got {config.logit_scale}")
    if config.logit_scale is not None and config.loss == "halo":
        raise ValueError("--logit-scale is CLIP's and SigLIP's temperature; HALO's is --init-temperature")
    if config.temperature_lr is not None and not config.temperature_lr >= 0:
        raise ValueError(f"--temperature-lr must be >= 0, got {config.temperature_lr}")
    if config.init_temperature not in ("auto", "model", "reference"):
        try:
            value = float(config.init_temperature)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and value > 0):
            raise ValueError("--init-temperature must be a positive number, 'reference', 'model' or 'auto', got "
                             f"{config.init_temperature!r}")
    if not 0 < config.normalization_momentum <= 1:
        raise ValueError(f"--normalization-momentum must be in (0, 1], got {config.normalization_momentum}")
    if config.precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {list(PRECISIONS)}, got {config.precision}")
    if "fp16" in config.precision or config.precision == "amp":
        if not torch.cuda.is_available():
            raise ValueError(f"--precision {config.precision} (float16) needs a CUDA GPU; use amp_bf16, bf16 or fp32 "
                             "on CPU")
