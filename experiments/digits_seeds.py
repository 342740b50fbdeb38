"""The digits recipe over several seeds: cross-entropy vs HALO at the reference's and at other starting temperatures.

Each seed changes the train/test split, the initialisation and the batch order (the same for every loss).
Prints mean ± std over seeds of accuracy, ECE and AUROC (each loss's primary score and its best score
function) against the held-out digits 7-9 (near) and uniform noise (far), and the decision set to keep 95 %
of held-out known digits (HALO: both calibrated rules; CCE: each score thresholded): known test digits kept,
accuracy of the kept, digits 7-9 and noise rejected; writes runs/dynamics/digits_seeds.json.

Usage (~20 s per seed and setting on 2 CPU cores; ``--smoke``: 2 seeds of 2 epochs, seconds):

    .venv/bin/python experiments/digits_seeds.py --seeds 5 --init-gamma reference 2
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from _shared import add_common_options

from halo_embed.eval import mean_std
from halo_embed.io import atomic_write_json, unused_path
from halo_embed.recipes import digits


def one_run(config: digits.DigitsConfig, loss: str) -> dict[str, float]:
    data = digits.load_digits_split(config)
    model, criterion = digits.train(loss, data, config)
    metrics = digits.evaluate(loss, model, criterion, data, config)["metrics"]
    near, far = list(data.ood)
    values = {"accuracy": metrics["accuracy"], "ece": metrics["ece"]}
    for group, name in (("near", near), ("far", far)):
        aurocs = {score: per_set[name]["auroc"] for score, per_set in metrics["ood"].items()}
        values[f"{group}_auroc"] = aurocs[digits.PRIMARY_SCORE[loss]]
        values[f"{group}_auroc_best"] = max(aurocs.values())
    decision = metrics["decision"]
    for kind, group in (("rule", decision["rules"]), ("score", decision["scores"])):
        for name, rates in group.items():
            values[f"{kind} {name}: kept"] = rates["id_kept"]
            values[f"{kind} {name}: accuracy of kept"] = rates["accepted_accuracy"]
            values[f"{kind} {name}: rejected {near}"] = rates["ood_rejected"][near]
            values[f"{kind} {name}: rejected {far}"] = rates["ood_rejected"][far]
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--init-gamma", nargs="+", default=["reference", "2"])
    add_common_options(parser, data=False)  # scikit-learn's digits come with scikit-learn
    args = parser.parse_args()
    epochs = 2 if args.smoke else digits.DigitsConfig.epochs
    if args.smoke:
        args.seeds = 2
    settings = [("cce", None)] + [("halo", None if g == "reference" else float(g)) for g in args.init_gamma]
    table = {}
    for loss, gamma in settings:
        label = loss if loss == "cce" else f"halo (init_gamma {gamma or 'reference'})"
        runs = [one_run(replace(digits.DigitsConfig(), seed=seed, init_gamma=gamma, epochs=epochs), loss)
                for seed in range(args.seeds)]
        table[label] = {key: mean_std([r[key] for r in runs]) for key in runs[0]}
        print(label + "".join(
            f"\n    {key} {m:.4f} ± {s:.4f}" if key == "ece" else f"\n    {key} {100 * m:.2f} ± {100 * s:.2f}"
            for key, (m, s) in table[label].items()), flush=True)
    out = atomic_write_json(unused_path(Path(args.runs) / "dynamics" / "digits_seeds.json"),  # never over an earlier run
                            {"seeds": args.seeds, "results": table})
    print(f"written {out}")


if __name__ == "__main__":
    main()
