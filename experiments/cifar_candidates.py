"""Candidate fixes for HALO's slow start in the CIFAR recipe, each against the reference setting and CCE.

Every candidate changes one thing in the recipe's HALO model (``halo_embed.recipes.cifar.build``) and
trains with the recipe's data, optimiser, schedule and evaluation at the ``small`` budget (ResNet-18 width
16, 10,000 CIFAR-10 images, 4 epochs), for ``--seeds`` seeds; it prints mean ± std of accuracy, ECE and the
far/near-OOD AUROC of each loss's primary score (CCE ``msp``, HALO ``not_abstain``) and writes
``runs/dynamics/candidates.json`` (``-2``, ``-3``, ... when taken). Only ``init_gamma`` became an option
of the library (``HALOLoss(init_gamma=...)``, ``halo-embed cifar --init-gamma``); the others are
implemented here:

- ``cce``: cross-entropy with label smoothing 0.1 (the baseline); ``reference``: HALO as published
- ``init_gamma=G``: start the temperature at G instead of 20/(2 - (1 - 2/D)) (16.7 for D = 10)
- ``centroid_std=S``: centroids drawn from N(0, S^2) instead of N(0, 1)
- ``unit_embeddings``: the last layer rescaled so that the first batch's embeddings have |x|^2/D = 1
- ``embedding_bn``: a BatchNorm without affine parameters on the embedding (|x|^2/D = 1 in every batch)
- ``embed_dim=E``: a wider embedding than the number of classes
- ``centroid_lr=F``: the loss's gradient on the centroids times F (their learning rate times F, weight decay aside)
- ``fixed_gamma``: the temperature is not learnt

Usage (~1.5 minutes per run on 2 CPU cores; ``--smoke``: every candidate for one seed of seconds):

    .venv/bin/python experiments/cifar_candidates.py --seeds 2
    .venv/bin/python experiments/cifar_candidates.py --candidates reference init_gamma=2 "init_gamma=2 embed_dim=64"
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
from _shared import SMOKE_CIFAR, add_common_options, cifar10_folder, datasets
from accelerate.utils import set_seed
from torch import nn

from halo_embed.eval import mean_std
from halo_embed.io import atomic_write_json, unused_path
from halo_embed.data.arrays import AugmentedBatches
from halo_embed.recipes.cifar import (
    CIFAR_MEAN,
    CIFAR_STD,
    CifarConfig,
    build,
    evaluate,
    load_data,
    optimizer_and_schedule,
)
from halo_embed.recipes.cifar_report import headline

DEFAULT_CANDIDATES = ["cce", "reference", "init_gamma=1", "init_gamma=2", "init_gamma=3", "init_gamma=5",
                      "centroid_std=0.1", "unit_embeddings", "embedding_bn", "embed_dim=64", "centroid_lr=0.1",
                      "fixed_gamma", "init_gamma=2 embed_dim=64"]


class NormalisedEmbedding(nn.Module):
    """The backbone followed by a BatchNorm without affine parameters."""

    def __init__(self, backbone: nn.Module, dims: int) -> None:
        super().__init__()
        self.backbone, self.norm = backbone, nn.BatchNorm1d(dims, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.backbone(x))


def parse(candidate: str) -> dict[str, str]:
    return dict(part.partition("=")[::2] for part in candidate.split())


def build_candidate(config: CifarConfig, options: dict[str, str], data):
    """The recipe's model and loss with one candidate's changes."""
    config = replace(config, init_gamma=float(options["init_gamma"]) if "init_gamma" in options else None,
                     embed_dim=int(options["embed_dim"]) if "embed_dim" in options else None)
    model, criterion = build(config, len(data.classes))
    if config.loss == "cce":
        return config, model, criterion
    if "centroid_std" in options:
        with torch.no_grad():
            model.centroids.mul_(float(options["centroid_std"]))
    if "embedding_bn" in options:
        model.model = NormalisedEmbedding(model.model, model.embed_dim)
    if "unit_embeddings" in options:
        batch = min(512, len(data.train))
        first, _ = next(iter(AugmentedBatches(data.train, batch, CIFAR_MEAN, CIFAR_STD, train=True,
                                              seed=config.seed).epoch(0)))
        with torch.no_grad():
            scale = model.model(first).pow(2).mean().rsqrt()
            model.model.fc.weight.mul_(scale)
            model.model.fc.bias.mul_(scale)
    if "fixed_gamma" in options:
        criterion.gamma.requires_grad_(False)
    return config, model, criterion


def one_run(base: CifarConfig, candidate: str, seed: int, data) -> dict[str, float]:
    options = parse(candidate)
    config = replace(base, seed=seed, loss="cce" if candidate == "cce" else "halo")
    set_seed(seed)
    config, model, criterion = build_candidate(config, options, data)
    batches = AugmentedBatches(data.train, config.batch_size, CIFAR_MEAN, CIFAR_STD, train=True, seed=seed)
    optimizer, scheduler = optimizer_and_schedule(config, model, criterion, len(batches))
    if "centroid_lr" in options:  # the loss's gradient on the centroids scaled: their LR times F (weight decay aside)
        factor = float(options["centroid_lr"])
        model.centroids.register_hook(lambda grad: grad * factor)
    for epoch in range(config.epochs):
        model.train()
        for x, y in batches.epoch(epoch):
            if config.loss == "halo":
                embeddings, centroids = model(x)
                loss, _ = criterion(embeddings, y, centroids)
            else:
                loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    result = evaluate(config, model, criterion, data, torch.device("cpu"))
    return {key: value for key, value in headline(result, config.loss).items()
            if key in ("accuracy", "ece", "far_auroc", "near_auroc")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_options(parser)
    parser.add_argument("--data-dir", help="a CIFAR-10 image folder (default: unpacked from --data)")
    parser.add_argument("--candidates", nargs="+", default=DEFAULT_CANDIDATES)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-limit", type=int, default=10000)
    args = parser.parse_args()
    shared = datasets(args)
    base = CifarConfig(data_dir=str(cifar10_folder(args)), width=16, epochs=args.epochs,
                       train_limit=args.train_limit, test_limit=2000, ood_limit=1000,
                       near_ood=[f"{shared}/cifar100-partial.npz"],
                       far_ood=[f"{shared}/svhn-partial.npz", f"{shared}/mnist-test"])
    if args.smoke:
        base, args.seeds = replace(base, **SMOKE_CIFAR), 1
    data = load_data(base)
    out = unused_path(Path(args.runs) / "dynamics" / "candidates.json")  # chosen once; rewritten after every candidate
    table = {}
    print("| candidate | accuracy % | ECE | far-OOD AUROC % | near-OOD AUROC % |\n|---|---|---|---|---|")
    for candidate in args.candidates:
        runs = [one_run(base, candidate, seed, data) for seed in range(args.seeds)]
        table[candidate] = {"per_seed": runs}
        cells = []
        for key in ("accuracy", "ece", "far_auroc", "near_auroc"):
            mean, std = mean_std([run[key] for run in runs])
            cells.append(f"{mean:.4f} ± {std:.4f}" if key == "ece" else f"{100 * mean:.2f} ± {100 * std:.2f}")
        print(f"| {candidate} | " + " | ".join(cells) + " |", flush=True)
        atomic_write_json(out, {"args": vars(args), "candidates": table})
    print(f"written {out}")


if __name__ == "__main__":
    main()
