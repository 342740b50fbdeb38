import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from halo_embed.eval import (
    accuracy,
    balanced_accuracy,
    best_threshold,
    expected_calibration_error,
    ood_metrics,
    threshold_accuracy,
)


def slow_auroc(id_scores, ood_scores):
    """P(id > ood) + P(tie)/2 over all pairs."""
    a, b = np.asarray(id_scores)[:, None], np.asarray(ood_scores)[None, :]
    return float(((a > b) + 0.5 * (a == b)).mean())


def slow_fpr95_id_kept(id_scores, ood_scores):
    """Scan thresholds from high to low; stop at the first that accepts >= 95% of ID."""
    for t in sorted(set(id_scores) | set(ood_scores), reverse=True):
        if np.mean(np.asarray(id_scores) >= t) >= 0.95:
            return float(np.mean(np.asarray(ood_scores) >= t))
    raise AssertionError


def slow_fpr95_ood_caught(id_scores, ood_scores):
    """Reject when score <= t; scan t upwards until >= 95% of OOD is rejected."""
    for t in sorted(set(id_scores) | set(ood_scores)):
        if np.mean(np.asarray(ood_scores) <= t) >= 0.95:
            return float(np.mean(np.asarray(id_scores) <= t))
    raise AssertionError


def test_fpr95_conventions_by_hand():
    id_scores = np.arange(1, 21, dtype=float)              # 1 .. 20
    ood_scores = np.r_[-np.arange(1, 20, dtype=float), 10.5]  # -1 .. -19 and one 10.5
    m = ood_metrics(id_scores, ood_scores)
    # keep 95% of ID (19 of 20): threshold 2; OOD accepted: only 10.5 -> 1/20
    assert m["fpr95_id_kept"] == pytest.approx(0.05)
    # catch 95% of OOD (19 of 20): reject score <= -1; ID rejected: none
    assert m["fpr95_ood_caught"] == pytest.approx(0.0)
    # the single OOD at 10.5 beats 10 of the 20 ID scores
    assert m["auroc"] == pytest.approx(1 - 10 / 400)


def test_fpr95_conventions_differ_by_hand():
    # ID 1..20; OOD: 18 values far below and two at 1.5 and 2.5
    id_scores = np.arange(1, 21, dtype=float)
    ood_scores = np.r_[np.full(18, -5.0), 1.5, 2.5]
    m = ood_metrics(id_scores, ood_scores)
    assert m["fpr95_id_kept"] == pytest.approx(1 / 20)    # threshold 2 accepts 2.5
    assert m["fpr95_ood_caught"] == pytest.approx(1 / 20)  # t = 1.5 catches 19 OOD, rejects ID 1
    ood_scores = np.r_[np.full(17, -5.0), 1.5, 2.5, 3.5]
    m = ood_metrics(id_scores, ood_scores)
    assert m["fpr95_id_kept"] == pytest.approx(2 / 20)    # threshold 2 accepts 2.5 and 3.5
    assert m["fpr95_ood_caught"] == pytest.approx(2 / 20)  # t = 2.5 catches 19, rejects ID 1, 2


@pytest.mark.parametrize("seed", range(5))
def test_ood_metrics_against_independent_computation(seed):
    rng = np.random.default_rng(seed)
    # rounded scores create ties, which is where hand-rolled curves usually go wrong
    id_scores = np.round(rng.normal(1.0, 1.0, 300), 1)
    ood_scores = np.round(rng.normal(0.0, 1.2, 200), 1)
    m = ood_metrics(id_scores, ood_scores)
    assert m["auroc"] == pytest.approx(slow_auroc(id_scores, ood_scores), abs=1e-12)
    y = np.r_[np.ones(300), np.zeros(200)]
    s = np.r_[id_scores, ood_scores]
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert m["aupr_in"] == pytest.approx(average_precision_score(y, s))
    assert m["aupr_out"] == pytest.approx(average_precision_score(1 - y, -s))
    assert m["fpr95_id_kept"] == pytest.approx(slow_fpr95_id_kept(id_scores, ood_scores))
    assert m["fpr95_ood_caught"] == pytest.approx(slow_fpr95_ood_caught(id_scores, ood_scores))
    assert (m["n_id"], m["n_ood"]) == (300, 200)


def test_ood_metrics_accepts_tensors_and_validates():
    m = ood_metrics(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.5]))
    assert m["auroc"] == 1.0
    with pytest.raises(ValueError, match="ood_scores must not be empty"):
        ood_metrics([1.0, 2.0], [])
    with pytest.raises(ValueError, match="id_scores contains 1 NaN or inf"):
        ood_metrics([1.0, float("nan")], [0.0])
    with pytest.raises(ValueError, match="id_scores must have 1 dimension"):
        ood_metrics([[1.0, 2.0]], [0.0])
    with pytest.raises(TypeError, match="ood_scores must be array-like"):
        ood_metrics([1.0], ["a"])


def test_ece_by_hand():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 0, 1])
    result = expected_calibration_error(probs, labels, n_bins=10)
    # bins: 0.9 -> acc 0.5 (2 samples, gap 0.4); 0.6 -> acc 1 (gap 0.4); 0.7 -> acc 1 (gap 0.3)
    assert result.ece == pytest.approx(0.5 * 0.4 + 0.25 * 0.4 + 0.25 * 0.3)
    assert result.mce == pytest.approx(0.4)
    assert result.accuracy == pytest.approx(0.75)
    assert sum(b["count"] for b in result.bins) == 4 and len(result.bins) == 10


def slow_ece(probs, labels, n_bins):
    conf, pred = probs.max(1), probs.argmax(1)
    ece = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = (conf > lo) & (conf <= hi)
        if members.any():
            ece += members.mean() * abs((pred[members] == labels[members]).mean() - conf[members].mean())
    return ece


def test_ece_against_slow_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1000, 10)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 10, 1000)
    assert expected_calibration_error(probs, labels).ece == pytest.approx(slow_ece(probs, labels, 15), abs=1e-12)


def test_ece_validation():
    with pytest.raises(ValueError, match="apply softmax to logits first"):
        expected_calibration_error(np.array([[2.0, -1.0]]), np.array([0]))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\) to match"):
        expected_calibration_error(np.array([[0.5, 0.5], [0.2, 0.8]]), np.array([0]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        expected_calibration_error(np.array([[0.5, 0.5]]), np.array([2]))
    with pytest.raises(ValueError, match="probs must not be empty"):
        expected_calibration_error(np.zeros((0, 2)), np.array([], dtype=int))
    with pytest.raises(TypeError, match="labels must hold integer"):
        expected_calibration_error(np.array([[0.5, 0.5]]), np.array([0.0]))


def test_accuracy_and_thresholds():
    assert accuracy([1, 2, 3], [1, 0, 3]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        accuracy([1, 2, 3], [1, 2])
    id_scores, ood_scores = np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0, 3.5])
    assert threshold_accuracy(id_scores, ood_scores, 2.0) == pytest.approx(0.5 * (1 + 2 / 3))
    assert balanced_accuracy([True, True, False], [False, True]) == pytest.approx(0.5 * (2 / 3 + 1 / 2))
    with pytest.raises(TypeError, match="ood_accepted must be a boolean array"):
        balanced_accuracy([True], [0.3])
    t, acc = best_threshold(id_scores, ood_scores)
    assert acc == pytest.approx(threshold_accuracy(id_scores, ood_scores, t))
    # brute force over every candidate threshold
    best = max(threshold_accuracy(id_scores, ood_scores, c) for c in np.r_[id_scores, ood_scores, 99.0])
    assert acc == pytest.approx(best)
