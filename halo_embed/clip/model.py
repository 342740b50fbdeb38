"""HALOCLIP: a CLIP backbone, the feature adapter and the paired HALO loss in one module.

Keeping the loss (its learnable temperature) inside the model means DDP /
Accelerate synchronise it like any other parameter, and one state dict holds
everything the scorer needs: backbone weights, centring statistics, temperature and
the abstain bias.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..losses import PairedHALOLoss
from .adapter import FeatureAdapter
from .backbones import CLIPBackbone, Tokens

__all__ = ["HALOCLIP"]


class HALOCLIP(nn.Module):
    """CLIP trained and scored with HALO.

    Args:
        backbone: an :class:`~halo_embed.clip.backbones.CLIPBackbone`.
        num_candidates: the global training batch size (sets the abstain bias,
            see :class:`~halo_embed.losses.PairedHALOLoss`).
        normalization / momentum: the feature adapter's statistics, ``"fixed"``
            (measured once by :meth:`calibrate`) or ``"running"`` (batch
            statistics in training, running ones for scoring); see
            :class:`~halo_embed.clip.adapter.FeatureAdapter`.
        loss_kwargs: further :class:`PairedHALOLoss` arguments
            (``symmetric``, ``distill``, ``label_smoothing``, ``learn_gamma``,
            ``rejection_weight``, ``norm_weight``).
    """

    def __init__(
        self,
        backbone: CLIPBackbone,
        num_candidates: int,
        normalization: str = "fixed",
        momentum: float = 0.05,
        **loss_kwargs: Any,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, CLIPBackbone):
            raise TypeError(f"backbone must be a CLIPBackbone, got {type(backbone).__name__}")
        self.backbone = backbone
        # HALO's gamma replaces CLIP's logit scale; frozen, it also leaves DDP no unused parameter
        for param in backbone.contrastive_parameters():
            param.requires_grad_(False)
        self.adapter = FeatureAdapter(backbone.embed_dim, normalization=normalization, momentum=momentum)
        self.loss = PairedHALOLoss(backbone.embed_dim, num_candidates, **loss_kwargs)

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    @property
    def temperature(self) -> Tensor:
        """The effective temperature ``softplus(loss.gamma)``."""
        return self.loss.temperature

    @property
    def abstain_bias(self) -> float:
        return self.loss.abstain_bias

    def adapter_config(self) -> dict[str, Any]:
        return {"normalization": self.adapter.normalization, "momentum": self.adapter.momentum}

    def loss_config(self) -> dict[str, Any]:
        loss = self.loss
        return {
            "num_candidates": loss.num_candidates,
            "symmetric": loss.symmetric,
            "learn_gamma": loss.learn_gamma,
            "distill": loss.distill,
            "label_smoothing": loss.label_smoothing,
            "rejection_weight": loss.rejection_weight,
            "norm_weight": loss.norm_weight,
        }

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """``(B, 3, H, W) -> (B, D)`` centred, scaled fp32 image embeddings."""
        return self.adapter(self.backbone.encode_image(pixel_values), "image")

    def encode_text(self, tokens: Tokens) -> Tensor:
        """Tokens ``-> (B, D)`` centred, scaled fp32 text embeddings."""
        return self.adapter(self.backbone.encode_text(tokens), "text")

    def tokenize(self, texts: list[str]) -> Tokens:
        return self.backbone.tokenize(texts)

    def forward(
        self,
        pixel_values: Tensor,
        tokens: Tokens,
        image_ids: Tensor | None = None,
        return_parts: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The paired HALO loss of a batch of ``B`` (image, caption) pairs."""
        return self.loss(self.encode_image(pixel_values), self.encode_text(tokens), image_ids, return_parts)

    @torch.no_grad()
    def calibrate(self, batches: Iterable[tuple[Tensor, Tokens]], max_samples: int = 1024) -> dict[str, float]:
        """Measure each modality's centre and RMS on training batches ``(pixel_values, tokens)``.

        Call once before training (and only then: the statistics are part of
        the model from then on).
        """
        images, texts, seen = [], [], 0
        was_training = self.training
        self.eval()
        try:
            for pixel_values, tokens in batches:
                images.append(self.backbone.encode_image(pixel_values).float())
                texts.append(self.backbone.encode_text(tokens).float())
                seen += images[-1].shape[0]
                if seen >= max_samples:
                    break
        finally:
            self.train(was_training)
        if not images:
            raise ValueError("calibrate needs at least one batch")
        return self.adapter.calibrate(torch.cat(images), torch.cat(texts))
