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
from .decision import PairDecision, fit_pair_decision

__all__ = ["HALOCLIP"]


class HALOCLIP(nn.Module):
    """CLIP trained and scored with HALO.

    Args:
        backbone: an :class:`~halo_embed.clip.backbones.CLIPBackbone`.
        num_candidates: the global training batch size (sets the abstain bias,
            see :class:`~halo_embed.losses.PairedHALOLoss`).
        normalization / momentum: the feature adapter's statistics, ``"fixed"``
            (measured once by :meth:`fit_adapter`) or ``"running"`` (batch
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
        #: the accept / reject rule fitted on held-out pairs (:meth:`fit_decision`); ``None``: the constant rule
        self.fitted_decision: PairDecision | None = None

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    @property
    def temperature(self) -> Tensor:
        """The effective temperature ``softplus(loss.gamma)``."""
        return self.loss.temperature

    @property
    def abstain_bias(self) -> float:
        """The sink's logit in training (fixed at construction; the decision's bias is :attr:`decision`'s)."""
        return self.loss.abstain_bias

    @property
    def decision(self) -> PairDecision:
        """The accept / reject rule every scorer and evaluation uses: the one fitted on held-out pairs
        (:meth:`fit_decision`), else the constant rule (the training temperature and abstain bias)."""
        if self.fitted_decision is not None:
            return self.fitted_decision
        return PairDecision(float(self.temperature.detach()), float(self.loss.abstain_bias), "constant")

    @torch.no_grad()
    def fit_decision(self, image_embeddings: Tensor, aligned_texts: Tensor, mismatched_texts: Tensor,
                     fit_temperature: bool = True, source: str = "") -> PairDecision:
        """Fit :attr:`decision` on held-out pairs: ``(N, D)`` adapted embeddings of images, of their own
        captions and of another image's captions (see :func:`~halo_embed.clip.decision.fit_pair_decision`;
        ``fit_temperature=False`` keeps the model's temperature and fits the bias alone).

        Pairs that do not separate (aligned no nearer than mismatched: a model that has not learnt the task)
        admit no positive pair temperature; the bias is then fitted alone at the model's temperature, with a
        warning and a note in ``fitted_on``, rather than losing the run that asked for it."""
        import warnings

        from .. import geometry

        aligned = geometry.pair_mean_square(image_embeddings, aligned_texts)
        mismatched = geometry.pair_mean_square(image_embeddings, mismatched_texts)
        temperature = float(self.temperature.detach())
        try:
            decision = fit_pair_decision(aligned, mismatched, None if fit_temperature else temperature, source)
        except ValueError as error:
            if not (fit_temperature and "do not separate" in str(error)):
                raise
            warnings.warn(f"{error}; fitting the sink's bias alone at the model's temperature", stacklevel=2)
            decision = fit_pair_decision(aligned, mismatched, temperature, source)
            decision.fitted_on["note"] = str(error)
        self.fitted_decision = decision
        return decision

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
            "init_gamma": loss.init_gamma,
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
    def fit_adapter(self, batches: Iterable[tuple[Tensor, Tokens]], max_samples: int = 1024) -> dict[str, float]:
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
            raise ValueError("fit_adapter needs at least one batch")
        return self.adapter.fit(torch.cat(images), torch.cat(texts))
