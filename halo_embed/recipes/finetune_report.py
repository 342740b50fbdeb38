"""The fine-tuning recipe's reports: ``report.md`` / ``metrics.json`` of a run, the side-by-side report of a
comparison, and the WiSE-FT sweep's table and trade-off plot (the evaluation is
:mod:`~halo_embed.recipes.finetune_eval`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .finetune_config import FinetuneConfig

__all__ = ["headline", "tradeoff_plot", "wise_ft_table", "write_comparison", "write_run_report"]


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
    if "zeroshot" in metrics:
        for when in ("before", "after"):
            flat[f"zero-shot top-1 {when}"] = (metrics["zeroshot"][when] or {}).get("top1")
    return flat


def _zeroshot_section(metrics: dict[str, Any]) -> str:
    from ..eval import markdown_table

    after = metrics["zeroshot"]["after"]
    before = metrics["zeroshot"]["before"] or {"ood": {}}  # not measured when given only on a resume
    rows = [[key, *("-" if r.get(key) is None else f"{100 * r[key]:.2f}" for r in (before, after))]
            for key in ("top1", "top5", "abstain_rate", "accepted_top1") if key in after]
    for name in after["ood"]:
        rows.append([f"AUROC vs {name}", *("-" if name not in r["ood"] else f"{100 * r['ood'][name]['auroc']:.2f}"
                                           for r in (before, after))])
    rule = ("HALO's geometry: nearest prototype, the origin sink as abstain candidate"
            if after["rule"] == "halo" else "cosine to each class prototype; OOD score MCM")
    return (f"## Zero-shot classification ({after['images']} images, {after['classes']} classes, "
            f"{after['templates']} template(s); {rule})\n\n"
            + markdown_table(["metric", "before fine-tuning %", "after %"], rows))


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
    if "decision" in metrics:
        decision = metrics["decision"]
        sections.append("Decision: " + (
            f"fitted on {decision['fitted_on'].get('aligned')} aligned and {decision['fitted_on'].get('mismatched')} "
            f"mismatched pairs of held-out training images (--calibration-split {config.calibration_split:g})"
            if decision["rule"] == "fitted" else "HALO's constant abstain bias (no --calibration-split)")
            + f": temperature {decision['temperature']:.3f}, bias {decision['bias']:.3f}.\n")
    percent = lambda v, k: "-" if v.get(k) is None else f"{100 * v[k]:.2f}"  # noqa: E731
    number = lambda v, k: "-" if v.get(k) is None else f"{v[k]:.4f}"  # noqa: E731
    for split, result in metrics["eval"].items():
        rows = [[name, *(percent(v, k) for k in ("auroc", "fpr95_id_kept", "fpr95_ood_caught", "aupr_in",
                                                  "builtin_threshold_accuracy", "tuned_threshold_accuracy",
                                                  "calibration_threshold_accuracy", "platt_accuracy")),
                 number(v, "builtin_ece"), number(v, "platt_ece")] for name, v in result["rejection"].items()]
        sections.append(f"## {split}: rejection (aligned pairs vs mismatched)\n\nAccuracies are balanced, on the "
                        "odd half of each set; 'tuned' chooses its threshold on the even half, 'calibration "
                        "threshold' and 'Platt' on the held-out calibration pairs (--calibration-split).\n\n"
                        + markdown_table(
            ["negatives", "AUROC %", "FPR@95 (aligned kept) %", "FPR@95 (mismatch caught) %", "AUPR-in %",
             "built-in decision acc. %", "tuned threshold acc. %", "calibration threshold acc. %",
             "Platt acc. %", "ECE of p(aligned)", "ECE, Platt"], rows))
        sections.append(f"## {split}: retrieval\n\n" + side_by_side(
            {config.loss: result["retrieval"]}, [(k, k) for k in result["retrieval"]]))
        plots.update(_plots(run_dir, split.replace(" ", "_"), result))
    if "zeroshot" in metrics:
        sections.append(_zeroshot_section(metrics))
    if "wise_ft" in metrics:
        sweep = metrics["wise_ft"]
        sections.append(f"## WiSE-FT (alpha 0 = before fine-tuning, 1 = after; checkpoints in {sweep['output']})\n\n"
                        + wise_ft_table(sweep["alphas"]))
        if sweep["alphas"][0]["zeroshot"] is not None:
            plots["WiSE-FT trade-off"] = str(Path(sweep["output"]).relative_to(run_dir) / "wise_ft.png")
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
    plots = {f"{c.loss}: pair scores ({s})": f"{c.name}/{s.replace(' ', '_')}_pair_scores.png"
             for c in configs for s in splits[:1]}
    sweeps = {c.loss: r["wise_ft"]["alphas"] for c, r in zip(configs, results) if "wise_ft" in r}
    if len(sweeps) == len(configs) and all(points[0]["zeroshot"] is not None for points in sweeps.values()):
        tradeoff_plot(root / "wise_ft_tradeoff.png", sweeps)
        plots["WiSE-FT trade-off of each loss"] = "wise_ft_tradeoff.png"
    payload = {c.loss: _strip(r) for c, r in zip(configs, results)}
    return write_report(root, "Fine-tuning comparison: " + " vs ".join(c.loss for c in configs), payload, sections,
                        plots)


def wise_ft_table(points: list[dict[str, Any]]) -> str:
    """The sweep as a markdown table, one row per alpha."""
    from ..eval import markdown_table

    has_zeroshot = points[0]["zeroshot"] is not None
    rows = []
    for p in points:
        r = p["retrieval"]
        row = [f"{p['alpha']:.2f}", f"{100 * p['mean_recall']:.2f}", f"{100 * r['image_to_text_R@1']:.2f}",
               f"{100 * r['text_to_image_R@1']:.2f}", f"{100 * p['auroc_all_mismatched']:.2f}"]
        if has_zeroshot:
            z = p["zeroshot"]
            row += [f"{100 * z['top1']:.2f}", f"{100 * z['top5']:.2f}",
                    "-" if z.get("abstain_rate") is None else f"{100 * z['abstain_rate']:.1f}"]
        rows.append(row)
    header = ["alpha", "mean recall %", "R@1 i->t %", "R@1 t->i %", "AUROC mismatched %"]
    if has_zeroshot:
        header += ["zero-shot top-1 %", "zero-shot top-5 %", "zero-shot abstain %"]
    return markdown_table(header, rows)


def tradeoff_plot(path: Path, curves: dict[str, list[dict[str, Any]]]) -> Path:
    """Fine-tuning mean recall vs zero-shot top-1, one line per sweep (alpha annotated)."""
    from ..eval.plots import tradeoff_curves

    points = {label: [(100 * p["mean_recall"], 100 * p["zeroshot"]["top1"], f"{p['alpha']:g}") for p in sweep]
              for label, sweep in curves.items()}
    return tradeoff_curves(points, path, "fine-tuning task: mean recall (R@1/5/10 both ways) %", "zero-shot top-1 %",
                           "WiSE-FT trade-off (alpha annotated)")
