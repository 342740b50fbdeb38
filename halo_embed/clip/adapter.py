"""Centre and scale CLIP features so that HALO's initialisation assumptions hold.

HALO's constants (initial temperature, abstain bias) assume embeddings and
centroids with unit per-dimension mean square, spread around the origin where
the abstain sink lives. CLIP's projected features are neither: each modality
sits in its own cone away from the origin (the "modality gap") with an
arbitrary scale. The adapter subtracts each modality's mean and divides by its
RMS, both measured once on training data (:meth:`FeatureAdapter.calibrate`) and
then saved with the model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._validation import check_int, check_tensor, raise_if_any

__all__ = ["FeatureAdapter", "MODALITIES"]

MODALITIES = ("image", "text")


class FeatureAdapter(nn.Module):
    """``x -> (x - centre) * scale`` per modality, computed in fp32.

    Args:
        embed_dim: ``D``.

    Buffers (saved in the state dict): ``image_center``, ``text_center``
    ``(D,)``, ``image_scale``, ``text_scale`` (scalars) and ``calibrated``.
    Before :meth:`calibrate` the adapter is the identity.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        d = check_int("embed_dim", embed_dim, minimum=2)
        for modality in MODALITIES:
            self.register_buffer(f"{modality}_center", torch.zeros(d))
            self.register_buffer(f"{modality}_scale", torch.ones(()))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))

    def forward(self, features: Tensor, modality: str) -> Tensor:
        """``(B, D) -> (B, D)`` fp32."""
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        center = getattr(self, f"{modality}_center")
        scale = getattr(self, f"{modality}_scale")
        return (features.float() - center) * scale

    @torch.no_grad()
    def calibrate(self, image_features: Tensor, text_features: Tensor) -> dict[str, float]:
        """Set each modality's centre to its mean and scale to ``1 / RMS`` of the centred features.

        Args:
            image_features / text_features: ``(N, D)`` raw backbone features of
                training samples (a few hundred suffice).

        Returns:
            The measured RMS and centre norms (for logs).
        """
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
                    f"{modality}_features are (nearly) identical (RMS {float(rms):.3g} around the mean); calibrate "
                    "on a random sample of the training data, not e.g. the first files of one class"
                )
            getattr(self, f"{modality}_center").copy_(center)
            getattr(self, f"{modality}_scale").fill_(1.0 / rms)
            stats[f"{modality}_rms"] = float(rms)
            stats[f"{modality}_center_norm"] = float(center.norm())
        self.calibrated.fill_(True)
        return stats
