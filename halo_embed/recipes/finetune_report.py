"""The fine-tuning recipe's evaluation and reports: retrieval and rejection on the validation data,
``report.md`` / ``metrics.json`` of a run, and the side-by-side report of a comparison."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .finetune_config import FinetuneConfig
from .finetune_data import eval_data_for, source_kind, zeroshot_data_for

__all__ = ["calibrate_model", "evaluate_run", "evaluate_zeroshot_for", "headline", "write_comparison",
           "write_run_report"]


def evaluate_zeroshot_for(model, config: FinetuneConfig, device, data=None) -> dict[str, Any] | None:
    """Zero-shot classification of ``--zeroshot-data`` (``None`` when not given); ``data`` from
    :func:`~halo_embed.recipes.finetune_data.zeroshot_data_for` to reuse it."""
    from ..clip.evaluate import view_of
    from ..clip.zeroshot import evaluate_zeroshot

    data = data if data is not None else zeroshot_data_for(config)
    if data is None:
        return None
    images, ood = data
    was_training = model.training
    model.eval()
    try:
        return evaluate_zeroshot(view_of(model), images, config.zeroshot_templates, device, ood,
                                 workers=config.workers)
    finally:
        model.train(was_training)


def calibrate_model(model, data, device) -> dict[str, Any] | None:
    """On the calibration pairs ``data`` (:func:`~halo_embed.recipes.finetune_data.calibration_data_for`;
    ``None``: nothing to do): fit a HALO model's decision, and return every model's
    :func:`~halo_embed.clip.evaluate.calibration_scores` (for the rules a user would choose on them)."""
    from ..clip import HALOCLIP
    from ..clip.evaluate import calibration_scores, view_of

    if data is None:
        return None
    was_training = model.training
    model.eval()
    try:
        scores = calibration_scores(view_of(model), data, device)
        if isinstance(model, HALOCLIP):
            model.fit_decision(scores["images"], scores["aligned_texts"], scores["mismatched_texts"],
                               source=f"{len(data.images)} held-out training images (--calibration-split)")
            scores = calibration_scores(view_of(model), data, device)  # the scores at the fitted temperature
        return scores
    finally:
        model.train(was_training)


def evaluate_run(model, config: FinetuneConfig, device, calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """Retrieval and rejection on the validation data (and the unseen combinations of the built-in data);
    ``calibration``: :func:`calibrate_model`'s scores, for the thresholds a user would choose on them."""
    from ..clip import HALOCLIP
    from ..clip.evaluate import build_eval_data, evaluate_alignment, view_of
    from ..data.shapes import ShapesDataset

    model.eval()
    view = view_of(model)
    results = {"val": evaluate_alignment(view, eval_data_for(config), device, calibration=calibration)}
    if source_kind(config.train_data, config.dataset_type) == "shapes":
        unseen = ShapesDataset("unseen", config.shapes_val_images, seed=config.seed)
        results["unseen combinations"] = evaluate_alignment(
            view, build_eval_data(unseen, config.eval_images, config.seed, hard_negative=unseen.hard_negative), device,
            calibration=calibration)
    out: dict[str, Any] = {"eval": results}
    if isinstance(model, HALOCLIP):
        out["decision"] = model.decision.to_dict()
    return out


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
        from .wise_ft import wise_ft_table

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
        from .wise_ft import tradeoff_plot

        tradeoff_plot(root / "wise_ft_tradeoff.png", sweeps)
        plots["WiSE-FT trade-off of each loss"] = "wise_ft_tradeoff.png"
    payload = {c.loss: _strip(r) for c, r in zip(configs, results)}
    return write_report(root, "Fine-tuning comparison: " + " vs ".join(c.loss for c in configs), payload, sections,
                        plots)
