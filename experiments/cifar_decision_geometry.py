"""Where the CIFAR recipe's decision sees each set: why HALO's sink rejects some OOD sets and not others.

For a finished HALO run of ``halo-embed cifar`` (its ``checkpoint.pt`` and ``config.json``), embeds the
held-out calibration images, the ID test images and every OOD set of the run, and prints per set the median
and 5 % / 95 % quantiles of the three quantities the decision is made of:

* ``|x|^2 / D``: the squared distance to the origin, the sink's prototype;
* ``min_k |x - c_k|^2 / D``: the squared distance to the nearest class prototype;
* the sink margin ``g (|x|^2 - min_k |x - c_k|^2) / D`` (the largest shifted class logit): the calibrated
  sink declines an input when it falls below the decision bias (also printed);

and the share of each set the calibrated sink declines (the cross-entropy run's shares at its own held-out
threshold are in the recipe's report). Then how well each HALO score ranks the ID test images' errors for
selective classification (AURC and E-AURC, lower is better): the sink's ``not_abstain``, ``msp`` of the K+1
softmax with the loss's bias and with the calibrated bias, ``msp`` over the K classes alone, the top-1 minus
top-2 logit and the sink margin.

Usage (seconds on 2 CPU cores, after ``experiments/cifar_recipe.sh``; ``--smoke`` first trains a tiny HALO
run of the recipe on generated data and measures that):

    .venv/bin/python experiments/cifar_decision_geometry.py runs/cifar-medium-decision/seed-0/halo
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

import torch
from _shared import SMOKE_CIFAR, add_common_options, cifar10_folder, datasets

from halo_embed import HALOHead, geometry
from halo_embed.eval.selective import aurc, excess_aurc
from halo_embed.io import unused_path
from halo_embed.recipes.cifar import CifarConfig, build, load_data, predict, train
from halo_embed.recipes.runs import CIFAR_CHECKPOINT, load_state_file, run_path


def quantiles(values: torch.Tensor) -> str:
    low, mid, high = torch.quantile(values.double(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    return f"{mid:8.3f} [{low:7.3f}, {high:7.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", nargs="?",
                        help="a HALO run folder of the CIFAR recipe (<output>/<name>[/seed-<s>]/halo)")
    add_common_options(parser)
    args = parser.parse_args()
    if args.smoke:
        shared = datasets(args)
        config = CifarConfig(loss="halo", data_dir=str(cifar10_folder(args)),
                             near_ood=[f"{shared}/cifar100-partial.npz"],
                             far_ood=[f"{shared}/svhn-partial.npz", f"{shared}/mnist-test"], progress=False,
                             output=str(unused_path(Path(args.runs) / "geometry-smoke")), **SMOKE_CIFAR)
        train(config)
        args.run = str(config.run_dir())
    if args.run is None:
        parser.error("give a HALO run folder (or --smoke)")
    run = Path(args.run)
    saved = json.loads((run / "config.json").read_text())
    config = CifarConfig(**{f.name: saved[f.name] for f in fields(CifarConfig) if f.name in saved})
    if config.loss != "halo":
        raise SystemExit(f"{run} is a {config.loss} run; give a HALO run")
    state = load_state_file(run_path(run, CIFAR_CHECKPOINT))
    data = load_data(config)
    model, criterion = build(config, len(data.classes))
    model.load_state_dict(state["model"])
    criterion.load_state_dict(state["criterion"])
    device = torch.device("cpu")
    head = HALOHead.from_trained(model.eval(), criterion)
    held_out = predict(config, model, data.calibration, device, head)["embeddings"]
    calibration = head.calibrate(held_out, config.keep)
    g = head.temperature.double()
    print(f"{run}: temperature {g.item():.3f}, loss's abstain bias {head.abstain_bias.item():.3f}, "
          f"calibrated decision bias {calibration.decision_bias:.3f} ({calibration.fitted_on})")
    print(f"{'set':22s} {'|x|^2/D':>27s} {'nearest |x-c|^2/D':>27s} {'sink margin':>27s} {'declined %':>10s}")
    sets = {"held-out ID": data.calibration, "ID test": data.test, **data.near, **data.far}
    for name, array in sets.items():
        x = predict(config, model, array, device, head)["embeddings"].double()
        radius = (x ** 2).mean(dim=1)
        nearest = torch.cdist(x, head.centroids.double()).pow(2).min(dim=1).values / x.shape[1]
        margin = g * (radius - nearest)
        declined = head(x.float()).abstained.float().mean().item()
        print(f"{name:22s} {quantiles(radius)} {quantiles(nearest)} {quantiles(margin)} {100 * declined:10.2f}")

    x = predict(config, model, data.test, device, head)["embeddings"]
    shifted = head.logits(x).double()[:, :-1]
    correct = (shifted.argmax(dim=-1) == torch.as_tensor(data.test.labels)).numpy()
    top_two = shifted.topk(2, dim=-1).values
    class_prob = lambda bias: torch.softmax(geometry.with_abstain(shifted, bias), dim=-1)[:, :-1]  # noqa: E731
    sink_share = torch.softmax(geometry.with_abstain(shifted, head.abstain_bias.double()), dim=-1)[:, -1]
    rankings = {
        "not_abstain (the sink's score)": 1.0 - sink_share,
        "msp, K+1, the loss's bias": class_prob(head.abstain_bias.double()).max(dim=-1).values,
        "msp, K+1, the calibrated bias": class_prob(float(calibration.decision_bias)).max(dim=-1).values,
        "msp over the K classes": torch.softmax(shifted, dim=-1).max(dim=-1).values,
        "top-1 minus top-2 logit": top_two[:, 0] - top_two[:, 1],
        "sink margin (top-1 logit)": top_two[:, 0],
    }
    print(f"\nranking the ID test errors ({int((~correct).sum())} of {len(correct)}), % (lower is better):")
    for name, score in rankings.items():
        area, excess = aurc(score.numpy(), correct), excess_aurc(score.numpy(), correct)
        print(f"{name:32s} AURC {100 * area:6.2f}  E-AURC {100 * excess:6.2f}")


if __name__ == "__main__":
    main()
