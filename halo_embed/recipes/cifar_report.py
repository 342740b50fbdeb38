"""The CIFAR recipe's reports: the published table's layout for one run, a comparison, and mean ± std over
seeds, with the reference's numbers as extra columns."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..eval import mean_std
from .classification import LOSSES, decision_markdown, decision_rows, decision_rule_text

if TYPE_CHECKING:
    from .cifar_config import CifarConfig

PRIMARY_SCORE = {"cce": "msp", "halo": "not_abstain"}

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

def published_columns(dataset: str) -> dict[str, dict[str, float]]:
    """The reference's numbers for ``dataset`` in the order of :data:`LOSSES` (none for an image folder)."""
    return {loss: PUBLISHED[dataset][loss] for loss in LOSSES} if dataset in PUBLISHED else {}


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


def decision_flat(decision: dict[str, Any], near: Sequence[str], far: Sequence[str]) -> dict[str, float]:
    """Each decision's rates as flat numbers: ``<kind>[<name>] <measure>``, the rejected share per OOD set
    (``rejected[<set>]``) and averaged over each group (``near_rejected``, ``far_rejected``)."""
    values: dict[str, float] = {}
    for kind, group in (("rule", decision["rules"]), ("score", decision["scores"])):
        for name, rates in group.items():
            prefix = f"{kind}[{name}]"
            values[f"{prefix} id_kept"] = rates["id_kept"]
            values[f"{prefix} accepted_accuracy"] = rates["accepted_accuracy"] or 0.0
            values[f"{prefix} near_rejected"] = sum(rates["ood_rejected"][n] for n in near) / len(near)
            values[f"{prefix} far_rejected"] = sum(rates["ood_rejected"][n] for n in far) / len(far)
            for name in (*near, *far):
                values[f"{prefix} rejected[{name}]"] = rates["ood_rejected"][name]
            for key in ("aurc", "excess_aurc"):
                if rates.get(key) is not None:
                    values[f"{prefix} {key}"] = rates[key]
    return values


def _strip(result: dict[str, Any]) -> dict[str, Any]:
    return {"metrics": result["metrics"], "calibration": result["calibration"].to_dict()}


def write_run_report(run_dir: Path, config: CifarConfig, result: dict[str, Any]) -> Path:
    from ..eval import embedding_pca, reliability_diagram, risk_coverage, risk_coverage_curves, score_histograms
    from ..eval import write_report

    m = result["metrics"]
    score = PRIMARY_SCORE[config.loss]
    correct = result["known"]["pred"] == result["labels"]
    risk_coverage_curves({f"`{name}`": risk_coverage(values, correct) for name, values in result["known"]["scores"].items()},
                         run_dir / "risk_coverage.png", f"{config.loss.upper()}: risk-coverage")
    reliability_diagram(result["calibration"], run_dir / "reliability.png", f"{config.loss.upper()}: reliability")
    score_histograms(result["known"]["scores"][score], {n: u["scores"][score] for n, u in result["unseen"].items()},
                     run_dir / "scores.png", f"{config.loss.upper()}: {score}")
    embedding_pca(result["known"]["embeddings"], result["labels"], run_dir / "pca.png",
                  centroids=result["centroids"], title=f"{config.loss.upper()}: test embeddings (PCA)")
    sections = [
        f"`{config.loss}` on {config.dataset} ({m['n_train']} training / {m['n_test']} test images), ResNet-18 "
        f"width {config.width}, {config.epochs} epochs, batch {config.batch_size}, seed {config.seed}.\n",
        f"ID accuracy {100 * m['accuracy']:.2f} %, ECE {m['ece']:.4f}.\n",
        f"## The decision\n\n{decision_rule_text(m['decision'])}; measured on the test split and every OOD set.\n\n"
        + decision_markdown(decision_rows(config.loss, m["decision"])),
        "## OOD, every score function\n\n" + result["ood"].to_markdown(),
    ]
    plots = {"Reliability": "reliability.png", f"{score} on ID vs OOD": "scores.png", "Embeddings": "pca.png",
             "Risk-coverage": "risk_coverage.png"}
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
        f"## The decision\n\n{decision_rule_text(first['decision'])}; measured on the test split and every OOD "
        "set.\n\n" + decision_markdown([row for c, r in zip(configs, results)
                                          for row in decision_rows(c.loss, r["metrics"]["decision"])]),
    ]
    for c, r in zip(configs, results):
        sections.append(f"## {c.loss.upper()}: every score function\n\n" + r["ood"].to_markdown())
    payload = {c.loss: _strip(r) for c, r in zip(configs, results)}
    payload["config"] = asdict(config)
    plots = {f"{c.loss.upper()} embeddings": f"{c.loss}/pca.png" for c in configs}
    return write_report(root, f"CIFAR recipe: CCE vs HALO on {config.dataset}", payload, sections, plots)


def seed_metrics(result: dict[str, Any], loss: str) -> dict[str, float]:
    """One run's headline rows plus every score function's far- and near-OOD AUROC (``far_auroc[score]``)."""
    m = result["metrics"]
    values = {**headline(result, loss), **decision_flat(m["decision"], m["near"], m["far"])}
    for score, per_set in m["ood"].items():
        for group in ("far", "near"):
            values[f"{group}_auroc[{score}]"] = sum(per_set[n]["auroc"] for n in m[group]) / len(m[group])
    return values


def write_seed_comparison(config: CifarConfig, runs: dict[str, list[dict[str, float]]], seeds: Sequence[int],
                          set_names: tuple[list[str], list[str]]) -> Path:
    """The published table's layout with ``mean ± std`` over seeds, every score function, and each seed's row."""
    from ..eval import format_value, markdown_table, write_report

    root = config.run_dir().parent.parent
    summary = {loss: {key: mean_std([run[key] for run in per_seed]) for key in per_seed[0]}
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
    decisions = sorted({key.split(" ")[0] for per in runs.values() for key in per[0] if key.startswith(("rule[", "score["))},
                       key=lambda name: (not name.startswith("rule["), name))
    near, far = set_names
    measures = ("id_kept", "accepted_accuracy", "aurc", "excess_aurc", *(f"rejected[{name}]" for name in (*near, *far)))
    decision_table = [[f"{loss.upper()} " + (f"decision `{d[5:-1]}`" if d.startswith("rule[") else f"`{d[6:-1]}` thresholded")]
                      + [cell(m.split("[")[0], summary[loss][f"{d} {m}"]) if f"{d} {m}" in summary[loss] else "-"
                         for m in measures]
                      for loss in runs for d in decisions if f"{d} id_kept" in summary[loss]]
    per_seed = [[f"{loss.upper()} seed {seed}"] + [format_value(k, run[k]) for k in ("accuracy", "ece", "far_auroc", "near_auroc")]
                for loss, per in runs.items() for seed, run in zip(seeds, per)]
    sections = [
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); for each seed both losses share the initial backbone "
        f"seed, data, batch order and budget: ResNet-18 width {config.width}, {config.epochs} epochs, batch "
        f"{config.batch_size}, {config.train_limit or 'all'} training images of {config.dataset}. Standard "
        "deviations are over seeds (sample std). OOD score: CCE `msp`, HALO `not_abstain`.\n",
        "## The published table's layout\n\n" + markdown_table(header, rows),
        "## AUROC % of every score function (far, near)\n\n" + markdown_table(["loss, score", "far-OOD", "near-OOD"], scores),
        "## The decision\n\nEach score function of each loss thresholded on the held-out training images "
        "(never trained on), by the same rule for every row, and HALO's calibrated decision; measured on the test "
        "split and on each OOD set. AURC: area under the risk-coverage curve, lower is better; E-AURC: the same "
        "less a perfect ranking's, so that losses of different accuracy compare.\n\n"
        + markdown_table(["decision", "ID test kept %", "accuracy of accepted %", "AURC %", "E-AURC %"]
                         + [f"{name} (near) rejected %" for name in near]
                         + [f"{name} (far) rejected %" for name in far], decision_table),
        "## Each seed\n\n" + markdown_table(["run", "accuracy %", "ECE", "far AUROC %", "near AUROC %"], per_seed),
    ]
    payload = {"seeds": list(seeds), "config": asdict(config),
               **{loss: {"per_seed": per, "mean": {k: v[0] for k, v in summary[loss].items()},
                         "std": {k: v[1] for k, v in summary[loss].items()}} for loss, per in runs.items()}}
    return write_report(root, f"CIFAR recipe over {len(seeds)} seeds on {config.dataset}", payload, sections)


