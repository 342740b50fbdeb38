"""The classification HALO loss: a drop-in for the reference ``halo.py``.

Users of the published implementation switch with one import::

    from halo_embed import HALOLoss, HALOModel   # instead of: from halo import ...

Same constructor arguments and defaults, same ``forward(embeddings, target,
centroids, centroid_targets)`` returning ``(loss, true_logits)``, same numbers in
fp32. What differs is where the reference is broken: inputs are validated with
clear errors, an embedding exactly on its centroid gives a finite loss,
half-precision inputs and ``torch.autocast`` regions are computed in fp32,
``centroid_targets`` other than ``arange(K)`` are honoured, and
``label_smoothing=0`` with ``distill=True`` gives hard targets instead of NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import geometry
from .._validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_tensor,
    raise_if_any,
    raise_if_not_finite,
)
from .functional import IMPLEMENTATIONS, HALOLossBase, halo_cross_entropy, reduce
from .fused import Positives, fused_halo_cross_entropy

__all__ = ["HALOLoss", "IMPLEMENTATIONS", "REDUCTIONS", "resolve_target_columns"]

#: ``"mean"`` and ``"none"`` as in the reference, plus ``"sum"``.
REDUCTIONS = ("mean", "none", "sum")


def resolve_target_columns(
    target: Tensor, centroid_targets: Tensor | None, num_centroids: int
) -> tuple[Tensor, list]:
    """Map each label to the column of its centroid.

    With ``centroid_targets=None`` (or ``arange(K)``) label ``y`` is column
    ``y``. Otherwise ``centroid_targets[j]`` is the label of centroid ``j``;
    labels must be unique so that each class has one centroid.

    Returns:
        ``(columns, checks)``: ``(N,)`` long column indices, and the deferred
        data checks for :func:`raise_if_any` (labels present, labels unique).
    """
    if centroid_targets is None:
        low, high = target.min(), target.max()
        bad = (low < 0) | (high >= num_centroids)
        message = lambda: (  # noqa: E731 - built only when the check fails
            f"target has labels outside [0, {num_centroids}): "
            f"min {int(low)}, max {int(high)}"
        )
        return target.long(), [(bad, message)]
    sorted_labels, order = centroid_targets.long().sort()
    position = torch.searchsorted(sorted_labels, target.long()).clamp_max(num_centroids - 1)
    found = sorted_labels[position] == target
    duplicate = (sorted_labels[1:] == sorted_labels[:-1]).any()
    checks = [
        (
            duplicate,
            lambda: "centroid_targets must give each centroid a distinct label, got duplicates "
            f"{sorted_labels[1:][sorted_labels[1:] == sorted_labels[:-1]].unique().tolist()[:10]}",
        ),
        (
            ~found.all(),
            lambda: "target has labels that no centroid carries (not in centroid_targets): "
            f"{target[~found].unique().tolist()[:10]}",
        ),
    ]
    return order[position], checks


class HALOLoss(HALOLossBase):
    """HALO classification loss over distance logits with an abstain class at the origin.

    Logits are negative scaled squared distances to the ``K`` centroids plus an
    abstain logit whose prototype is the origin (:mod:`halo_embed.geometry`).
    The loss is the cross-entropy over the ``K + 1`` logits against soft
    targets (teacher-free self-distillation from the model's own distances, or
    plain label smoothing) that give the abstain class zero mass, plus the
    radial ("soap bubble") NLL of each embedding's distance to its own
    centroid.

    Args:
        emb_dims: ``D``, the embedding dimension (``>= 2``; the reference's name, kept so the
            class is a drop-in; the attribute is :attr:`embed_dim`).
        num_classes: ``K``, the number of centroids (``>= 1``).
        learn_gamma: learn the temperature (``softplus(gamma)``).
        distill: teacher-free soft targets (``True``) or label smoothing.
        label_smoothing: in ``[0, 1)``; also sets the abstain bias.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per sample).
        implementation: ``"fused"`` (default): the same numbers through
            :mod:`halo_embed.losses.fused` (an analytic backward, a fraction of
            the memory and time); ``"faithful"``: the reference's operations.
        chunk_size: with the fused implementation, process this many rows at a
            time so the ``N x K`` logits never exist (label spaces of 100k+
            classes); the returned true logits are then ``None``.
        init_gamma: the effective temperature to start from. ``None`` (the
            default) is the reference's ``20 / (2 - (1 - 2/D))`` (16.7 for
            ``D = 10``). That value gives randomly initialised centroids logits
            spread over ~10 nats, so the first steps are spent shrinking the
            centroids and the temperature; a start of 1-3 trains as fast as
            cross-entropy (``experiments/cifar_halo_dynamics.py``, README). Only
            the start changes: the temperature is still learnt (``learn_gamma``)
            and the abstain bias stays the reference's fixed value.

    Attributes:
        gamma: raw temperature parameter, shape ``(1,)``; the effective value
            is ``softplus(gamma)`` (:attr:`temperature`).
        abstain_bias: the fixed abstain logit (a float, not learned).

    Raises:
        TypeError / ValueError: on invalid arguments, naming the argument.

    Reference: the HALO loss, ``halo.py`` (``HALO_MATH.md`` in this project's
    documentation writes out every formula).
    """

    def __init__(
        self,
        emb_dims: int,
        num_classes: int,
        learn_gamma: bool = True,
        distill: bool = True,
        label_smoothing: float = 0.1,
        reduction: str = "mean",
        implementation: str = "fused",
        chunk_size: int | None = None,
        init_gamma: float | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim = check_int("emb_dims", emb_dims, minimum=2)
        self.num_classes = check_int("num_classes", num_classes, minimum=1)
        self.learn_gamma = check_bool("learn_gamma", learn_gamma)
        self.distill = check_bool("distill", distill)
        self.label_smoothing = check_float(
            "label_smoothing", label_smoothing, minimum=0.0, maximum=1.0, include_maximum=False
        )
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self._setup(self.embed_dim, self.learn_gamma, implementation, chunk_size, init_gamma)
        # the reference's attribute names, for code written against it
        self.D = float(self.embed_dim)
        self.K = float(self.num_classes)
        self.abstain_bias = geometry.abstain_bias(
            self.embed_dim, self.num_classes, self.label_smoothing
        )

    def extra_repr(self) -> str:
        return (
            f"emb_dims={self.embed_dim}, num_classes={self.num_classes}, "
            f"learn_gamma={self.learn_gamma}, distill={self.distill}, "
            f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}, "
            f"implementation={self.implementation!r}, chunk_size={self.chunk_size}, "
            f"init_gamma={self.init_gamma}, abstain_bias={self.abstain_bias:.4f}"
        )

    def _check(
        self, embeddings: Tensor, target: Tensor, centroids: Tensor, centroid_targets: Tensor | None
    ) -> Tensor:
        check_tensor("embeddings", embeddings, ndim=2, floating=True, min_rows=1)
        n, d = embeddings.shape
        if d != self.embed_dim:
            raise ValueError(
                f"embeddings has D={d} dimensions but the loss was built with emb_dims={self.embed_dim}"
            )
        check_tensor("target", target, ndim=1, integer=True)
        if target.shape[0] != n:
            raise ValueError(
                f"target must have one label per embedding, shape ({n},), got {tuple(target.shape)}"
            )
        check_tensor("centroids", centroids, ndim=2, floating=True)
        if tuple(centroids.shape) != (self.num_classes, self.embed_dim):
            raise ValueError(
                "centroids must have shape (num_classes, emb_dims) = "
                f"({self.num_classes}, {self.embed_dim}), got {tuple(centroids.shape)}"
            )
        if centroid_targets is not None:
            check_tensor("centroid_targets", centroid_targets, ndim=1, integer=True)
            if centroid_targets.shape[0] != self.num_classes:
                raise ValueError(
                    f"centroid_targets must have one label per centroid, shape ({self.num_classes},), "
                    f"got {tuple(centroid_targets.shape)}"
                )
        for name, tensor in (("target", target), ("centroids", centroids), ("centroid_targets", centroid_targets)):
            if tensor is not None and tensor.device != embeddings.device:
                raise ValueError(
                    f"{name} is on {tensor.device} but embeddings is on {embeddings.device}"
                )
        columns, checks = resolve_target_columns(target, centroid_targets, self.num_classes)
        raise_if_any(checks)
        return columns

    def forward(
        self,
        pos: Tensor,
        target: Tensor,
        centroids: Tensor,
        centroid_targets: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Compute the loss.

        Args:
            pos: ``(N, D)`` embeddings, any floating dtype (fp16/bf16 are computed
                in fp32, fp64 in fp64; autocast is disabled inside).
            target: ``(N,)`` integer class labels.
            centroids: ``(K, D)`` centroids (e.g. from :class:`HALOModel`).
            centroid_targets: ``(K,)`` label of each centroid; ``None`` means
                ``arange(K)``. Labels must be distinct.

        Returns:
            ``(loss, true_logits)``: the loss (a scalar, or ``(N,)`` with
            ``reduction="none"``) and the ``(N, K)`` true logits (fp32 or fp64)
            ``-g |x - c|^2 / D`` (with gradient; ``None`` with ``chunk_size``).

        Raises:
            TypeError / ValueError: wrong types, ranks or sizes, ``D`` different
            from ``emb_dims``, labels without a centroid, non-finite inputs.
        """
        columns = self._check(pos, target, centroids, centroid_targets)
        # HALO is an fp32 loss: half inputs are upcast (fp64 stays fp64), and
        # autocast is switched off because it would run the matmul in half.
        dtype = torch.promote_types(torch.promote_types(pos.dtype, centroids.dtype), torch.float32)
        with torch.autocast(device_type=pos.device.type, enabled=False):
            pos = pos.to(dtype)
            cen = centroids.to(dtype)
            temperature = geometry.effective_gamma(self.gamma.to(dtype))
            if self.implementation == "fused":
                # the radial term rides along: no (N, D) gather and scatter through autograd
                loss, true = fused_halo_cross_entropy(
                    pos, cen, temperature, Positives(columns=columns), self.abstain_bias, self.label_smoothing,
                    self.distill, self.reduction, self.chunk_size, radial=True,
                )
            else:
                shifted = geometry.shifted_logits(pos, cen, temperature)
                is_target = torch.zeros_like(shifted, dtype=torch.bool)
                is_target.scatter_(1, columns.unsqueeze(1), True)
                loss_ce, true = halo_cross_entropy(
                    shifted, pos, temperature, self.abstain_bias, is_target,
                    self.label_smoothing, self.distill, self.reduction,
                )
                r_sq = geometry.pair_mean_square(pos, cen[columns])
                loss = loss_ce + reduce(geometry.radial_nll(r_sq, self.embed_dim), self.reduction)
        raise_if_not_finite(loss.detach(), [("embeddings", pos), ("centroids", cen)])
        return loss, true
