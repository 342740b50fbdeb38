"""Prototype mode: HALO classification whose centroids are CLIP text embeddings of class prompts.

    classifier = PrototypeClassifier(haloclip, ["cat", "dog", "car"])
    out = classifier.predict(pixel_values)         # zero-shot, with abstention, before any training
    embeddings, centroids = classifier(pixel_values)
    loss, _ = classifier.loss(embeddings, labels, centroids)   # fine-tune on (image, label) data

The centroid of a class is the mean over prompt templates of the adapted text
embedding of "a photo of a {name}." (computed through the text tower, so it
fine-tunes with it unless the text tower is locked; with a locked tower,
``frozen_text=True`` computes the prompts' features once instead of on every
call).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .._validation import check_bool
from ..inference import HALOHead, HALOPrediction
from ..losses import HALOLoss
from .backbones import move_tokens
from .model import HALOCLIP

__all__ = ["DEFAULT_TEMPLATES", "PrototypeClassifier"]

DEFAULT_TEMPLATES = ("a photo of a {}.",)


class PrototypeClassifier(nn.Module):
    """Zero-shot and fine-tunable HALO classification with CLIP text prototypes.

    Args:
        clip: a :class:`HALOCLIP` (its adapter's statistics measured).
        class_names: the ``K`` class names.
        templates: prompt templates with one ``{}``.
        label_smoothing: of the classification :class:`~halo_embed.HALOLoss`
            (also sets its abstain bias for ``K`` classes).
        init_gamma: the classification loss's starting temperature; ``None``
            (default) starts from the CLIP model's learned temperature.
        frozen_text: the text tower is not trained (e.g. a locked pretrained
            sentence encoder): the prompts' backbone features are computed
            once (in evaluation mode, without gradients; again only after a
            move to another device) and only the adapter is applied on each
            call. Raises ``ValueError`` on first use if the tower has
            trainable parameters.

    With the adapter's ``normalization="running"``, training through this
    classifier normalises the prompts with their own statistics and moves the
    text running statistics towards them: the prototypes are the text the
    model is trained on.

    Raises:
        TypeError / ValueError: on invalid arguments, naming the argument.
    """

    def __init__(self, clip: HALOCLIP, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                 label_smoothing: float = 0.1, init_gamma: float | None = None, frozen_text: bool = False) -> None:
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
        self.loss = HALOLoss(clip.embed_dim, len(names), label_smoothing=label_smoothing, init_gamma=init_gamma)
        if init_gamma is None:
            with torch.no_grad():
                self.loss.gamma.copy_(clip.loss.gamma)
        self.frozen_text = check_bool("frozen_text", frozen_text)
        self._prompt_cache: Tensor | None = None

    def _prompt_features(self) -> Tensor:
        """``(K * templates, D)`` backbone features of the prompts (before the adapter)."""
        device = next(self.clip.parameters()).device
        if self._prompt_cache is not None and self._prompt_cache.device == device:
            return self._prompt_cache
        tokens = self.clip.tokenize(self._prompts)
        tokens = move_tokens(tokens, device)
        backbone = self.clip.backbone
        if not self.frozen_text:
            return backbone.encode_text(tokens)
        # computed once, so in evaluation mode: a training-mode dropout sample would be frozen into every
        # later call; a trainable tower shows itself by a result that requires grad
        was_training = backbone.training
        backbone.eval()
        try:
            with torch.enable_grad():
                features = backbone.encode_text(tokens)
        finally:
            backbone.train(was_training)
        if features.requires_grad:
            raise ValueError("frozen_text=True, but the text tower has trainable parameters: lock it "
                             "(backbone.lock_text()) or pass frozen_text=False")
        self._prompt_cache = features.float()
        return self._prompt_cache

    def centroids(self) -> Tensor:
        """``(K, D)`` class prototypes (mean over templates of the adapted text embeddings)."""
        text = self.clip.adapter(self._prompt_features(), "text")
        return text.view(len(self.class_names), len(self.templates), -1).mean(dim=1)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """``(image embeddings (B, D), centroids (K, D))``, as :class:`~halo_embed.HALOModel` returns."""
        return self.clip.encode_image(pixel_values), self.centroids()

    def head(self) -> HALOHead:
        """The decision layer (centroids, temperature, abstain bias) for inference."""
        with torch.no_grad():
            return HALOHead(self.centroids(), self.loss.temperature, self.loss.abstain_bias)

    @torch.no_grad()
    def predict(self, pixel_values: Tensor) -> HALOPrediction:
        """K+1 probabilities, predicted class or ABSTAIN (-1), and OOD scores."""
        return self.head().to(pixel_values.device)(self.clip.encode_image(pixel_values))
