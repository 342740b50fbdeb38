"""The cross-entropy part of HALO, shared by the classification and the paired loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import geometry
from .._validation import check_choice, check_float, check_int

__all__ = ["IMPLEMENTATIONS", "HALOLossBase", "halo_cross_entropy", "reduce"]

#: ``"fused"``: analytic backward, few ``N x K`` passes (default); ``"faithful"``: the reference's ops.
IMPLEMENTATIONS = ("fused", "faithful")


class HALOLossBase(nn.Module):
    """What every HALO loss holds: the learnable temperature and the choice of implementation."""

    def _setup(
        self,
        embed_dim: int,
        learn_gamma: bool,
        implementation: str,
        chunk_size: int | None,
        init_gamma: float | None = None,
    ) -> None:
        self.implementation = check_choice("implementation", implementation, IMPLEMENTATIONS)
        self.chunk_size = None if chunk_size is None else check_int("chunk_size", chunk_size, minimum=1)
        if self.chunk_size is not None and self.implementation != "fused":
            raise ValueError("chunk_size needs implementation='fused'")
        if init_gamma is not None:
            init_gamma = check_float("init_gamma", init_gamma)
            if init_gamma <= 0:
                raise ValueError(f"init_gamma must be a positive temperature, got {init_gamma}")
        self.init_gamma = init_gamma
        # the raw parameter is named `gamma`, as in the reference (state dicts load across); the value the
        # logits use is `temperature` = softplus(gamma)
        start = geometry.initial_gamma(embed_dim) if init_gamma is None else init_gamma
        self.gamma = nn.Parameter(torch.tensor([geometry.inverse_softplus(start)], dtype=torch.float32),
                                  requires_grad=learn_gamma)

    @property
    def temperature(self) -> Tensor:
        """The effective temperature ``softplus(gamma)``, shape ``(1,)``, fp32."""
        return geometry.effective_gamma(self.gamma.float())


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
    temperature: Tensor,
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
        temperature: the effective temperature ``g`` (``softplus`` of the loss's raw ``gamma``).
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
    true = geometry.true_logits(shifted, embeddings, temperature)
    if distill:
        class_probs = geometry.teacher_free_targets(true, is_target, label_smoothing)
    else:
        class_probs = geometry.smoothed_targets(is_target, label_smoothing, shifted.dtype)
    target_probs = geometry.pad_abstain_target(class_probs)
    return F.cross_entropy(logits, target_probs, reduction=reduction), true
