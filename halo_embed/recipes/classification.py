"""Classification with abstention, evaluated the same way by the digits and CIFAR recipes.

A model's batch output becomes :func:`predictions` (probabilities, the
closed-set prediction, whether HALO abstained, every OOD score), and
:func:`evaluate_classifier` measures them like the published table: ID
accuracy, ECE (over the ``K + 1`` HALO probabilities, the abstain column
included) and, for every score function, AUROC and both FPR@95 conventions
against each near- and far-OOD set.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from ..inference import DECISION_RULES, HALOHead, softmax_ood_scores

#: the two losses every classification recipe compares, cross-entropy first
LOSSES = ("cce", "halo")

__all__ = ["LOSSES", "calibrated_heads", "concatenate", "decision_markdown", "decision_metrics", "decision_rows",
           "decision_rule_text", "evaluate_classifier", "predictions"]


def predictions(embeddings: Tensor, head: HALOHead | None = None, logits: Tensor | None = None) -> dict[str, Any]:
    """One batch's predictions: HALO's from ``head`` on ``embeddings``, cross-entropy's from ``logits``
    (default: the embeddings are the logits)."""
    if head is not None:
        out = head(embeddings)
        return {"embeddings": embeddings, "probs": out.probs,  # K + 1 columns, the last is abstain
                "pred": out.probs[:, :-1].argmax(1), "abstained": out.abstained, "scores": out.scores}
    logits = embeddings if logits is None else logits
    return {"embeddings": embeddings, "probs": torch.softmax(logits, 1), "pred": logits.argmax(1),
            "abstained": torch.zeros(len(logits), dtype=torch.bool, device=logits.device),
            "scores": softmax_ood_scores(logits)}


def concatenate(batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The batches' predictions as one, on the CPU, in fp32 (predictions stay integer)."""
    parts: dict[str, list[Tensor]] = {}
    scores: dict[str, list[Tensor]] = {}
    for batch in batches:
        for key, value in batch.items():
            if key == "scores":
                for name, score in value.items():
                    scores.setdefault(name, []).append(score.float().cpu())
            else:
                parts.setdefault(key, []).append(value.cpu() if key in ("pred", "abstained") else value.float().cpu())
    return {**{k: torch.cat(v) for k, v in parts.items()}, "scores": {k: torch.cat(v) for k, v in scores.items()}}


def evaluate_classifier(predict: Callable[[Any], dict[str, Any]], test: Any, labels: Tensor,
                        ood_sets: Mapping[str, Any], near: Sequence[str], far: Sequence[str]) -> dict[str, Any]:
    """Accuracy, ECE, abstain rates and every score function's OOD metrics.

    Args:
        predict: inputs -> :func:`predictions` (of all of them).
        test, labels: the ID test inputs and their ``(N,)`` labels.
        ood_sets: name -> inputs of each OOD set; ``near`` / ``far`` name the groups.
    """
    from ..eval import accuracy, expected_calibration_error, ood_table

    known = predict(test)
    unseen = {name: predict(inputs) for name, inputs in ood_sets.items()}
    ood = ood_table(known["scores"], {name: out["scores"] for name, out in unseen.items()}, near=list(near),
                    far=list(far))
    calibration = expected_calibration_error(known["probs"], labels)
    metrics = {
        "accuracy": accuracy(known["pred"], labels),
        "ece": calibration.ece,
        "abstain_rate_known": known["abstained"].float().mean().item(),
        **{f"abstain_rate[{name}]": out["abstained"].float().mean().item() for name, out in unseen.items()},
        "ood": ood.metrics,
        "near": list(near),
        "far": list(far),
    }
    return {"metrics": metrics, "calibration": calibration, "ood": ood, "known": known, "unseen": unseen}


def calibrated_heads(head: HALOHead, held_out: dict[str, Any], held_out_ood: Mapping[str, dict[str, Any]],
                     keep: float) -> dict[str, HALOHead]:
    """A copy of ``head`` per :data:`~halo_embed.inference.DECISION_RULES`, each calibrated on the held-out
    :func:`predictions` (``keep`` of the ID ones kept, or the best separation from ``held_out_ood``), and the
    uncalibrated head as ``reference``."""
    import copy

    ood = torch.cat([out["embeddings"] for out in held_out_ood.values()]) if held_out_ood else None
    heads = {"reference": copy.deepcopy(head)}  # the loss's constant bias, uncalibrated: what the sink does alone
    for rule in DECISION_RULES:
        heads[rule] = copy.deepcopy(head)
        heads[rule].calibrate(held_out["embeddings"], keep, ood_embeddings=ood, rule=rule)
    return heads


def decision_metrics(result: dict[str, Any], labels: Tensor, held_out: dict[str, Any],
                     held_out_ood: Mapping[str, dict[str, Any]], keep: float,
                     heads: Mapping[str, HALOHead], primary: str | None = None) -> dict[str, Any]:
    """The decision on the test split, every way it can be made from held-out data.

    ``scores``: every score function thresholded on the held-out split (:func:`~halo_embed.eval.selective.
    thresholded_decisions`: ID kept, accuracy of the accepted, OOD rejected per set, AURC); ``rules``: each
    calibrated HALO head's own decision (``primary`` is the one the run reports as its decision).
    """
    from ..eval.selective import decision_rates, thresholded_decisions

    known, unseen = result["known"], result["unseen"]
    correct = known["pred"] == labels
    ood_scores = None
    if held_out_ood:
        ood_scores = {name: torch.cat([out["scores"][name] for out in held_out_ood.values()])
                      for name in held_out["scores"]}
    scores = thresholded_decisions(held_out["scores"], known["scores"], correct,
                                   {name: out["scores"] for name, out in unseen.items()}, keep, ood_scores)
    rules = {}
    for rule, head in heads.items():
        declines = lambda embeddings: head(embeddings).abstained.cpu()  # noqa: E731
        rules[rule] = {**decision_rates(~declines(known["embeddings"]), correct,
                                        {name: ~declines(out["embeddings"]) for name, out in unseen.items()}),
                       "calibration": head.calibration.to_dict()}
    return {"keep": keep, "n_held_out": len(held_out["pred"]), "held_out_ood": list(held_out_ood),
            "primary": primary, "scores": scores, "rules": rules}


def decision_rows(loss: str, decision: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(row label, rates)`` for every way a run decides: HALO's calibrated rules, then every score
    function thresholded by the same rule (:func:`~halo_embed.recipes.classification.decision_metrics`)."""
    note = lambda rule: (" (the run's)" if rule == decision["primary"] else  # noqa: E731
                         " (the loss's constant bias, uncalibrated)" if rule == "reference" else "")
    rows = [(f"{loss.upper()} decision `{rule}`{note(rule)}", {**rates, "aurc": None, "excess_aurc": None})
            for rule, rates in decision["rules"].items()]
    rows += [(f"{loss.upper()} `{score}` thresholded", rates) for score, rates in decision["scores"].items()]
    return rows


def decision_markdown(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """One line per decision: ID test images kept, accuracy of the accepted, AURC, each OOD set rejected."""
    from ..eval import format_value, markdown_table

    sets = list(rows[0][1]["ood_rejected"])
    header = ["decision", "ID test kept %", "accuracy of accepted %", "AURC %", "E-AURC %"] + \
        [f"{name} rejected %" for name in sets]
    body = [[label, format_value("kept", r["id_kept"]), format_value("accuracy", r["accepted_accuracy"]),
             format_value("aurc", r["aurc"]), format_value("aurc", r.get("excess_aurc"))]
            + [format_value("rejected", r["ood_rejected"][n]) for n in sets]
            for label, r in rows]
    return markdown_table(header, body)


def decision_rule_text(decision: dict[str, Any]) -> str:
    held_out = decision["n_held_out"]
    if decision["held_out_ood"]:
        return (f"thresholds set on {held_out} held-out training images (never trained on) and the held-out OOD "
                f"set(s) {', '.join(decision['held_out_ood'])}: the best balanced accuracy between them")
    return (f"thresholds set to keep {100 * decision['keep']:.0f} % of {held_out} held-out training images "
            "(never trained on)")
