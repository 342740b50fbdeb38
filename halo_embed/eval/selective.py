"""Selective classification: a classifier that may decline, measured by what it keeps.

A rejection rule accepts an input when its score (larger = more confident /
more in-distribution) reaches a threshold. The threshold is set on held-out
data the model never trained on, by one of two rules:

* :func:`keep_threshold`: keep a target share of held-out in-distribution
  inputs (95 %: the operating point of every FPR@95 table, e.g. OpenOOD);
* :func:`~halo_embed.eval.best_threshold`: the best balanced accuracy
  between held-out in-distribution and OOD inputs, when some OOD data are at
  hand.

The decision is then measured on the test split: coverage (the share of ID
test inputs kept), the accuracy of the accepted inputs, the share of each OOD
set rejected, and the risk-coverage curve with its area (AURC; Geifman &
El-Yaniv, "Selective classification for deep neural networks", NeurIPS 2017),
which ranks a score over every threshold at once (lower is better).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .metrics import _as_array, _as_flags, best_threshold

__all__ = ["aurc", "decision_rates", "excess_aurc", "keep_threshold", "risk_coverage", "thresholded_decisions"]


def _check_keep(keep: float) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep must be a number in (0, 1], got {type(keep).__name__}")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    return float(keep)


def keep_threshold(id_scores: Any, keep: float = 0.95) -> float:
    """The largest threshold that accepts (``score >= threshold``) at least ``keep`` of ``id_scores``.

    Args:
        id_scores: ``(N,)`` scores of held-out in-distribution inputs.
        keep: the target share kept, in ``(0, 1]``.

    Raises:
        TypeError / ValueError: empty or non-finite scores, ``keep`` outside ``(0, 1]``.
    """
    scores = np.sort(_as_array("id_scores", id_scores))
    keep = _check_keep(keep)
    rejected = int(np.floor((1.0 - keep) * len(scores) + 1e-9))
    return float(scores[min(rejected, len(scores) - 1)])


def risk_coverage(scores: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    """The risk-coverage curve: ``(coverage, risk)`` at every distinct threshold, most confident first.

    Args:
        scores: ``(N,)`` confidence of each test input (larger = kept first).
        correct: ``(N,)`` bool, the prediction is right.

    Returns:
        Two ``(M,)`` arrays (``M`` distinct scores): the share of inputs with ``score >= t`` and the error
        rate among them. Tied scores enter together, so no order among equals is invented.
    """
    values = _as_array("scores", scores)
    right = _as_flags("correct", correct, len(values))
    order = np.argsort(-values, kind="stable")
    values, errors = values[order], np.cumsum(~right[order])
    ends = np.r_[np.nonzero(np.diff(values))[0], len(values) - 1]  # last index of each group of equal scores
    kept = ends + 1
    return kept / len(values), errors[ends] / kept


def aurc(scores: Any, correct: Any) -> float:
    """Area under the risk-coverage curve (lower is better): the mean, over ``k = 1..N``, of the error rate
    among the ``k`` most confident inputs; tied scores share the risk of their group.

    A perfect ranking of a classifier with error rate ``e`` reaches ``e + (1 - e) ln(1 - e)``; a score
    that ranks at random, ``e``.
    """
    coverage, risk = risk_coverage(scores, correct)
    counts = np.diff(np.r_[0.0, coverage])
    return float(np.sum(counts * risk))


def excess_aurc(scores: Any, correct: Any) -> float:
    """:func:`aurc` minus the AURC of a perfect ranking of the same predictions (E-AURC; Geifman et al., "Bias-
    reduced uncertainty estimation for deep neural classifiers", ICLR 2019): the ranking's own share, with the
    classifier's error rate taken out, so that two classifiers of different accuracy compare."""
    right = _as_flags("correct", correct)
    perfect = np.empty(len(right))
    perfect[np.argsort(~right, kind="stable")] = np.arange(len(right), 0, -1)  # right first, no ties
    return aurc(scores, right) - aurc(perfect, right)


def decision_rates(id_accept: Any, correct: Any, ood_accept: Mapping[str, Any]) -> dict[str, Any]:
    """What a decision did on the test split: ``id_kept`` (coverage), ``accepted_accuracy`` (of the kept ID
    inputs; ``None`` when none is kept), ``overall_accuracy`` and ``ood_rejected[name]`` per OOD set."""
    accept = _as_flags("id_accept", id_accept)
    right = _as_flags("correct", correct, len(accept))
    rejected = {name: float(1.0 - _as_flags(f"ood_accept[{name!r}]", mask).mean()) for name, mask in ood_accept.items()}
    return {
        "id_kept": float(accept.mean()),
        "accepted_accuracy": float(right[accept].mean()) if accept.any() else None,
        "overall_accuracy": float(right.mean()),
        "ood_rejected": rejected,
    }


def thresholded_decisions(calibration_scores: Mapping[str, Any], test_scores: Mapping[str, Any], correct: Any,
                          ood_scores: Mapping[str, Mapping[str, Any]], keep: float = 0.95,
                          calibration_ood_scores: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Every score function as a decision: its threshold set on held-out data, measured on the test split.

    Args:
        calibration_scores: score name -> ``(N_cal,)`` scores of held-out ID inputs.
        test_scores: score name -> ``(N,)`` scores of the ID test inputs.
        correct: ``(N,)`` bool, the closed-set prediction of each ID test input is right.
        ood_scores: OOD set -> score name -> scores.
        keep: the share of held-out ID inputs kept (the rule without OOD data).
        calibration_ood_scores: score name -> held-out OOD scores; given, the threshold is the best
            balanced accuracy between the held-out ID and OOD inputs instead.

    Returns:
        score name -> ``threshold``, ``rule``, :func:`decision_rates`, ``aurc`` and ``excess_aurc``.
    """
    results = {}
    for name, held_out in calibration_scores.items():
        if calibration_ood_scores is not None:
            threshold, _ = best_threshold(held_out, calibration_ood_scores[name])
            rule = "best balanced accuracy on held-out ID and OOD"
        else:
            threshold, rule = keep_threshold(held_out, keep), f"keep {keep:.0%} of held-out ID"
        test = _as_array(f"test_scores[{name!r}]", test_scores[name])
        rates = decision_rates(test >= threshold, correct,
                               {s: _as_array(f"ood_scores[{s!r}]", v[name]) >= threshold for s, v in ood_scores.items()})
        results[name] = {"threshold": threshold, "rule": rule, **rates, "aurc": aurc(test, correct),
                         "excess_aurc": excess_aurc(test, correct)}
    return results
