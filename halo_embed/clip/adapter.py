"""Centre and scale CLIP features so that HALO's initialisation assumptions hold.

HALO's constants (initial temperature, abstain bias) assume embeddings and
centroids with unit per-dimension mean square, spread around the origin where
the abstain sink lives. CLIP's projected features are neither: each modality
sits in its own cone away from the origin (the "modality gap") with an
arbitrary scale. The adapter subtracts each modality's mean and divides by its
RMS (one scalar per modality, so the geometry stays isotropic):

- ``normalization="fixed"``: both measured once on training data
  (:meth:`FeatureAdapter.fit`) and then frozen. Training is free to
  move the features away from that geometry (measured: the captions drift
  together while the radial term keeps each image on a shell around its
  caption, so an image ends as far from its own caption as from a wrong one).
- ``normalization="running"``: measured the same way, then in training
  every batch is normalised with its own statistics (over the global batch
  in a process group, with gradients, like synchronised BatchNorm), and the
  running statistics follow them with ``momentum``; in evaluation the running
  statistics are used as fixed values. Every training batch therefore has
  unit mean square around its mean in each modality, the geometry the
  abstain bias is calibrated for, and a checkpoint scores with the
  statistics saved in it.
- ``normalization="sphere"``: each feature L2-normalised and scaled by
  ``sqrt(D)`` (``|x|^2 / D = 1`` exactly, no centring, no statistics). Then
  ``|x - t|^2 / D = 2 - 2 cos(x, t)``: HALO's shifted logit is
  ``g (2 cos - 1)``, so its ranking is the cosine ranking of the model as
  pretrained (zero-shot accuracy and retrieval before the first step are
  exactly the cosine rule's) and its softmax over captions is CLIP's at logit
  scale ``2 g``. The price: every embedding is equally far from the origin,
  so the sink's logit is a constant and the accept / reject decision is a
  threshold on the cosine; its bias is fitted on held-out pairs
  (:mod:`halo_embed.clip.decision`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._validation import check_choice, check_float, check_int, check_tensor, raise_if_any
from ..distributed import all_gather_with_grad

__all__ = ["FeatureAdapter", "MODALITIES", "NORMALIZATIONS"]

MODALITIES = ("image", "text")
NORMALIZATIONS = ("fixed", "running", "sphere")


class FeatureAdapter(nn.Module):
    """``x -> (x - centre) * scale`` per modality, computed in fp32.

    Args:
        embed_dim: ``D``.
        normalization: ``"fixed"`` (statistics measured once by
            :meth:`fit`), ``"running"`` (batch statistics in training,
            running statistics in evaluation) or ``"sphere"`` (L2-normalised,
            scaled by ``sqrt(D)``; no statistics); see the module docstring.
        momentum: weight of each training batch in the running statistics
            (``"running"`` only), as in :class:`torch.nn.BatchNorm1d`.

    Buffers (saved in the state dict): ``image_center``, ``text_center``
    ``(D,)``, ``image_scale``, ``text_scale`` (scalars, ``1 / RMS``) and
    ``calibrated`` (statistics measured). Before :meth:`fit` the ``"fixed"`` adapter is the
    identity; the ``"running"`` one already normalises training batches; the
    ``"sphere"`` one needs no statistics (``calibrated`` from the start).

    Raises:
        TypeError / ValueError: on invalid arguments, naming the argument.
    """

    def __init__(self, embed_dim: int, normalization: str = "fixed", momentum: float = 0.05) -> None:
        super().__init__()
        d = check_int("embed_dim", embed_dim, minimum=2)
        self.normalization = check_choice("normalization", normalization, NORMALIZATIONS)
        self.momentum = check_float("momentum", momentum, minimum=0.0, maximum=1.0)
        if self.momentum == 0.0:
            raise ValueError("momentum must be > 0 (0 would never update the running statistics), got 0.0")
        for modality in MODALITIES:
            self.register_buffer(f"{modality}_center", torch.zeros(d))
            self.register_buffer(f"{modality}_scale", torch.ones(()))
        self.register_buffer("calibrated", torch.full((), self.normalization == "sphere", dtype=torch.bool))

    def extra_repr(self) -> str:
        return f"normalization={self.normalization!r}, momentum={self.momentum}"

    def forward(self, features: Tensor, modality: str) -> Tensor:
        """``(B, D) -> (B, D)`` fp32."""
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        center = getattr(self, f"{modality}_center")
        scale = getattr(self, f"{modality}_scale")
        x = features.float()
        if self.normalization == "sphere":
            return self.to_sphere(x)
        if self.normalization == "running" and self.training and torch.is_grad_enabled():
            batch = self._batch_statistics(x)
            if batch is not None:
                batch_center, batch_ms = batch
                with torch.no_grad():
                    center.lerp_(batch_center.detach(), self.momentum)
                    running_ms = scale.pow(-2).lerp(batch_ms.detach(), self.momentum)
                    scale.copy_(running_ms.clamp_min(1e-12).rsqrt())
                return (x - batch_center) * batch_ms.clamp_min(1e-12).rsqrt()
        return (x - center) * scale

    @staticmethod
    def to_sphere(x: Tensor) -> Tensor:
        """``(B, D) -> (B, D)``: ``sqrt(D) x / |x|`` (a zero row stays zero)."""
        return torch.nn.functional.normalize(x, dim=-1) * x.shape[-1] ** 0.5

    def prototype(self, mean_embedding: Tensor) -> Tensor:
        """A class prototype from the mean of adapted embeddings (e.g. of several prompt templates): back on
        the sphere for ``"sphere"`` (as CLIP's zero-shot classifier renormalises its mean), unchanged
        otherwise (the centred geometries are Euclidean)."""
        return self.to_sphere(mean_embedding) if self.normalization == "sphere" else mean_embedding

    @staticmethod
    def _batch_statistics(x: Tensor) -> tuple[Tensor, Tensor] | None:
        """Mean ``(D,)`` and mean square around it (scalar) of the global batch, with gradients.

        ``None`` for a global batch of fewer than 2 rows (no spread to measure:
        the running statistics are used instead).
        """
        # two passes over the global batch (mean, then the mean square around it: no cancellation
        # when the features sit far from the origin); each gathers one row per rank, and the
        # gather's backward routes every rank's share of the gradient back to its own rows
        sums, _ = all_gather_with_grad(torch.cat([x.sum(0), x.new_full((1,), x.shape[0])]).unsqueeze(0))
        total = sums.sum(0)
        count = total[-1]
        if float(count.detach()) < 2:
            return None
        mean = total[:-1] / count
        squares, _ = all_gather_with_grad((x - mean).pow(2).sum().reshape(1, 1))
        mean_square = squares.sum() / (count * x.shape[1])
        return mean, mean_square

    @torch.no_grad()
    def fit(self, image_features: Tensor, text_features: Tensor) -> dict[str, float]:
        """Set each modality's centre to its mean and scale to ``1 / RMS`` of the centred features.

        Args:
            image_features / text_features: ``(N, D)`` raw backbone features of
                training samples (a few hundred suffice).

        Returns:
            The measured RMS and centre norms (for logs); ``{}`` for ``"sphere"``, which has no statistics.
        """
        if self.normalization == "sphere":
            return {}
        stats = {}
        for modality, features in (("image", image_features), ("text", text_features)):
            check_tensor(f"{modality}_features", features, ndim=2, floating=True, min_rows=2)
            if features.shape[1] != self.image_center.shape[0]:
                raise ValueError(
                    f"{modality}_features has D={features.shape[1]}, the adapter has D={self.image_center.shape[0]}"
                )
            x = features.float().to(self.image_center.device)
            raise_if_any([(~torch.isfinite(x).all(), f"{modality}_features contains NaN or inf values")])
            center = x.mean(0)
            rms = (x - center).pow(2).mean().sqrt()
            if rms <= 1e-4 * max(1.0, float(center.abs().mean())):
                raise ValueError(
                    f"{modality}_features are (nearly) identical (RMS {float(rms):.3g} around the mean); measure "
                    "on a random sample of the training data, not e.g. the first files of one class"
                )
            getattr(self, f"{modality}_center").copy_(center)
            getattr(self, f"{modality}_scale").fill_(1.0 / rms)
            stats[f"{modality}_rms"] = float(rms)
            stats[f"{modality}_center_norm"] = float(center.norm())
        self.calibrated.fill_(True)
        return stats
