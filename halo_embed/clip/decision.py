"""The accept / reject decision for (image, caption) pairs: one rule, calibrated on held-out pairs.

A pair is judged by HALO's two-candidate softmax ``[caption, sink]`` with the
image on the unit shell (:func:`halo_embed.geometry.pair_decision`):

    logit = g_pair (1 - |x - t|^2 / D),   p(aligned) = sigmoid(logit - bias),   accept = logit >= bias

Every caller (the scorer, the evaluation, retrieval with "none of these",
zero-shot abstention) judges through :class:`PairDecision`. Two ways to set
``(g_pair, bias)``:

- ``rule="constant"``: the model's temperature and HALO's abstain bias fixed
  at construction (``t_ideal - margin_ce`` for ``K`` = the training batch).
  It assumes embeddings sit where the loss was initialised; measured on
  held-out pairs it rejects nearly every pair once training has moved them
  (README, "Image-text results").
- ``rule="fitted"`` (:func:`fit_pair_decision`): both fitted on **held-out**
  aligned and mismatched pairs (never trained on) by a logistic fit of the
  pair's label on its unit-shell logit, classes weighted equally; the
  decision is ``p(aligned) >= 0.5``. With the ``"sphere"`` adapter
  ``1 - |x - t|^2 / D = 2 cos - 1``, so this is Platt scaling of the cosine,
  expressed as HALO's sink. ``fit_temperature=False`` fits the bias alone at
  the model's temperature.

Reference: HALO's abstain class (``HALO_MATH.md``); Platt (1999) for the
logistic fit of a score.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import geometry
from .._validation import check_float, check_int, check_tensor
from ..eval.metrics import threshold_accuracy

__all__ = ["MIN_CALIBRATION_IMAGES", "PairDecision", "check_min_images", "fit_pair_decision", "platt_scale"]

#: the fewest held-out images (each giving aligned and mismatched pairs) a fit accepts: two parameters
#: need some tens of pairs per class to settle within a point or two of balanced accuracy
MIN_CALIBRATION_IMAGES = 50


@dataclass
class PairDecision:
    """HALO's pair rule with its temperature and the sink's bias (see the module docstring).

    Attributes:
        temperature: ``g_pair`` (> 0).
        bias: the sink's logit.
        rule: ``"constant"`` or ``"fitted"``.
        fitted_on: for ``"fitted"``: the counts of aligned and mismatched
            pairs, where they came from, and the fit's own balanced accuracy.
    """

    temperature: float
    bias: float
    rule: str = "constant"
    fitted_on: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.temperature = check_float("temperature", self.temperature)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        self.bias = check_float("bias", self.bias)
        if self.rule not in ("constant", "fitted"):
            raise ValueError(f"rule must be 'constant' or 'fitted', got {self.rule!r}")

    def judge(self, mean_sq_distances: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(logit, p(aligned), accept)`` of pairs at mean-square distances ``|x - t|^2 / D`` (any shape);
        a logit beyond its dtype's range saturates (an infinite distance is a certain reject, never NaN)."""
        limit = torch.finfo(mean_sq_distances.dtype).max
        logit, probability, accept = geometry.pair_decision(mean_sq_distances, self.temperature, self.bias)
        return logit.clamp(-limit, limit), probability, accept

    def judge_pairs(self, images: Tensor, texts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`judge` of row-aligned ``(N, D)`` image and text embeddings (adapted); the distances in
        float64, so that embeddings of any finite float32 magnitude give finite logits."""
        logit, probability, accept = self.judge(geometry.pair_mean_square(images.double(), texts.double()))
        limit = torch.finfo(images.dtype).max
        return logit.clamp(-limit, limit).to(images.dtype), probability.to(images.dtype), accept

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PairDecision":
        if not isinstance(values, dict):
            raise ValueError(f"a decision must be an object with temperature and bias, got {values!r}")
        known = {k: values[k] for k in ("temperature", "bias", "rule", "fitted_on") if k in values}
        return cls(**known)


def fit_pair_decision(aligned: Tensor, mismatched: Tensor, temperature: float | None = None,
                      source: str = "") -> PairDecision:
    """Fit the pair rule on held-out pairs.

    Args:
        aligned: ``(A,)`` mean-square distances ``|x - t|^2 / D`` of aligned pairs.
        mismatched: ``(M,)`` the same for mismatched pairs (another image's caption).
        temperature: ``None``: fit the pair temperature and the bias together
            (a logistic fit, L2 penalty 1e-4 against separable data); a number:
            keep this temperature and fit the bias alone.
        source: where the pairs came from (recorded in ``fitted_on``).

    Returns:
        A ``"fitted"`` :class:`PairDecision`.

    Raises:
        ValueError: fewer than :data:`MIN_CALIBRATION_IMAGES` pairs of either
            kind, non-finite distances, or pairs that do not separate (aligned
            pairs no nearer than mismatched ones: no positive temperature fits).
    """
    _check_pairs(aligned, mismatched, "distances")
    a = (1.0 - aligned.double().cpu().numpy())
    m = (1.0 - mismatched.double().cpu().numpy())
    z = np.concatenate([a, m])
    y = np.concatenate([np.ones_like(a), np.zeros_like(m)])
    weights = np.concatenate([np.full_like(a, 0.5 / len(a)), np.full_like(m, 0.5 / len(m))])
    if temperature is None:
        slope, intercept = _logistic_fit(z, y, weights)
        if not slope > 0:
            raise ValueError("the calibration pairs do not separate: aligned pairs are not nearer than mismatched "
                             f"ones (mean |x - t|^2/D {float(aligned.mean()):.4f} vs {float(mismatched.mean()):.4f})")
        g, bias = slope, -intercept
    else:
        g = check_float("temperature", temperature)
        if g <= 0:
            raise ValueError(f"temperature must be > 0, got {g}")
        bias = _fit_bias(g * z, y, weights)
    threshold = bias / g  # accept when z = 1 - |x - t|^2/D >= bias / g
    fitted_on = {"aligned": int(len(a)), "mismatched": int(len(m)), "source": source,
                 "balanced_accuracy": threshold_accuracy(a, m, threshold),
                 "temperature_fitted": temperature is None}
    return PairDecision(g, bias, "fitted", fitted_on)


def _check_pairs(aligned: Tensor, mismatched: Tensor, what: str) -> None:
    for name, values in (("aligned", aligned), ("mismatched", mismatched)):
        check_tensor(name, values, ndim=1, floating=True)
        if values.shape[0] < MIN_CALIBRATION_IMAGES:
            raise ValueError(f"{name} has {values.shape[0]} pairs; a stable fit needs at least "
                             f"{MIN_CALIBRATION_IMAGES} aligned and {MIN_CALIBRATION_IMAGES} mismatched pairs")
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"{name} contains NaN or inf {what}")


def _logistic_fit(z: np.ndarray, y: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """``(slope, intercept)`` of the weighted logistic fit of ``y`` on ``z`` (L2 penalty 1e-4 against
    separable data, on ``z`` scaled to unit spread so the solver's tolerance does not depend on its units)."""
    from sklearn.linear_model import LogisticRegression

    spread = max(float(z.std()), 1e-12)
    fit = LogisticRegression(C=1e4, tol=1e-10, max_iter=10_000)
    fit.fit((z / spread)[:, None], y, sample_weight=weights * len(z))
    return float(fit.coef_[0, 0]) / spread, float(fit.intercept_[0])


def _fit_bias(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """The bias ``b`` minimising the weighted cross-entropy of ``sigmoid(logit - b)``: the root of its
    (monotone) derivative ``sum w (y - p)``, by bisection."""
    def excess(b: float) -> float:
        p = 1.0 / (1.0 + np.exp(-np.clip(logits - b, -700, 700)))
        return float((weights * (labels - p)).sum())

    low, high = float(logits.min()) - 50.0, float(logits.max()) + 50.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if excess(mid) > 0:  # p below the labels on balance: the bias is too high
            high = mid
        else:
            low = mid
    return 0.5 * (low + high)


def platt_scale(aligned: Tensor, mismatched: Tensor) -> tuple[float, float]:
    """Platt scaling of a similarity score (what a CLIP user would do): ``(a, b)`` with
    ``p = sigmoid(a * score + b)``, fitted on equally weighted ``(N,)`` aligned / mismatched scores (the same
    fit as :func:`fit_pair_decision`'s on ``z = score``, but any sign of ``a`` is a Platt scaling).

    Raises:
        ValueError: fewer than :data:`MIN_CALIBRATION_IMAGES` scores of either kind, or non-finite scores.
    """
    _check_pairs(aligned, mismatched, "scores")
    a, m = aligned.double().cpu().numpy(), mismatched.double().cpu().numpy()
    y = np.r_[np.ones_like(a), np.zeros_like(m)]
    weights = np.r_[np.full_like(a, 0.5 / len(a)), np.full_like(m, 0.5 / len(m))]
    return _logistic_fit(np.r_[a, m], y, weights)


def check_min_images(count: int, what: str) -> None:
    """Raise the one-line error for a calibration set of ``count`` images (below :data:`MIN_CALIBRATION_IMAGES`)."""
    count = check_int("count", count, minimum=0)
    if count < MIN_CALIBRATION_IMAGES:
        raise ValueError(f"{what} leaves {count} image(s) to calibrate the decision on; a stable fit needs at least "
                         f"{MIN_CALIBRATION_IMAGES} (each gives aligned and mismatched pairs)")

