"""The fine-tuning recipe's evaluation: the pair decision fitted on the held-out calibration pairs,
retrieval and rejection on the validation data, zero-shot classification."""

from __future__ import annotations

from typing import Any

from .finetune_config import FinetuneConfig
from .finetune_data import eval_data_for, source_kind, zeroshot_data_for

__all__ = ["calibrate_model", "evaluate_run", "evaluate_zeroshot_for"]


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
