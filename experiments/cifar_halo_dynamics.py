"""Where HALO's training signal goes in the CIFAR recipe's first epochs, for several starting temperatures.

Trains the recipe's own HALO model, data, optimiser and schedule (``halo_embed.recipes.cifar``) once per
``--init-gamma`` value and, every ``--every`` steps, measures on the training batch (before the update):

- ``sink``: share of images whose top candidate is the origin sink; ``p_sink``: mean p(abstain)
- ``ce`` / ``radial``: the cross-entropy and the radial NLL; ``|g_ce|`` / ``|g_rad|``: the mean norm of
  each term's gradient on one embedding (per image, i.e. times the batch size)
- ``gamma``: the effective temperature
- ``x_ms`` / ``c_ms``: mean squares ``|x|^2/D`` of the embeddings and ``|c|^2/D`` of the centred centroids;
  ``r_sq``: each embedding's ``|x - c_y|^2/D`` (the radial term's minimum is at ``1 - 2/D``)
- ``c_sep_min`` / ``c_sep``: smallest and mean ``|c_j - c_k|^2/D`` between centroids, to set against
  ``r_sq`` (an embedding on its shell is as far from its own centroid as ``r_sq``)
- ``spread``: std over the K classes of the logits ``-g|x - c_k|^2/D`` (mean over rows): how far from uniform
  the class softmax is
- ``q_true`` / ``q_wrong``: the distillation target's mass on the true class, and its largest wrong-class mass
- ``acc``: batch accuracy (nearest centroid)

then test accuracy after the last epoch. Prints one table per run and writes
``runs/dynamics/<name>.json``. HALO_MATH.md assumes embeddings and centroids of unit mean square
(initial ``|x - c|^2/D = 2``) and sets the temperature so that moving from there to the shell gains 20 nats.

Usage (~1 minute per run and epoch on 2 CPU cores; ``--smoke``: seconds, on generated data):

    .venv/bin/python experiments/cifar_halo_dynamics.py --init-gamma reference 2 --epochs 3
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from _shared import SMOKE_CIFAR, add_common_options, cifar10_folder
from accelerate.utils import set_seed

from halo_embed import HALOHead, geometry
from halo_embed.data.arrays import AugmentedBatches
from halo_embed.io import atomic_write_json, unused_path
from halo_embed.losses.functional import halo_cross_entropy
from halo_embed.recipes.cifar import (
    CIFAR_MEAN,
    CIFAR_STD,
    CifarConfig,
    build,
    load_data,
    optimizer_and_schedule,
    predict,
)

COLUMNS = ("step", "loss", "ce", "radial", "|g_ce|", "|g_rad|", "sink", "p_sink", "gamma", "x_ms", "c_ms",
           "r_sq", "c_sep_min", "c_sep", "spread", "q_true", "q_wrong", "acc")


def measure(embeddings: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, criterion) -> dict[str, float]:
    """The quantities above for one batch (the same geometry functions as the loss)."""
    n, d = embeddings.shape
    k = centroids.shape[0]
    gamma = criterion.temperature.detach()
    x = embeddings.detach().clone().requires_grad_(True)
    c = centroids.detach()
    shifted = geometry.shifted_logits(x, c, gamma)
    is_target = F.one_hot(labels, k).bool()
    ce, true = halo_cross_entropy(shifted, x, gamma, criterion.abstain_bias, is_target,
                                  criterion.label_smoothing, criterion.distill)
    r_sq = (x - c[labels]).pow(2).mean(dim=-1)
    radial = geometry.radial_nll(r_sq, d).mean()
    grad_ce, = torch.autograd.grad(ce, x)
    grad_radial, = torch.autograd.grad(radial, x)
    with torch.no_grad():
        probs = geometry.with_abstain(shifted, criterion.abstain_bias).softmax(dim=-1)
        targets = geometry.teacher_free_targets(true, is_target, criterion.label_smoothing)
        separation = geometry.mean_squared_distances(c, c)[~torch.eye(k, dtype=torch.bool, device=c.device)]
        return {
            "loss": (ce + radial).item(), "ce": ce.item(), "radial": radial.item(),
            "|g_ce|": n * grad_ce.norm(dim=1).mean().item(), "|g_rad|": n * grad_radial.norm(dim=1).mean().item(),
            "sink": (probs.argmax(dim=-1) == k).float().mean().item(), "p_sink": probs[:, -1].mean().item(),
            "gamma": gamma.item(), "x_ms": x.pow(2).mean().item(), "c_ms": c.pow(2).mean().item(),
            "r_sq": r_sq.mean().item(), "c_sep_min": separation.min().item(), "c_sep": separation.mean().item(),
            "spread": true.std(dim=-1).mean().item(),
            "q_true": targets[is_target].mean().item(),
            "q_wrong": targets.masked_fill(is_target, 0).max(dim=-1).values.mean().item(),
            "acc": (shifted.argmax(dim=-1) == labels).float().mean().item(),
        }


def trace(config: CifarConfig, data, every: int) -> dict:
    """Train one configuration with the recipe's pieces, measuring every ``every`` steps."""
    set_seed(config.seed)
    model, criterion = build(config, len(data.classes))
    batches = AugmentedBatches(data.train, config.batch_size, CIFAR_MEAN, CIFAR_STD, train=True, seed=config.seed)
    optimizer, scheduler = optimizer_and_schedule(config, model, criterion, len(batches))
    rows, step, started = [], 0, time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        for x, y in batches.epoch(epoch):
            embeddings, centroids = model(x)
            if step % every == 0:
                rows.append({"step": step, **measure(embeddings, y, centroids, criterion)})
            loss, _ = criterion(embeddings, y, centroids)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
    known = predict(config, model, data.test, torch.device("cpu"), HALOHead.from_trained(model, criterion))
    accuracy = (known["pred"] == data.test.labels).float().mean().item()
    return {"init_gamma": config.init_gamma, "rows": rows, "test_accuracy": accuracy,
            "seconds": time.perf_counter() - started}


def print_trace(result: dict) -> None:
    label = "reference" if result["init_gamma"] is None else result["init_gamma"]
    print(f"\n## init_gamma = {label}: test accuracy {100 * result['test_accuracy']:.2f}% "
          f"({result['seconds']:.0f} s)\n")
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    for row in result["rows"]:
        print("| " + " | ".join(str(row[c]) if c == "step" else f"{row[c]:.3g}" for c in COLUMNS) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_options(parser)
    parser.add_argument("--data-dir", help="a CIFAR-10 image folder (default: unpacked from --data)")
    parser.add_argument("--init-gamma", nargs="+", default=["reference", "2"],
                        help="starting temperatures to trace ('reference' = the published 20/(2-(1-2/D)))")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=10000)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--embed-dim", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--name", default="cifar10")
    args = parser.parse_args()
    base = CifarConfig(loss="halo", data_dir=str(cifar10_folder(args)), width=args.width, epochs=args.epochs,
                       train_limit=args.train_limit, test_limit=2000, seed=args.seed, embed_dim=args.embed_dim,
                       near_ood=[], far_ood=[])
    if args.smoke:
        base, args.every = replace(base, **SMOKE_CIFAR), 1
    data = load_data(base, with_ood=False)
    results = []
    for value in args.init_gamma:
        config = CifarConfig(**{**base.__dict__, "init_gamma": None if value == "reference" else float(value)})
        results.append(trace(config, data, args.every))
        print_trace(results[-1])
    out = unused_path(Path(args.runs) / "dynamics" / f"{args.name}.json")  # a second run never overwrites the first
    atomic_write_json(out, {"args": vars(args), "runs": results})
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
