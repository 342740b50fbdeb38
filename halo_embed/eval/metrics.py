"""Calibration, OOD and rejection metrics, on scikit-learn's curve primitives.

Convention, everywhere in halo-embed: a score is **larger for in-distribution
(accepted) inputs**. Two FPR@95 conventions are in use in the literature and
they are not the same number, so both are reported, each under its own name:

=====================  ====================================================  ==========================
key                    meaning                                               used by
=====================  ====================================================  ==========================
``fpr95_id_kept``      share of OOD inputs accepted at the threshold that    ODIN, Energy, LogitNorm
                       keeps 95% of ID inputs (ID positive, TPR = 95%)
``fpr95_ood_caught``   share of ID inputs rejected at the threshold that     OpenOOD v1.5
                       catches 95% of OOD inputs (OOD positive, TPR = 95%)
=====================  ====================================================  ==========================

``aupr_in`` / ``aupr_out`` are scikit-learn's average precision (the
step-wise area, not the trapezoid OpenOOD integrates, which is optimistic),
with ID resp. OOD as the positive class.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "CalibrationResult",
    "accuracy",
    "balanced_accuracy",
    "best_threshold",
    "binary_calibration",
    "expected_calibration_error",
    "fpr_at_tpr",
    "ood_metrics",
    "threshold_accuracy",
]


def _as_array(name: str, values: Any, *, ndim: int = 1, dtype=np.float64) -> np.ndarray:
    """A finite, non-empty numpy array from a list, numpy array or torch tensor."""
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch here
        values = values.detach().float().cpu().numpy()
    try:
        array = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be array-like of numbers, got {type(values).__name__}") from error
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{name} must not be empty")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise ValueError(f"{name} contains {bad} NaN or inf value(s)")
    return array


def _as_vector(name: str, values: Any, n: int | None = None) -> np.ndarray:
    """A non-empty 1-D numpy array, of length ``n`` when given, from a list, numpy array or torch tensor."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1 or (n is not None and array.shape[0] != n):
        expected = f"({n},) to match" if n is not None else "(N,)"
        raise ValueError(f"{name} must have shape {expected}, got {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{name} must not be empty")
    return array


def _as_labels(name: str, values: Any, n: int | None = None) -> np.ndarray:
    """A 1-D integer array, of length ``n`` when given (else non-empty)."""
    array = _as_vector(name, values, n)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must hold integer class labels, got dtype {array.dtype}")
    return array


def _as_flags(name: str, values: Any, n: int | None = None) -> np.ndarray:
    """A 1-D boolean array, of length ``n`` when given (else non-empty)."""
    array = _as_vector(name, values, n)
    if array.dtype != np.bool_:
        raise TypeError(f"{name} must be a boolean array, got dtype {array.dtype}")
    return array


def accuracy(predictions: Any, labels: Any) -> float:
    """Share of ``predictions`` equal to ``labels`` (both ``(N,)`` integer arrays)."""
    pred = _as_labels("predictions", predictions)
    true = _as_labels("labels", labels, pred.shape[0])
    return float((pred == true).mean())


def fpr_at_tpr(positive_scores: np.ndarray, negative_scores: np.ndarray, tpr: float = 0.95) -> float:
    """FPR at the largest threshold whose TPR reaches ``tpr`` (``score >= threshold`` is positive).

    Every operating point is kept (``drop_intermediate=False``): scikit-learn's
    default drops collinear points, which can skip the first point with
    ``TPR >= tpr`` and report a worse FPR.
    """
    from sklearn.metrics import roc_curve

    y = np.r_[np.ones(len(positive_scores)), np.zeros(len(negative_scores))]
    fpr, tpr_curve, _ = roc_curve(y, np.r_[positive_scores, negative_scores], drop_intermediate=False)
    return float(fpr[np.argmax(tpr_curve >= tpr)])


def ood_metrics(id_scores: Any, ood_scores: Any, *, tpr: float = 0.95) -> dict[str, float]:
    """Detection metrics for one score function on one ID and one OOD set.

    Args:
        id_scores: ``(N_id,)`` scores of in-distribution inputs (larger = more ID).
        ood_scores: ``(N_ood,)`` scores of out-of-distribution inputs.
        tpr: the operating point of both FPR@TPR numbers (0.95 for FPR@95).

    Returns:
        ``auroc``, ``aupr_in``, ``aupr_out``, ``fpr95_id_kept``,
        ``fpr95_ood_caught`` (fractions in ``[0, 1]``), and the set sizes.

    Raises:
        ValueError: empty inputs, NaN/inf, ``tpr`` outside ``(0, 1]``.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    id_arr = _as_array("id_scores", id_scores)
    ood_arr = _as_array("ood_scores", ood_scores)
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    scores = np.r_[id_arr, ood_arr]
    is_id = np.r_[np.ones(len(id_arr)), np.zeros(len(ood_arr))]
    return {
        "auroc": float(roc_auc_score(is_id, scores)),
        "aupr_in": float(average_precision_score(is_id, scores)),
        "aupr_out": float(average_precision_score(1 - is_id, -scores)),
        "fpr95_id_kept": fpr_at_tpr(id_arr, ood_arr, tpr),
        "fpr95_ood_caught": fpr_at_tpr(-ood_arr, -id_arr, tpr),
        "n_id": int(len(id_arr)),
        "n_ood": int(len(ood_arr)),
    }


def balanced_accuracy(id_accepted: Any, ood_accepted: Any) -> float:
    """Balanced accuracy of an accept / reject decision: the mean of the share of ID inputs accepted and the
    share of OOD inputs rejected, so that set sizes do not decide the number (``(N,)`` and ``(M,)`` bools)."""
    id_arr, ood_arr = _as_flags("id_accepted", id_accepted), _as_flags("ood_accepted", ood_accepted)
    return float(0.5 * (id_arr.mean() + (~ood_arr).mean()))


def threshold_accuracy(id_scores: Any, ood_scores: Any, threshold: float) -> float:
    """:func:`balanced_accuracy` of the rule "accept when ``score >= threshold``"."""
    id_arr = _as_array("id_scores", id_scores)
    ood_arr = _as_array("ood_scores", ood_scores)
    return balanced_accuracy(id_arr >= threshold, ood_arr >= threshold)


def best_threshold(id_scores: Any, ood_scores: Any) -> tuple[float, float]:
    """The threshold with the highest :func:`threshold_accuracy` and that accuracy.

    Choose it on a validation split, never on the split you report.
    """
    from sklearn.metrics import roc_curve

    id_arr = _as_array("id_scores", id_scores)
    ood_arr = _as_array("ood_scores", ood_scores)
    y = np.r_[np.ones(len(id_arr)), np.zeros(len(ood_arr))]
    fpr, tpr, thresholds = roc_curve(y, np.r_[id_arr, ood_arr], drop_intermediate=False)
    balanced = 0.5 * (tpr + 1.0 - fpr)
    best = int(np.argmax(balanced))
    threshold = float(thresholds[best])
    if not np.isfinite(threshold):  # the "accept nothing" point
        threshold = float(np.max(np.r_[id_arr, ood_arr]) + 1.0)
    return threshold, float(balanced[best])


@dataclass
class CalibrationResult:
    """ECE and the per-bin table behind a reliability diagram.

    Attributes:
        ece: expected calibration error, ``sum_b |B_b|/N * |acc(B_b) - conf(B_b)|``.
        mce: maximum calibration error over non-empty bins.
        accuracy: top-label accuracy.
        bins: one dict per bin: ``lower``, ``upper``, ``count``,
            ``confidence`` (mean top-label probability), ``accuracy``
            (``None`` for both when the bin is empty).
    """

    ece: float
    mce: float
    accuracy: float
    bins: list[dict[str, float | int | None]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = 15) -> CalibrationResult:
    """Top-label ECE of softmax probabilities with equal-width bins (Guo et al., 2017).

    A sample falls in bin ``b`` when its top-label confidence is in
    ``(b/n_bins, (b+1)/n_bins]``. For a HALO model pass the ``K+1``
    probabilities: the abstain column is a possible prediction that is never
    a correct label, so abstaining on a known input costs accuracy and its
    confidence is the sink's probability.

    Args:
        probs: ``(N, C)`` probabilities, each row summing to 1 (not logits).
        labels: ``(N,)`` integer labels in ``[0, C)``.
        n_bins: number of equal-width confidence bins.

    Raises:
        ValueError: not probabilities (entries outside [0, 1] or rows not
            summing to 1, e.g. raw logits), mismatched lengths, NaN, empty
            input, labels out of range.
    """
    p = _as_array("probs", probs, ndim=2)
    y = _as_labels("labels", labels, p.shape[0])
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    if p.min() < 0 or p.max() > 1 or np.abs(p.sum(1) - 1).max() > 1e-3:
        raise ValueError(
            "probs must be softmax probabilities (entries in [0, 1], rows summing to 1); "
            f"got entries in [{p.min():.3g}, {p.max():.3g}] and row sums up to "
            f"{np.abs(p.sum(1) - 1).max() + 1:.3g} - apply softmax to logits first"
        )
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"labels must be in [0, {p.shape[1]}), got min {y.min()}, max {y.max()}")
    confidence = p.max(1)
    correct = (p.argmax(1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin b holds (edges[b], edges[b+1]]; a confidence of exactly 0 cannot occur for a softmax row
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    bins, ece, mce = [], 0.0, 0.0
    for b in range(n_bins):
        members = which == b
        count = int(members.sum())
        if count:
            conf_b, acc_b = float(confidence[members].mean()), float(correct[members].mean())
            gap = abs(acc_b - conf_b)
            ece += count / len(y) * gap
            mce = max(mce, gap)
        else:
            conf_b = acc_b = None
        bins.append(
            {"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": count,
             "confidence": conf_b, "accuracy": acc_b}
        )
    return CalibrationResult(ece=float(ece), mce=float(mce), accuracy=float(correct.mean()), bins=bins)


def binary_calibration(probability: Any, labels: Any, n_bins: int = 15) -> dict[str, float]:
    """Calibration of a probability that an input is positive (e.g. p(aligned) of an image-text pair).

    Returns ``ece`` (the top-label ECE of the two-class probabilities ``[1 - p, p]``, equal-width bins) and
    ``brier`` (mean ``(p - y)^2``).

    Raises:
        ValueError: probabilities outside ``[0, 1]``, labels other than 0 / 1, mismatched lengths, NaN.
    """
    p = _as_array("probability", probability)
    y = _as_labels("labels", labels, p.shape[0])
    if p.min() < 0 or p.max() > 1:
        raise ValueError(f"probability must be in [0, 1], got values in [{p.min():.3g}, {p.max():.3g}]")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    ece = expected_calibration_error(np.stack([1.0 - p, p], axis=1), y, n_bins).ece
    return {"ece": ece, "brier": float(((p - y) ** 2).mean())}


def mean_std(values: Any) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof = 1``) of runs over seeds; the std of one run is 0.

    Raises:
        ValueError: when ``values`` is empty or not finite.
    """
    array = _as_array("values", list(values) if not hasattr(values, "__len__") else values)
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0
