"""Image-text HALO: the batch's captions are the centroids of its images, and vice versa.

For a batch of ``B`` (image, caption) pairs, image ``i`` is scored against
every caption of the (global) batch and the abstain sink at the origin, with
the HALO logits ``-g |x_i - t_j|^2 / D`` (shifted, see
:mod:`halo_embed.geometry`); its positives are the captions of the same image.
The symmetric term scores each caption against the batch's images. Targets are
HALO's teacher-free soft targets (or label smoothing), the sink's target is 0,
and the radial NLL keeps each image on a shell around its own caption.

A model trained this way can reject a mismatched caption: the pair (image,
caption) is accepted when the caption's logit for the image on the unit shell
reaches the sink's, the one rule :func:`halo_embed.geometry.pair_decision`
(``logit >= bias``, ``p = sigmoid(logit - bias) >= 0.5``) with the bias and
temperature of the model's :class:`~halo_embed.clip.decision.PairDecision`:
this loss's constant ``abstain_bias`` until one is fitted on held-out pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import geometry
from .._validation import check_bool, check_float, check_int, check_tensor, raise_if_any
from ..distributed import all_gather_no_grad, all_gather_with_grad
from .functional import HALOLossBase, halo_cross_entropy
from .fused import Positives, fused_halo_cross_entropy

__all__ = ["PairedHALOLoss"]


class PairedHALOLoss(HALOLossBase):
    """HALO for paired image-text embeddings, with the origin as the abstain candidate.

    Args:
        embed_dim: ``D``.
        num_candidates: ``K`` in the abstain-bias formula: the number of
            captions each image competes with in training, i.e. the **global**
            batch size (per-process batch x processes). The bias is fixed at
            construction, so scoring a single pair later uses the same
            threshold the model was trained against.
        symmetric: also score each caption against the batch's images (default).
        learn_gamma / distill / label_smoothing: as in :class:`~halo_embed.HALOLoss`.
        implementation: ``"fused"`` or ``"faithful"`` as in :class:`~halo_embed.HALOLoss`; unset (``None``):
            ``"fused"``, except with ``rejection_weight > 0``, whose term only the faithful implementation
            computes (``"faithful"``; asking for ``"fused"`` with it is an error).
        chunk_size: rows (queries) per block with the fused implementation:
            memory grows linearly in the batch instead of with its square
            (tiled mode for very large batches).
        rejection_weight: weight of the *absent-positive* term (an extension of
            HALO, 0 = off): each query is also scored against the batch's
            candidates **without** its positives, plus the sink, with the sink
            as the target, ``log(1 + sum_neg exp(logit - abstain_bias))``. It
            teaches the built-in threshold that a query whose right answer is
            missing belongs to the sink.
        norm_weight: weight of a radial NLL on each embedding's mean square
            ``|x|^2 / D`` (a "soap bubble" around the origin, 0 = off). HALO's
            abstain bias assumes ``|x|^2 / D`` near 1; without this the loss can
            inflate the norms to starve the sink, which moves the built-in
            threshold.
        init_gamma: the starting effective temperature (``None``: HALO's
            ``20 / (1 + 2/D)``); e.g. half a pretrained CLIP's logit scale, with
            which HALO's softmax over unit-norm captions equals CLIP's.

    Distributed: inside an initialised process group (``accelerate launch``,
    ``torchrun``) the features of all ranks are gathered **with gradients** and
    each rank computes the mean loss of its own queries against all candidates
    (local-loss style, no ``B x B`` matrix on any rank). The mean of the ranks'
    losses is the single-process loss on the global batch, and after DDP
    averages the parameter gradients they equal the single-process gradients
    (for equal per-rank batch sizes; tested with 2 processes).

    Gradient accumulation: each micro-batch's images only see that
    micro-batch's captions as negatives (as in open_clip without feature caching).

    Raises:
        TypeError / ValueError: on invalid arguments, naming the argument.
    """

    def __init__(
        self,
        embed_dim: int,
        num_candidates: int,
        symmetric: bool = True,
        learn_gamma: bool = True,
        distill: bool = True,
        label_smoothing: float = 0.1,
        rejection_weight: float = 0.0,
        norm_weight: float = 0.0,
        implementation: str | None = None,
        chunk_size: int | None = None,
        init_gamma: float | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim = check_int("embed_dim", embed_dim, minimum=2)
        self.num_candidates = check_int("num_candidates", num_candidates, minimum=2)
        self.symmetric = check_bool("symmetric", symmetric)
        self.learn_gamma = check_bool("learn_gamma", learn_gamma)
        self.distill = check_bool("distill", distill)
        self.label_smoothing = check_float(
            "label_smoothing", label_smoothing, minimum=0.0, maximum=1.0, include_maximum=False
        )
        self.rejection_weight = check_float("rejection_weight", rejection_weight, minimum=0.0)
        if implementation is None:  # the fused kernel computes every term but the absent-positive one
            implementation = "faithful" if self.rejection_weight else "fused"
        elif implementation == "fused" and self.rejection_weight:
            raise ValueError(f"implementation='fused' has no absent-positive term: rejection_weight="
                             f"{self.rejection_weight} needs implementation='faithful' (or leave it unset)")
        self._setup(self.embed_dim, self.learn_gamma, implementation, chunk_size, init_gamma)
        self.norm_weight = check_float("norm_weight", norm_weight, minimum=0.0)
        self.abstain_bias = geometry.abstain_bias(self.embed_dim, self.num_candidates, self.label_smoothing)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_candidates={self.num_candidates}, symmetric={self.symmetric}, "
            f"distill={self.distill}, label_smoothing={self.label_smoothing}, "
            f"rejection_weight={self.rejection_weight}, norm_weight={self.norm_weight}, "
            f"implementation={self.implementation!r}, chunk_size={self.chunk_size}, "
            f"abstain_bias={self.abstain_bias:.4f}"
        )

    def _check(self, image_features: Tensor, text_features: Tensor, image_ids: Tensor | None) -> None:
        check_tensor("image_features", image_features, ndim=2, floating=True, min_rows=1)
        check_tensor("text_features", text_features, ndim=2, floating=True, min_rows=1)
        if image_features.shape != text_features.shape:
            raise ValueError(
                "image_features and text_features must have the same shape (B, D) (pair i is row i of "
                f"each), got {tuple(image_features.shape)} and {tuple(text_features.shape)}"
            )
        if image_features.shape[1] != self.embed_dim:
            raise ValueError(
                f"features have D={image_features.shape[1]} dimensions but the loss was built with "
                f"embed_dim={self.embed_dim}"
            )
        if image_ids is not None:
            check_tensor("image_ids", image_ids, ndim=1, integer=True)
            if image_ids.shape[0] != image_features.shape[0]:
                raise ValueError(
                    f"image_ids must have one id per pair, shape ({image_features.shape[0]},), "
                    f"got {tuple(image_ids.shape)}"
                )
        raise_if_any(
            [
                (~torch.isfinite(image_features).all(), "image_features contains NaN or inf values"),
                (~torch.isfinite(text_features).all(), "text_features contains NaN or inf values"),
            ]
        )

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        image_ids: Tensor | None = None,
        return_parts: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Compute the loss for ``B`` pairs (row ``i`` of each input is pair ``i``).

        Args:
            image_features: ``(B, D)`` un-normalised image embeddings.
            text_features: ``(B, D)`` un-normalised caption embeddings.
            image_ids: ``(B,)`` integer id of the image of each pair; pairs with
                the same id (several captions of one image) are positives for
                each other, never negatives. ``None``: every pair is its own image.
            return_parts: also return ``{"image_to_text", "text_to_image",
                "radial", "temperature"}`` (detached) for logging.

        Returns:
            The scalar loss, or ``(loss, parts)``.
        """
        self._check(image_features, text_features, image_ids)
        dtype = torch.promote_types(image_features.dtype, torch.float32)
        with torch.autocast(device_type=image_features.device.type, enabled=False):
            images = image_features.to(dtype)
            texts = text_features.to(dtype)
            all_texts, offset = all_gather_with_grad(texts)
            all_images, _ = all_gather_with_grad(images) if self.symmetric else (None, 0)
            if image_ids is None:
                local_ids = torch.arange(images.shape[0], device=images.device) + offset
                all_ids = torch.arange(all_texts.shape[0], device=images.device)
            else:
                local_ids = image_ids.to(images.device).long()
                all_ids = all_gather_no_grad(local_ids)
            is_positive = None
            if self.implementation == "faithful":
                is_positive = local_ids[:, None] == all_ids[None, :]
            temperature = geometry.effective_gamma(self.gamma.to(dtype))

            def direction(queries: Tensor, candidates: Tensor) -> tuple[Tensor, Tensor | None]:
                if self.implementation == "fused":
                    ce, _ = fused_halo_cross_entropy(
                        queries, candidates, temperature, Positives(row_ids=local_ids, col_ids=all_ids),
                        self.abstain_bias, self.label_smoothing, self.distill, "mean", self.chunk_size,
                        return_true=False,
                    )
                    return ce, None
                shifted = geometry.shifted_logits(queries, candidates, temperature)
                ce, _ = halo_cross_entropy(
                    shifted, queries, temperature, self.abstain_bias, is_positive, self.label_smoothing, self.distill
                )
                if not self.rejection_weight:
                    return ce, None
                # the right answer is absent: the sink must win against every negative
                negatives = geometry.with_abstain(shifted.masked_fill(is_positive, float("-inf")), self.abstain_bias)
                return ce, (torch.logsumexp(negatives, dim=-1) - self.abstain_bias).mean()

            image_to_text, reject_i2t = direction(images, all_texts)
            text_to_image, reject_t2i = direction(texts, all_images) if self.symmetric else (None, None)
            ce = image_to_text if text_to_image is None else 0.5 * (image_to_text + text_to_image)
            r_sq = geometry.pair_mean_square(images, texts)
            radial = geometry.radial_nll(r_sq, self.embed_dim).mean()
            loss = ce + radial
            extra: dict[str, Tensor] = {}
            if reject_i2t is not None:
                extra["rejection"] = reject_i2t if reject_t2i is None else 0.5 * (reject_i2t + reject_t2i)
                loss = loss + self.rejection_weight * extra["rejection"]
            if self.norm_weight:
                norms = torch.cat([geometry.mean_square(images), geometry.mean_square(texts)]).squeeze(-1)
                extra["norm"] = geometry.radial_nll(norms, self.embed_dim).mean()
                loss = loss + self.norm_weight * extra["norm"]
        if not return_parts:
            return loss
        parts = {
            "image_to_text": image_to_text.detach(),
            "radial": radial.detach(),
            "temperature": temperature.detach().reshape(()),
            **{name: value.detach() for name, value in extra.items()},
        }
        if text_to_image is not None:
            parts["text_to_image"] = text_to_image.detach()
        return loss, parts
