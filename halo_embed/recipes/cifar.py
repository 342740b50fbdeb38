"""The CIFAR reference recipe: ResNet-18 with HALO against cross-entropy, measured like the published table.

    halo-embed cifar compare --dataset cifar10 --data-dir data --download          # both losses, one report
    halo-embed cifar --loss halo --dataset cifar100 --data-dir data
    halo-embed cifar compare --preset medium --seeds 3 --data-dir runs/data/cifar10 \\
        --near-ood ../shared/datasets/cifar100-partial.npz --far-ood ../shared/datasets/svhn-partial.npz
    halo-embed cifar compare --dataset imagefolder --data-dir my_images --near-ood unknown/ --far-ood svhn

What it produces: ``<output>/<name>/{cce,halo}/`` with ``report.md``,
``metrics.json``, plots and a resumable ``checkpoint.pt``, and for ``compare``
a side-by-side report in the published table's layout (ID accuracy, ECE,
far-OOD SVHN and near-OOD CIFAR-100/-10 AUROC and FPR@95) with the published
numbers as extra columns; with ``--seeds N``, one run per seed under
``<output>/<name>/seed-<s>/`` and a report of mean ± std over seeds. Measured
results on this project's hardware (2 CPU cores, ``small``, ``medium`` and
``large`` presets) are in README.md; the published ones (200-epoch-class GPU training)
need the ``full`` preset on a GPU.

Method (defaults in :class:`CifarConfig`):

1. Seeds first; initialisation, batch order and augmentation (random crop
   with 4-pixel padding, horizontal flip) depend only on ``(seed, epoch)``; the
   training and test subsets do not depend on the seed. The data live in
   memory as one uint8 tensor, on the GPU when one is used.
2. Model: ResNet-18 in its CIFAR form (3x3 stem, no max-pool). CCE: its
   linear head gives the class logits; HALO: the same head gives a
   ``D``-dimensional embedding (``D`` = number of classes, as published) and
   :class:`~halo_embed.HALOModel` holds the centroids.
3. Losses: ``cce`` = cross-entropy with label smoothing 0.1; ``halo`` =
   :class:`~halo_embed.HALOLoss` (the reference's loss: label smoothing 0.1,
   distillation; its default fused implementation, equal to the faithful one
   up to rounding) with its temperature started at ``init_gamma`` (2). The
   reference's start, 20/(2 - (1 - 2/D)) = 16.7 for D = 10, spreads the
   initial class logits over ~10 nats; the first steps then shrink the
   centroids onto each other and HALO learns far slower than CCE
   (``experiments/cifar_halo_dynamics.py``). ``--init-gamma reference``
   restores it.
4. Optimisation: SGD (momentum 0.9, Nesterov), weight decay 5e-4 on the
   network and centroids (none on HALO's temperature), LR 0.1 x batch/128 with
   a one-epoch linear warm-up and cosine decay; bf16 autocast and
   channels-last on CUDA.
5. Evaluation through :mod:`halo_embed.eval`: accuracy, ECE (15 bins) and, for
   every score function, AUROC and both FPR@95 conventions against each
   near-/far-OOD set.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .. import HALOHead, HALOLoss, HALOModel
from .._validation import check_device
from ..inference import softmax_ood_scores
from ..io import atomic_write_json
from .common import (
    load_training_state,
    print_reports,
    recipe_main,
    refuse_to_overwrite,
    rng_state,
    save_training_state,
    seed_everything,
    set_rng_state,
    warmup_cosine,
)
from .resnet import CifarResNet18

LOSSES = ("cce", "halo")
DATASETS = ("cifar10", "cifar100", "imagefolder")
PRIMARY_SCORE = {"cce": "msp", "halo": "not_abstain"}
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

#: HALO_MATH.md: ResNet-18, embedding dim = classes; FPR@95 assumed to be the ID-kept convention.
PUBLISHED = {
    "cifar10": {
        "halo": {"accuracy": 0.9653, "ece": 0.0151, "far_auroc": 0.9808, "far_fpr95": 0.1027,
                 "near_auroc": 0.9172, "near_fpr95": 0.3763},
        "cce": {"accuracy": 0.9630, "ece": 0.0798, "far_auroc": 0.9251, "far_fpr95": 0.2208,
                "near_auroc": 0.8283, "near_fpr95": 0.4894},
    },
    "cifar100": {
        "halo": {"accuracy": 0.8080, "ece": 0.0283, "far_auroc": 0.8691, "far_fpr95": 0.6370,
                 "near_auroc": 0.8100, "near_fpr95": 0.7538},
        "cce": {"accuracy": 0.8094, "ece": 0.1102, "far_auroc": 0.8101, "far_fpr95": 0.8100,
                "near_auroc": 0.7975, "near_fpr95": 0.7677},
    },
}

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


@dataclass
class CifarConfig:
    """Every option of the CIFAR recipe and its default."""

    dataset: str = "cifar10"                 # cifar10 | cifar100 | imagefolder (any classes: train/ and test/ folders)
    data_dir: str = "data"                   # torchvision root, or an ImageFolder with train/ and test/
    download: bool = False
    near_ood: list[str] = field(default_factory=list)   # default: the other CIFAR
    far_ood: list[str] = field(default_factory=list)    # default: svhn
    loss: str = "halo"
    emb_dims: int | None = None              # HALO embedding size; default = number of classes
    init_gamma: float | None = 2.0           # HALO's starting temperature; None = the reference's 20/(2-(1-2/D))
    width: int = 64                          # ResNet-18 stage-1 channels (64 = standard)
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1                          # for batch 128; scaled linearly with the batch size
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    train_limit: int | None = None           # use a fixed random subset (smoke runs)
    test_limit: int | None = None
    ood_limit: int | None = None
    preset: str | None = None
    seed: int = 0                            # initialisation, batch order, augmentation (the data subsets are fixed)
    seeds: int = 1                           # compare: run seeds seed, seed+1, ... and report mean and std
    device: str | None = None                # default: cuda if available
    output: str = "runs"
    name: str | None = None
    resume: str | None = None                # a checkpoint.pt, or "latest"
    progress: bool = True

    def run_dir(self) -> Path:
        return Path(self.output) / (self.name or f"cifar-{self.dataset}") / self.loss


#: the options a preset sets (each also a command-line option)
PRESET_OPTIONS = frozenset(key for preset in PRESETS.values() for key in preset)


def apply_preset(config: CifarConfig, explicit: set[str]) -> CifarConfig:
    """A preset's values, except for options given explicitly on the command line."""
    if config.preset is None:
        return config
    if config.preset not in PRESETS:
        raise ValueError(f"--preset must be one of {list(PRESETS)}, got {config.preset!r}")
    return replace(config, **{k: v for k, v in PRESETS[config.preset].items() if k not in explicit})


def published_columns(dataset: str) -> dict[str, dict[str, float]]:
    """The reference's numbers for ``dataset`` in the order of :data:`LOSSES` (none for an image folder)."""
    return {loss: PUBLISHED[dataset][loss] for loss in LOSSES} if dataset in PUBLISHED else {}


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
    if config.emb_dims is not None and config.emb_dims < 2:
        raise ValueError(f"--emb-dims must be >= 2, got {config.emb_dims}")
    if config.init_gamma is not None and not config.init_gamma > 0:
        raise ValueError(f"--init-gamma must be a positive temperature or 'reference', got {config.init_gamma}")
    if config.device is not None:
        check_device("--device", config.device)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


@dataclass
class CifarData:
    train: Any
    test: Any
    near: dict[str, Any]
    far: dict[str, Any]
    classes: list[str]


def load_data(config: CifarConfig, with_ood: bool = True) -> CifarData:
    """ID train/test (torchvision or an ImageFolder copy) and (``with_ood``) the near/far OOD sets."""
    from ..data.arrays import load_image_folder, load_ood, load_torchvision

    root = Path(config.data_dir)
    if (root / "train").is_dir() and (root / "test").is_dir():
        train = load_image_folder(root / "train")
        test = load_image_folder(root / "test", classes=train.classes)
    elif config.dataset == "imagefolder":
        raise FileNotFoundError(f"--dataset imagefolder needs {root}/train/<class>/ and {root}/test/<class>/ folders")
    else:
        train = load_torchvision(config.dataset, root, train=True, download=config.download)
        test = load_torchvision(config.dataset, root, train=False, download=config.download)
    expected = {"cifar10": 10, "cifar100": 100}.get(config.dataset)
    if expected is not None and len(train.classes or []) != expected:
        raise ValueError(f"{config.dataset} needs {expected} classes, {root} has {len(train.classes or [])}")
    near_specs = config.near_ood or ["cifar100" if config.dataset == "cifar10" else "cifar10"]
    far_specs = config.far_ood or ["svhn"]
    load = lambda spec: load_ood(spec, root, config.download, config.ood_limit)  # noqa: E731
    near = {a.name: a for a in map(load, near_specs)} if with_ood else {}
    far = {a.name: a for a in map(load, far_specs)} if with_ood else {}
    # the subsets do not depend on --seed: every seed trains and is evaluated on the same images
    return CifarData(train.subset(config.train_limit), test.subset(config.test_limit), near, far, list(train.classes))


# ---------------------------------------------------------------------------
# Model and training
# ---------------------------------------------------------------------------


def build(config: CifarConfig, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """``(model, criterion)``: the same ResNet-18, as a classifier (CCE) or an embedder with centroids (HALO)."""
    torch.manual_seed(config.seed)
    if config.loss == "cce":
        return CifarResNet18(num_classes, config.width), nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    d = config.emb_dims or num_classes
    model = HALOModel(CifarResNet18(d, config.width), num_classes, d)
    return model, HALOLoss(d, num_classes, label_smoothing=config.label_smoothing, init_gamma=config.init_gamma)


def optimizer_and_schedule(config: CifarConfig, model: nn.Module, criterion: nn.Module, steps_per_epoch: int):
    """SGD (Nesterov) with weight decay on the network and centroids, none on HALO's temperature;
    LR ``lr x batch / 128`` with a linear warm-up over ``warmup_epochs`` and cosine decay to 0."""
    optimizer = torch.optim.SGD(
        [{"params": list(model.parameters()), "weight_decay": config.weight_decay},
         {"params": list(criterion.parameters()), "weight_decay": 0.0}],
        lr=config.lr * config.batch_size / 128, momentum=config.momentum, nesterov=True,
    )
    scheduler = warmup_cosine(optimizer, config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch)
    return optimizer, scheduler


def _device(config: CifarConfig) -> torch.device:
    return torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def check_run_folder(config: CifarConfig) -> None:
    """A run never overwrites another (see :func:`~halo_embed.recipes.common.refuse_to_overwrite`); a folder
    without a checkpoint (stopped in its first epoch) is started again, as ``--resume latest --seeds`` does."""
    refuse_to_overwrite(config.run_dir(), config.resume, ["checkpoint.pt"])


def train(config: CifarConfig, data: CifarData | None = None) -> dict[str, Any]:
    """Train one loss (resumable) and evaluate it; returns the metrics."""
    from tqdm.auto import tqdm

    from ..data.arrays import AugmentedBatches

    validate(config)
    check_run_folder(config)
    seed_everything(config.seed)
    data = data or load_data(config)
    device = _device(config)
    cuda = device.type == "cuda"
    run_dir = config.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", asdict(config))

    model, criterion = build(config, len(data.classes))
    model, criterion = model.to(device), criterion.to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    batches = AugmentedBatches(data.train, config.batch_size, CIFAR_MEAN, CIFAR_STD, device, train=True,
                               seed=config.seed, channels_last=cuda)
    if len(batches) == 0:
        raise ValueError(f"{len(data.train)} training images are fewer than one batch of {config.batch_size}")
    optimizer, scheduler = optimizer_and_schedule(config, model, criterion, len(batches))
    total = config.epochs * len(batches)
    start_epoch = 0
    checkpoint_path = run_dir / "checkpoint.pt"
    if config.resume:
        state = load_training_state(checkpoint_path if config.resume == "latest" else config.resume)
        model.load_state_dict(state["model"])
        criterion.load_state_dict(state["criterion"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_epoch = state["epoch"]
        print(f"resumed from epoch {start_epoch}")

    log_path = run_dir / "log.jsonl"
    if start_epoch == 0 and log_path.exists():
        log_path.unlink()
    bar = tqdm(total=total, initial=start_epoch * len(batches), disable=not config.progress,
               desc=f"{config.dataset} {config.loss}", dynamic_ncols=True)
    for epoch in range(start_epoch, config.epochs):
        model.train()
        started, loss_sum = time.perf_counter(), torch.zeros((), device=device)
        for x, y in batches.epoch(epoch):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                if config.loss == "halo":
                    embeddings, centroids = model(x)
                    loss, _ = criterion(embeddings, y, centroids)  # HALOLoss computes in fp32
                else:
                    loss = criterion(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach()
            bar.update(1)
        record = {"epoch": epoch + 1, "loss": (loss_sum / len(batches)).item(), "lr": scheduler.get_last_lr()[0],
                  "seconds": time.perf_counter() - started}
        if config.loss == "halo":
            record["gamma"] = criterion.effective_gamma.item()
        bar.set_postfix(loss=f"{record['loss']:.3f}")
        with open(log_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        save_training_state(checkpoint_path, {
            "model": model.state_dict(), "criterion": criterion.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "rng": rng_state(), "config": asdict(config),
        })
    bar.close()
    metrics = evaluate(config, model, criterion, data, device)
    write_run_report(run_dir, config, metrics)
    return metrics


# ---------------------------------------------------------------------------
# Evaluation and reports
# ---------------------------------------------------------------------------


@torch.no_grad()
def predict(config: CifarConfig, model: nn.Module, criterion: nn.Module, array, device) -> dict[str, Any]:
    """Probabilities, closed-set predictions, OOD scores (and embeddings) for an :class:`ImageArray`."""
    from ..data.arrays import AugmentedBatches

    model.eval()
    cuda = device.type == "cuda"
    head = HALOHead.from_trained(model, criterion) if config.loss == "halo" else None
    parts: dict[str, list] = {"probs": [], "pred": [], "embeddings": [], "abstained": []}
    scores: dict[str, list] = {}
    for x, _ in AugmentedBatches(array, 512, CIFAR_MEAN, CIFAR_STD, device, channels_last=cuda).epoch():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = model(x)
        if head is not None:
            embeddings = out[0].float()
            result = head(embeddings)
            probs, pred, batch_scores, abstained = result.probs, result.probs[:, :-1].argmax(1), result.scores, result.abstained
        else:
            embeddings = out.float()
            probs, pred = torch.softmax(embeddings, 1), embeddings.argmax(1)
            batch_scores, abstained = softmax_ood_scores(embeddings), torch.zeros(len(x), dtype=torch.bool)
        for key, value in (("probs", probs), ("pred", pred), ("embeddings", embeddings), ("abstained", abstained)):
            parts[key].append(value.float().cpu() if key != "pred" else value.cpu())
        for name, value in batch_scores.items():
            scores.setdefault(name, []).append(value.float().cpu())
    return {**{k: torch.cat(v) for k, v in parts.items()}, "scores": {k: torch.cat(v) for k, v in scores.items()}}


def evaluate(config: CifarConfig, model, criterion, data: CifarData, device) -> dict[str, Any]:
    from ..eval import accuracy, expected_calibration_error, ood_table

    known = predict(config, model, criterion, data.test, device)
    unseen = {name: predict(config, model, criterion, arr, device) for name, arr in {**data.near, **data.far}.items()}
    ood = ood_table(known["scores"], {n: u["scores"] for n, u in unseen.items()}, near=list(data.near), far=list(data.far))
    calibration = expected_calibration_error(known["probs"], data.test.labels)
    metrics = {
        "accuracy": accuracy(known["pred"], data.test.labels),
        "ece": calibration.ece,
        "abstain_rate_test": known["abstained"].float().mean().item(),
        **{f"abstain_rate[{n}]": u["abstained"].float().mean().item() for n, u in unseen.items()},
        "ood": ood.metrics,
        "near": list(data.near),
        "far": list(data.far),
        "n_train": len(data.train),
        "n_test": len(data.test),
    }
    return {"metrics": metrics, "calibration": calibration, "ood": ood, "known": known, "unseen": unseen,
            "labels": data.test.labels,
            "centroids": model.centered_centroids().detach().float().cpu() if config.loss == "halo" else None}


def headline(result: dict[str, Any], loss: str) -> dict[str, float]:
    """The published table's rows for one run (its primary score; near/far averaged over their sets)."""
    m = result["metrics"]
    ood = m["ood"][PRIMARY_SCORE[loss]]
    group = lambda names, key: sum(ood[n][key] for n in names) / len(names)  # noqa: E731
    return {
        "accuracy": m["accuracy"], "ece": m["ece"],
        "far_auroc": group(m["far"], "auroc"), "far_fpr95": group(m["far"], "fpr95_id_kept"),
        "near_auroc": group(m["near"], "auroc"), "near_fpr95": group(m["near"], "fpr95_id_kept"),
        "far_fpr95_ood_caught": group(m["far"], "fpr95_ood_caught"),
        "near_fpr95_ood_caught": group(m["near"], "fpr95_ood_caught"),
    }


def table_rows(data_names: tuple[list[str], list[str]]) -> list[tuple[str, str]]:
    near, far = data_names
    return [
        ("accuracy", "ID accuracy %"), ("ece", "ECE"),
        ("far_auroc", f"far-OOD ({', '.join(far)}) AUROC %"), ("far_fpr95", "far-OOD FPR@95 (ID kept) %"),
        ("far_fpr95_ood_caught", "far-OOD FPR@95 (OOD caught) %"),
        ("near_auroc", f"near-OOD ({', '.join(near)}) AUROC %"), ("near_fpr95", "near-OOD FPR@95 (ID kept) %"),
        ("near_fpr95_ood_caught", "near-OOD FPR@95 (OOD caught) %"),
    ]


def _strip(result: dict[str, Any]) -> dict[str, Any]:
    return {"metrics": result["metrics"], "calibration": result["calibration"].to_dict()}


def write_run_report(run_dir: Path, config: CifarConfig, result: dict[str, Any]) -> Path:
    from ..eval import embedding_pca, reliability_diagram, score_histograms, write_report

    m = result["metrics"]
    score = PRIMARY_SCORE[config.loss]
    reliability_diagram(result["calibration"], run_dir / "reliability.png", f"{config.loss.upper()}: reliability")
    score_histograms(result["known"]["scores"][score], {n: u["scores"][score] for n, u in result["unseen"].items()},
                     run_dir / "scores.png", f"{config.loss.upper()}: {score}")
    embedding_pca(result["known"]["embeddings"], result["labels"], run_dir / "pca.png",
                  centroids=result["centroids"], title=f"{config.loss.upper()}: test embeddings (PCA)")
    sections = [
        f"`{config.loss}` on {config.dataset} ({m['n_train']} training / {m['n_test']} test images), ResNet-18 "
        f"width {config.width}, {config.epochs} epochs, batch {config.batch_size}, seed {config.seed}.\n",
        f"ID accuracy {100 * m['accuracy']:.2f} %, ECE {m['ece']:.4f}.\n",
        "## OOD, every score function\n\n" + result["ood"].to_markdown(),
    ]
    plots = {"Reliability": "reliability.png", f"{score} on ID vs OOD": "scores.png", "Embeddings": "pca.png"}
    return write_report(run_dir, f"CIFAR recipe: {config.loss} on {config.dataset}", {**_strip(result), "config": asdict(config)},
                        sections, plots)


def write_comparison(configs: Sequence[CifarConfig], results: Sequence[dict[str, Any]]) -> Path:
    from ..eval import side_by_side, write_report

    config = configs[0]
    root = config.run_dir().parent
    first = results[0]["metrics"]
    columns = {c.loss.upper(): headline(r, c.loss) for c, r in zip(configs, results)}
    for loss, published in published_columns(config.dataset).items():
        columns[f"{loss.upper()} (published)"] = published
    sections = [
        f"Same seed, data and budget for both losses: ResNet-18 width {config.width}, {config.epochs} epochs, "
        f"batch {config.batch_size}, {first['n_train']} training and {first['n_test']} test images of "
        f"{config.dataset}. OOD score: CCE `msp`, HALO `not_abstain` (1 - p(abstain))"
        + ("; the published columns are the reference's ResNet-18 results (FPR@95 assumed ID-kept; the OOD sets "
           "there are the full test sets).\n" if config.dataset in PUBLISHED else ".\n"),
        "## The published table's layout\n\n" + side_by_side(columns, table_rows((first["near"], first["far"]))),
    ]
    for c, r in zip(configs, results):
        sections.append(f"## {c.loss.upper()}: every score function\n\n" + r["ood"].to_markdown())
    payload = {c.loss: _strip(r) for c, r in zip(configs, results)}
    payload["config"] = asdict(config)
    plots = {f"{c.loss.upper()} embeddings": f"{c.loss}/pca.png" for c in configs}
    return write_report(root, f"CIFAR recipe: CCE vs HALO on {config.dataset}", payload, sections, plots)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for one seed)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def seed_metrics(result: dict[str, Any], loss: str) -> dict[str, float]:
    """One run's headline rows plus every score function's far- and near-OOD AUROC (``far_auroc[score]``)."""
    m = result["metrics"]
    values = headline(result, loss)
    for score, per_set in m["ood"].items():
        for group in ("far", "near"):
            values[f"{group}_auroc[{score}]"] = sum(per_set[n]["auroc"] for n in m[group]) / len(m[group])
    return values


def write_seed_comparison(config: CifarConfig, runs: dict[str, list[dict[str, float]]], seeds: Sequence[int],
                          set_names: tuple[list[str], list[str]]) -> Path:
    """The published table's layout with ``mean ± std`` over seeds, every score function, and each seed's row."""
    from ..eval import format_value, markdown_table, write_report

    root = config.run_dir().parent.parent
    summary = {loss: {key: _mean_std([run[key] for run in per_seed]) for key in per_seed[0]}
               for loss, per_seed in runs.items()}
    cell = lambda key, pair: f"{format_value(key, pair[0])} ± {format_value(key, pair[1])}"  # noqa: E731
    names = [loss.upper() for loss in runs]
    published = published_columns(config.dataset)
    rows = [[label] + [cell(key, summary[loss][key]) for loss in runs]
            + [format_value(key, numbers.get(key)) for numbers in published.values()]
            for key, label in table_rows(set_names)]
    header = ["metric"] + [f"{n} (mean ± std)" for n in names] + [f"{loss.upper()} (published)" for loss in published]
    scores = [[f"{loss.upper()} `{key.split('[')[1][:-1]}`", cell(key, summary[loss][key]),
               cell(key.replace("far", "near", 1), summary[loss][key.replace("far", "near", 1)])]
              for loss in runs for key in summary[loss] if key.startswith("far_auroc[")]
    per_seed = [[f"{loss.upper()} seed {seed}"] + [format_value(k, run[k]) for k in ("accuracy", "ece", "far_auroc", "near_auroc")]
                for loss, per in runs.items() for seed, run in zip(seeds, per)]
    sections = [
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); for each seed both losses share the initial backbone "
        f"seed, data, batch order and budget: ResNet-18 width {config.width}, {config.epochs} epochs, batch "
        f"{config.batch_size}, {config.train_limit or 'all'} training images of {config.dataset}. Standard "
        "deviations are over seeds (sample std). OOD score: CCE `msp`, HALO `not_abstain`.\n",
        "## The published table's layout\n\n" + markdown_table(header, rows),
        "## AUROC % of every score function (far, near)\n\n" + markdown_table(["loss, score", "far-OOD", "near-OOD"], scores),
        "## Each seed\n\n" + markdown_table(["run", "accuracy %", "ECE", "far AUROC %", "near AUROC %"], per_seed),
    ]
    payload = {"seeds": list(seeds), "config": asdict(config),
               **{loss: {"per_seed": per, "mean": {k: v[0] for k, v in summary[loss].items()},
                         "std": {k: v[1] for k, v in summary[loss].items()}} for loss, per in runs.items()}}
    return write_report(root, f"CIFAR recipe over {len(seeds)} seeds on {config.dataset}", payload, sections)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _init_gamma(text: str) -> float | None:
    if text == "reference":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'reference', got {text!r}") from None


class _Given(argparse.Action):
    """Store the value and remember that the option was given, so that ``--preset`` does not override it
    (however it was spelt: ``--epochs 7``, ``--epochs=7``, an abbreviation)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given_options = getattr(namespace, "given_options", frozenset()) | {self.dest}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = CifarConfig()

    def add(*flags, **kwargs):
        if flags[0].lstrip("-").replace("-", "_") in PRESET_OPTIONS:
            kwargs["action"] = _Given
        parser.add_argument(*flags, **kwargs)

    add("action", nargs="?", choices=("train", "compare"), default="train",
        help="train one loss (default) or compare both with the same seed and budget")
    add("--dataset", choices=DATASETS, default=d.dataset,
        help="imagefolder: any labelled images in <data-dir>/train/<class>/ and <data-dir>/test/<class>/")
    add("--data-dir", default=d.data_dir, help="torchvision root, or a folder with train/<class>/ and test/<class>/")
    add("--download", action="store_true", help="download the torchvision datasets that are missing")
    add("--near-ood", nargs="*", default=[], help="near-OOD sets: cifar10/cifar100/svhn/mnist, or folders/.npz/idx")
    add("--far-ood", nargs="*", default=[], help="far-OOD sets (default: svhn)")
    add("--loss", choices=LOSSES, default=d.loss)
    add("--emb-dims", type=int, default=d.emb_dims)
    add("--init-gamma", type=_init_gamma, default=d.init_gamma,
        help=f"HALO's starting temperature, or 'reference' for the published 20/(2-(1-2/D)) (default: {d.init_gamma})")
    add("--width", type=int, default=d.width)
    add("--epochs", type=int, default=d.epochs)
    add("--batch-size", type=int, default=d.batch_size)
    add("--lr", type=float, default=d.lr)
    add("--momentum", type=float, default=d.momentum)
    add("--weight-decay", type=float, default=d.weight_decay)
    add("--warmup-epochs", type=int, default=d.warmup_epochs)
    add("--label-smoothing", type=float, default=d.label_smoothing)
    add("--train-limit", type=int, default=d.train_limit)
    add("--test-limit", type=int, default=d.test_limit)
    add("--ood-limit", type=int, default=d.ood_limit)
    add("--preset", choices=tuple(PRESETS), default=d.preset)
    add("--seed", type=int, default=d.seed, help="initialisation, batch order and augmentation")
    add("--seeds", type=int, default=d.seeds, help="run seeds seed..seed+N-1 and report mean ± std (resumable)")
    add("--device", default=d.device)
    add("--output", default=d.output)
    add("--name", default=d.name)
    add("--resume", default=d.resume, help="a checkpoint.pt, or 'latest' (this run's)")
    add("--no-progress", dest="progress", action="store_false")


def configs_from_args(args: argparse.Namespace) -> list[CifarConfig]:
    values = {k: v for k, v in vars(args).items() if k in CifarConfig.__dataclass_fields__}
    config = apply_preset(CifarConfig(**values), set(getattr(args, "given_options", ())))
    losses = LOSSES if args.action == "compare" else (config.loss,)
    configs = [replace(config, loss=loss) for loss in losses]
    for c in configs:
        validate(c)
    return configs


def seeded(config: CifarConfig, seed: int) -> CifarConfig:
    """The run of one seed in a multi-seed comparison: ``<output>/<name>/seed-<seed>/<loss>``.

    With ``--resume latest`` a seed that has no checkpoint yet starts from scratch.
    """
    name = f"{config.name or f'cifar-{config.dataset}'}/seed-{seed}"
    seeded_config = replace(config, seed=seed, name=name)
    if config.resume == "latest" and not (seeded_config.run_dir() / "checkpoint.pt").is_file():
        seeded_config = replace(seeded_config, resume=None)
    return seeded_config


def run(args: argparse.Namespace) -> int:
    configs = configs_from_args(args)
    first = configs[0]
    if first.seeds > 1 and first.resume not in (None, "latest"):
        raise ValueError(f"--resume with --seeds takes 'latest' (each seed resumes its own run), got {first.resume!r}")
    seeds = list(range(first.seed, first.seed + first.seeds))
    for config in configs:  # every run folder is checked before the data are loaded and the first run trains
        for seed in seeds:
            check_run_folder(config if first.seeds == 1 else seeded(config, seed))
    data = load_data(first)
    if first.seeds == 1:
        results = [train(c, data) for c in configs]
        return print_reports(configs, results, write_comparison)
    runs: dict[str, list[dict[str, float]]] = {c.loss: [] for c in configs}
    for seed in seeds:
        for c in configs:
            result = train(seeded(c, seed), data)
            runs[c.loss].append(seed_metrics(result, c.loss))
    set_names = (result["metrics"]["near"], result["metrics"]["far"])
    path = write_seed_comparison(seeded(first, seeds[0]), runs, seeds, set_names)
    print(f"comparison over {len(seeds)} seeds: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return recipe_main("halo_embed.recipes.cifar", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
