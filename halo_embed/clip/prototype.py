"""Prototype mode: HALO classification whose centroids are CLIP text embeddings of class prompts.

    classifier = PrototypeClassifier(haloclip, ["cat", "dog", "car"])
    out = classifier.predict(pixel_values)         # zero-shot, with abstention, before any training
    embeddings, centroids = classifier(pixel_values)
    loss, _ = classifier.loss(embeddings, labels, centroids)   # fine-tune on (image, label) data

The centroid of a class is the mean over prompt templates of the adapted text
embedding of "a photo of a {name}." (computed through the text tower, so it
fine-tunes with it unless the text tower is locked).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..inference import HALOHead, HALOPrediction
from ..losses import HALOLoss
from .model import HALOCLIP

__all__ = ["DEFAULT_TEMPLATES", "PrototypeClassifier"]

DEFAULT_TEMPLATES = ("a photo of a {}.",)


class PrototypeClassifier(nn.Module):
    """Zero-shot and fine-tunable HALO classification with CLIP text prototypes.

    Args:
        clip: a :class:`HALOCLIP` (its adapter calibrated).
        class_names: the ``K`` class names.
        templates: prompt templates with one ``{}``.
        label_smoothing: of the classification :class:`~halo_embed.HALOLoss`
            (also sets its abstain bias for ``K`` classes).

    The classification loss starts from the CLIP model's learned temperature.
    """

    def __init__(self, clip: HALOCLIP, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                 label_smoothing: float = 0.1) -> None:
        super().__init__()
        if not isinstance(clip, HALOCLIP):
            raise TypeError(f"clip must be a HALOCLIP, got {type(clip).__name__}")
        names = list(class_names)
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise ValueError(f"class_names must be non-empty strings, got {names!r}")
        if len(set(names)) != len(names):
            raise ValueError("class_names must be distinct")
        templates = list(templates)
        if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
            raise ValueError(f"templates must be strings with one '{{}}', got {templates!r}")
        self.clip = clip
        self.class_names = names
        self.templates = templates
        self._prompts = [t.format(n) for n in names for t in templates]
        self.loss = HALOLoss(clip.embed_dim, len(names), label_smoothing=label_smoothing)
        with torch.no_grad():
            self.loss.gamma.copy_(clip.loss.gamma)

    def centroids(self) -> Tensor:
        """``(K, D)`` class prototypes (mean over templates of the adapted text embeddings)."""
        tokens = self.clip.tokenize(self._prompts)
        device = next(self.clip.parameters()).device
        tokens = {k: v.to(device) for k, v in tokens.items()} if isinstance(tokens, dict) else tokens.to(device)
        text = self.clip.encode_text(tokens)
        return text.view(len(self.class_names), len(self.templates), -1).mean(dim=1)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """``(image embeddings (B, D), centroids (K, D))``, as :class:`~halo_embed.HALOModel` returns."""
        return self.clip.encode_image(pixel_values), self.centroids()

    def head(self) -> HALOHead:
        """The decision layer (centroids, gamma, abstain bias) for inference."""
        with torch.no_grad():
            return HALOHead(self.centroids(), self.loss.effective_gamma, self.loss.abstain_bias)

    @torch.no_grad()
    def predict(self, pixel_values: Tensor) -> HALOPrediction:
        """K+1 probabilities, predicted class or ABSTAIN (-1), and OOD scores."""
        return self.head().to(pixel_values.device)(self.clip.encode_image(pixel_values))
