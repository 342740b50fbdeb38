"""The fine-tuning recipe's evaluation and reports: retrieval and rejection on the validation data,
``report.md`` / ``metrics.json`` of a run, and the side-by-side report of a comparison."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .finetune_config import FinetuneConfig
from .finetune_data import eval_data_for, source_kind

__all__ = ["evaluate_run", "headline", "write_comparison", "write_run_report"]


def evaluate_run(model, config: FinetuneConfig, device) -> dict[str, Any]:
    """Retrieval and rejection on the validation data (and the unseen combinations of the built-in data)."""
    from ..clip.evaluate import build_eval_data, evaluate_alignment, view_of
    from ..data.shapes import ShapesDataset

    model.eval()
    view = view_of(model)
    results = {"val": evaluate_alignment(view, eval_data_for(config), device)}
    if source_kind(config.train_data, config.dataset_type) == "shapes":
        unseen = ShapesDataset("unseen", config.shapes_val_images, seed=config.seed)
        results["unseen combinations"] = evaluate_alignment(
            view, build_eval_data(unseen, config.eval_images, config.seed, hard_negative=unseen.hard_negative), device)
    return {"eval": results}


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
    return flat


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
    for split, result in metrics["eval"].items():
        rows = [[name, *(f"{100 * v[k]:.2f}" for k in ("auroc", "fpr95_id_kept", "fpr95_ood_caught", "aupr_in")),
                 "-" if v.get("builtin_threshold_accuracy") is None else f"{100 * v['builtin_threshold_accuracy']:.2f}",
                 f"{100 * v['tuned_threshold_accuracy']:.2f}"] for name, v in result["rejection"].items()]
        sections.append(f"## {split}: rejection (aligned pairs vs mismatched)\n\n" + markdown_table(
            ["negatives", "AUROC %", "FPR@95 (aligned kept) %", "FPR@95 (mismatch caught) %", "AUPR-in %",
             "built-in threshold acc. %", "tuned threshold acc. %"], rows))
        sections.append(f"## {split}: retrieval\n\n" + side_by_side(
            {config.loss: result["retrieval"]}, [(k, k) for k in result["retrieval"]]))
        plots.update(_plots(run_dir, split.replace(" ", "_"), result))
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
    payload = {c.loss: _strip(r) for c, r in zip(configs, results)}
    return write_report(root, "Fine-tuning comparison: " + " vs ".join(c.loss for c in configs), payload, sections,
                        {f"{c.loss}: pair scores ({s})": f"{c.name}/{s.replace(' ', '_')}_pair_scores.png"
                         for c in configs for s in splits[:1]})
