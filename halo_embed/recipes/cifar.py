"""The CIFAR reference recipe: ResNet-18 with HALO against cross-entropy, measured like the published table.

    halo-embed cifar compare --dataset cifar10 --data-dir data --download          # both losses, one report
    halo-embed cifar --loss halo --dataset cifar100 --data-dir data
    halo-embed cifar compare --preset medium --seeds 3 --data-dir runs/data/cifar10 \\
        --near-ood ../shared/datasets/cifar100-partial.npz --far-ood ../shared/datasets/svhn-partial.npz
    halo-embed cifar compare --dataset imagefolder --data-dir my_images --near-ood unknown/ --far-ood svhn

What it produces: ``<output>/<name>/{cce,halo}/`` with ``report.md``,
``metrics.json``, plots and a resumable ``checkpoints/latest.pt``, and for ``compare``
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
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .. import HALOHead, HALOLoss, HALOModel
from ..io import atomic_write_json
from .classification import LOSSES, concatenate, evaluate_classifier, predictions
from .cifar_config import RESUMABLE_OPTIONS, CifarConfig, add_arguments, apply_preset, validate
from .cifar_report import seed_metrics, write_comparison, write_run_report, write_seed_comparison
from .common import print_reports, recipe_main, warmup_cosine
from .options import dataclass_from_args, given_options
from .runs import (CIFAR_CHECKPOINT, JsonlLog, load_state_file, refuse_to_overwrite, rng_state, run_path,
                   save_state_file, set_rng_state)
from .resnet import CifarResNet18

#: ``halo-embed cifar`` (:mod:`halo_embed.cli`): the one-line help and the description
HELP = "the CIFAR reference recipe: ResNet-18 with HALO vs cross-entropy, measured like the published table"
CLI_DESCRIPTION = """``halo-embed cifar``: the CIFAR reference recipe (ResNet-18, HALO vs cross-entropy).

    halo-embed cifar compare --dataset cifar10 --data-dir data --download
    halo-embed cifar --loss halo --preset small --data-dir runs/data/cifar10 --near-ood ... --far-ood ...

See ``python -m halo_embed.recipes.cifar --help`` for the method and defaults.
"""

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


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
    calibration: Any = None       # held out of the training subset: sets the decision, never trained on
    calibration_ood: dict[str, Any] = field(default_factory=dict)


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
    calibration_ood = {a.name: a for a in map(load, config.calibration_ood)} if with_ood else {}
    # the subsets do not depend on --seed: every seed trains, decides and is evaluated on the same images
    train, calibration = train.subset(config.train_limit).split_per_class(config.calibration_split)
    return CifarData(train, test.subset(config.test_limit), near, far, list(train.classes), calibration,
                     calibration_ood)


# ---------------------------------------------------------------------------
# Model and training
# ---------------------------------------------------------------------------


def build(config: CifarConfig, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """``(model, criterion)``: the same ResNet-18, as a classifier (CCE) or an embedder with centroids (HALO)."""
    torch.manual_seed(config.seed)
    if config.loss == "cce":
        return CifarResNet18(num_classes, config.width), nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    d = config.embed_dim or num_classes
    model = HALOModel(CifarResNet18(d, config.width), num_classes, d)
    return model, HALOLoss(d, num_classes, label_smoothing=config.label_smoothing, init_gamma=config.init_gamma)


def optimizer_and_schedule(config: CifarConfig, model: nn.Module, criterion: nn.Module, steps_per_epoch: int):
    """SGD (Nesterov) with weight decay on the network and centroids, none on HALO's temperature;
    LR ``lr x batch / 128`` with a linear warm-up over ``warmup_epochs`` and cosine decay to 0; HALO's
    temperature at ``temperature_lr`` times that rate, decaying alike or (``constant``) not after the warm-up."""
    base = config.lr * config.batch_size / 128
    optimizer = torch.optim.SGD(
        [{"params": list(model.parameters()), "weight_decay": config.weight_decay},
         {"params": list(criterion.parameters()), "weight_decay": 0.0, "lr": base * config.temperature_lr}],
        lr=base, momentum=config.momentum, nesterov=True,
    )
    warmup, total = config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch
    scheduler = warmup_cosine(optimizer, warmup, total, constant_groups=(1,) if config.temperature_schedule == "constant" else ())
    return optimizer, scheduler


def _device(config: CifarConfig) -> torch.device:
    return torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def check_run_folder(config: CifarConfig) -> None:
    """A run never overwrites another (see :func:`~halo_embed.recipes.runs.refuse_to_overwrite`); a folder
    without a checkpoint (stopped in its first epoch) is started again, as ``--resume latest --seeds`` does."""
    refuse_to_overwrite(config.run_dir(), config.resume, [CIFAR_CHECKPOINT])




def train(config: CifarConfig, data: CifarData | None = None) -> dict[str, Any]:
    """Train one loss (resumable) and evaluate it; returns the metrics. One process per run folder."""
    from ..io import claim_for

    validate(config)
    run_dir = config.run_dir()
    with claim_for(run_dir, f"run folder {run_dir}"):
        return _train_owned(config, data)


def _train_owned(config: CifarConfig, data: CifarData | None) -> dict[str, Any]:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from ..data.arrays import AugmentedBatches
    from .runs import check_resume

    check_run_folder(config)
    run_dir = config.run_dir()
    checkpoint_path = run_path(run_dir, CIFAR_CHECKPOINT)
    state = None
    if config.resume:  # read and checked before anything is written or trained
        state = load_state_file(checkpoint_path if config.resume == "latest" else config.resume)
        changed = check_resume(state.get("config") or {}, config, RESUMABLE_OPTIONS,
                               f"the checkpoint's ({checkpoint_path if config.resume == 'latest' else config.resume})")
    set_seed(config.seed)
    data = data or load_data(config)
    device = _device(config)
    cuda = device.type == "cuda"
    run_dir.mkdir(parents=True, exist_ok=True)
    if state is None or not (run_dir / "config.json").is_file():
        atomic_write_json(run_dir / "config.json", asdict(config))  # a resume never rewrites the run's config

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
    if state is not None:
        model.load_state_dict(state["model"])
        criterion.load_state_dict(state["criterion"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_epoch = state["epoch"]
        print(f"resumed from epoch {start_epoch}")

    log = JsonlLog(run_dir / "log.jsonl", True, start_epoch if config.resume else None, position_key="epoch")
    if state is not None:
        log.write({"epoch": start_epoch, "resumed": True, "changed": changed})
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
            record["temperature"] = criterion.temperature.item()
        bar.set_postfix(loss=f"{record['loss']:.3f}")
        log.write(record)
        save_state_file(checkpoint_path, {
            "model": model.state_dict(), "criterion": criterion.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "rng": rng_state(), "config": asdict(config),
        })
    bar.close()
    metrics = evaluate(config, model, criterion, data, device)
    if metrics.get("head") is not None:  # the calibrated decision travels with the weights
        state, decision = load_state_file(checkpoint_path), metrics["head"].calibration.to_dict()
        if state.get("decision") != decision:
            save_state_file(checkpoint_path, {**state, "decision": decision})
    write_run_report(run_dir, config, metrics)
    return metrics


# ---------------------------------------------------------------------------
# Evaluation and reports
# ---------------------------------------------------------------------------


@torch.no_grad()
def predict(config: CifarConfig, model: nn.Module, array, device, head: HALOHead | None = None) -> dict[str, Any]:
    """Probabilities, closed-set predictions, OOD scores (and embeddings) for an :class:`ImageArray`; HALO's
    through ``head``, CCE's from the logits."""
    from ..data.arrays import AugmentedBatches

    model.eval()
    cuda = device.type == "cuda"
    batches = []
    for x, _ in AugmentedBatches(array, 512, CIFAR_MEAN, CIFAR_STD, device, channels_last=cuda).epoch():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = model(x)
        batches.append(predictions((out[0] if head is not None else out).float(), head))  # CCE: logits
    return concatenate(batches)


def evaluate(config: CifarConfig, model, criterion, data: CifarData, device) -> dict[str, Any]:
    """The published table's measures, then the decision: HALO's sink (and every score of both losses)
    calibrated on the held-out split and measured on the test split and every OOD set."""
    from .classification import calibrated_heads, decision_metrics

    if data.calibration is None or len(data.calibration) == 0:
        raise ValueError("data.calibration is empty: the decision is set on held-out images (load_data makes them)")
    head = HALOHead.from_trained(model, criterion).to(device) if config.loss == "halo" else None
    held_out = predict(config, model, data.calibration, device, head)
    held_out_ood = {name: predict(config, model, array, device, head) for name, array in data.calibration_ood.items()}
    heads = calibrated_heads(head, held_out, held_out_ood, config.keep) if head is not None else {}
    head = heads.get(config.decision)
    result = evaluate_classifier(lambda array: predict(config, model, array, device, head), data.test,
                                 data.test.labels, {**data.near, **data.far}, near=list(data.near), far=list(data.far))
    result["metrics"].update(n_train=len(data.train), n_test=len(data.test), n_calibration=len(data.calibration))
    result["metrics"]["decision"] = decision_metrics(result, data.test.labels, held_out, held_out_ood, config.keep,
                                                     heads, primary=config.decision)
    result.update(labels=data.test.labels, head=head)
    result["centroids"] = model.centered_centroids().detach().float().cpu() if config.loss == "halo" else None
    return result


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def configs_from_args(args: argparse.Namespace) -> list[CifarConfig]:
    config = apply_preset(dataclass_from_args(CifarConfig, args), given_options(args))
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
    if config.resume == "latest" and not run_path(seeded_config.run_dir(), CIFAR_CHECKPOINT).is_file():
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
