"""The cross-entropy part of HALO, shared by the classification and the paired loss."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .. import geometry

__all__ = ["halo_cross_entropy", "reduce"]


def reduce(values: Tensor, reduction: str) -> Tensor:
    """``"mean"``, ``"sum"`` or ``"none"`` over the first dimension."""
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def halo_cross_entropy(
    shifted: Tensor,
    embeddings: Tensor,
    gamma: Tensor,
    abstain_bias: float,
    is_target: Tensor,
    label_smoothing: float,
    distill: bool,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor]:
    """Cross-entropy over ``[candidates, abstain]`` against HALO's soft targets.

    Args:
        shifted: ``(N, K)`` shifted logits (:func:`halo_embed.geometry.shifted_logits`).
        embeddings: ``(N, D)`` the queries behind ``shifted``.
        gamma: the effective temperature.
        abstain_bias: the sink's logit.
        is_target: ``(N, K)`` bool, the positive candidate(s) of each row.
        label_smoothing: ``ls``; the teacher-free temperature with ``distill``.
        distill: teacher-free self-distilled targets, else label smoothing.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        ``(ce, true_logits)``: the reduced cross-entropy and the ``(N, K)``
        true logits ``-g |x - c|^2 / D`` (with gradient).
    """
    logits = geometry.with_abstain(shifted, abstain_bias)
    true = geometry.true_logits(shifted, embeddings, gamma)
    if distill:
        class_probs = geometry.teacher_free_targets(true, is_target, label_smoothing)
    else:
        class_probs = geometry.smoothed_targets(is_target, label_smoothing, shifted.dtype)
    target_probs = geometry.pad_abstain_target(class_probs)
    return F.cross_entropy(logits, target_probs, reduction=reduction), true
