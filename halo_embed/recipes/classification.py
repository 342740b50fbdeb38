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

from ..inference import HALOHead, softmax_ood_scores

__all__ = ["concatenate", "evaluate_classifier", "predictions"]


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
