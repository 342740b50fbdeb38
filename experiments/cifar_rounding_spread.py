"""How much a rounding-level change grows during training: CCE vs HALO in the CIFAR recipe.

For each variant, two copies of the recipe's model start from the same seed; every parameter of the
second is multiplied by ``1 + eps * N(0, 1)`` (``eps = 1e-6``, about ten fp32 roundings). Both then train
in lockstep on the same batches with the recipe's optimiser and schedule. Every ``--every`` steps the
relative distance ``|theta_a - theta_b| / |theta_a|`` over all parameters is recorded; at the end, both
copies' test accuracy and the share of test images on which their predictions differ.

A loss whose training amplifies such a change into a different model gives run-to-run spreads that
one run per loss cannot show (README's CIFAR section).

Usage (~2 minutes per variant on 2 CPU cores at the defaults; ``--smoke``: seconds, on generated data):

    .venv/bin/python experiments/cifar_rounding_spread.py --variants cce halo:reference halo:2
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
from _shared import SMOKE_CIFAR, add_common_options, cifar10_folder
from accelerate.utils import set_seed

from halo_embed import HALOHead
from halo_embed.data.arrays import AugmentedBatches
from halo_embed.io import atomic_write_json, unused_path
from halo_embed.recipes.cifar import (
    CIFAR_MEAN,
    CIFAR_STD,
    CifarConfig,
    build,
    load_data,
    optimizer_and_schedule,
    predict,
)


def parameters(model, criterion) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in [*model.parameters(), *criterion.parameters()]])


def loss_of(config: CifarConfig, model, criterion, x, y) -> torch.Tensor:
    if config.loss == "halo":
        embeddings, centroids = model(x)
        return criterion(embeddings, y, centroids)[0]
    return criterion(model(x), y)


def twin_run(config: CifarConfig, data, eps: float, every: int) -> dict:
    set_seed(config.seed)
    batches = AugmentedBatches(data.train, config.batch_size, CIFAR_MEAN, CIFAR_STD, train=True, seed=config.seed)
    twins = [build(config, len(data.classes)) for _ in range(2)]
    noise = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in [*twins[1][0].parameters(), *twins[1][1].parameters()]:
            p.mul_(1 + eps * torch.randn(p.shape, generator=noise))
    optimizers = [optimizer_and_schedule(config, m, c, len(batches)) for m, c in twins]
    distances, step = [], 0
    for epoch in range(config.epochs):
        for m, _ in twins:
            m.train()
        for x, y in batches.epoch(epoch):
            if step % every == 0:
                a, b = (parameters(m, c) for m, c in twins)
                distances.append((step, ((a - b).norm() / a.norm()).item()))
            for (m, c), (optimizer, scheduler) in zip(twins, optimizers):
                loss = loss_of(config, m, c, x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
            step += 1
    a, b = (parameters(m, c) for m, c in twins)
    distances.append((step, ((a - b).norm() / a.norm()).item()))
    preds = [predict(config, m, data.test, torch.device("cpu"), HALOHead.from_trained(m, c) if config.loss == "halo" else None)["pred"]
             for m, c in twins]
    accuracy = [(p == data.test.labels).float().mean().item() for p in preds]
    return {"distances": distances, "accuracy": accuracy,
            "disagreement": (preds[0] != preds[1]).float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_options(parser)
    parser.add_argument("--data-dir", help="a CIFAR-10 image folder (default: unpacked from --data)")
    parser.add_argument("--variants", nargs="+", default=["cce", "halo:reference", "halo:2"],
                        help="cce, or halo:<init_gamma> ('reference' = the published start)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=10000)
    parser.add_argument("--eps", type=float, default=1e-6)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    base = CifarConfig(data_dir=str(cifar10_folder(args)), width=16, epochs=args.epochs,
                       train_limit=args.train_limit, test_limit=2000, seed=args.seed)
    if args.smoke:
        base, args.every = replace(base, **SMOKE_CIFAR), 1
    data = load_data(base, with_ood=False)
    results = {}
    for variant in args.variants:
        loss, _, gamma = variant.partition(":")
        config = replace(base, loss=loss, init_gamma=None if gamma in ("", "reference") else float(gamma))
        results[variant] = result = twin_run(config, data, args.eps, args.every)
        steps = "  ".join(f"{s}:{d:.1e}" for s, d in result["distances"][:: max(1, len(result["distances"]) // 8)])
        print(f"{variant:16s} accuracy {100 * result['accuracy'][0]:.2f} / {100 * result['accuracy'][1]:.2f}  "
              f"test predictions differ on {100 * result['disagreement']:.1f}%  "
              f"final |dtheta|/|theta| {result['distances'][-1][1]:.2e}\n    step:distance  {steps}", flush=True)
    out = atomic_write_json(unused_path(Path(args.runs) / "dynamics" / "rounding_spread.json"),  # never over an earlier run
                            {"args": vars(args), "results": results})
    print(f"written {out}")


if __name__ == "__main__":
    main()
