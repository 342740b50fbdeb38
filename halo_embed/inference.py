"""Inference on a trained HALO classifier: K+1 probabilities, abstention, OOD scores.

    head = HALOHead.from_trained(model, loss)        # HALOModel + HALOLoss after training
    embeddings, _ = model(images)
    out = head(embeddings)
    out.probs          # (N, K+1), last column = "I don't know"
    out.labels         # (N,) predicted class, or ABSTAIN (-1) where the sink wins
    out.scores["not_abstain"]   # (N,) larger = more in-distribution

Every quantity comes from :mod:`halo_embed.geometry`, the same functions the
loss trains with, so what the loss optimised is what the head reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import geometry
from ._validation import check_float, check_temperature, check_tensor, raise_if_any

__all__ = [
    "ABSTAIN",
    "HALO_SCORE_DESCRIPTIONS",
    "SOFTMAX_SCORE_DESCRIPTIONS",
    "HALOHead",
    "HALOPrediction",
    "halo_ood_scores",
    "softmax_ood_scores",
]

#: Label returned for inputs the model abstains on.
ABSTAIN = -1

#: OOD / rejection scores, every one larger for in-distribution inputs.
HALO_SCORE_DESCRIPTIONS = {
    "not_abstain": "1 - p(abstain): one minus the sink's probability in the K+1 softmax",
    "msp": "maximum class probability in the K+1 softmax (the sink's mass counts against it)",
    "neg_distance": "minus the mean-square distance |x - c|^2 / D to the nearest centroid",
    "energy": "logsumexp of the K true logits -g|x - c|^2 / D (negative free energy)",
}


#: The usual scores of a cross-entropy (dot-product) classifier, for baselines.
SOFTMAX_SCORE_DESCRIPTIONS = {
    "msp": "maximum softmax probability (Hendrycks & Gimpel, 2017)",
    "max_logit": "largest logit (Hendrycks et al., 2022)",
    "energy": "logsumexp of the logits, the negative free energy (Liu et al., 2020)",
}


def softmax_ood_scores(logits: Tensor) -> dict[str, Tensor]:
    """:data:`SOFTMAX_SCORE_DESCRIPTIONS` of a standard classifier's ``(N, K)`` logits."""
    logits = logits.float()
    return {
        "msp": torch.softmax(logits, dim=-1).max(dim=-1).values,
        "max_logit": logits.max(dim=-1).values,
        "energy": torch.logsumexp(logits, dim=-1),
    }


def halo_ood_scores(probs: Tensor, true: Tensor, temperature: Tensor) -> dict[str, Tensor]:
    """All :data:`HALO_SCORE_DESCRIPTIONS` from the ``(N, K+1)`` probabilities and ``(N, K)`` true logits."""
    return {
        "not_abstain": 1.0 - probs[:, -1],
        "msp": probs[:, :-1].max(dim=-1).values,
        "neg_distance": true.max(dim=-1).values / temperature,
        "energy": torch.logsumexp(true, dim=-1),
    }


@dataclass
class HALOPrediction:
    """What :class:`HALOHead` returns for ``N`` embeddings.

    Attributes:
        probs: ``(N, K+1)`` softmax over the classes and the sink (last column).
        labels: ``(N,)`` long, the predicted class label, or :data:`ABSTAIN`.
        abstained: ``(N,)`` bool, the sink has the largest probability.
        scores: name -> ``(N,)`` OOD score, larger = more in-distribution
            (see :data:`HALO_SCORE_DESCRIPTIONS`).
        logits: ``(N, K+1)`` shifted logits (last column = abstain bias).
    """

    probs: Tensor
    labels: Tensor
    abstained: Tensor
    scores: dict[str, Tensor] = field(default_factory=dict)
    logits: Tensor | None = None


class HALOHead(nn.Module):
    """A trained HALO classifier's decision layer, detached from the training code.

    Args:
        centroids: ``(K, D)`` centroids, already centred as during training.
        temperature: the effective temperature (``HALOLoss.temperature`` =
            ``softplus(HALOLoss.gamma)``, > 0).
        abstain_bias: the loss's abstain bias.
        class_labels: ``(K,)`` label of each centroid; default ``arange(K)``.

    The state (centroids, temperature, abstain bias, labels) is held in buffers, so
    ``state_dict()`` saves everything needed to score.
    """

    def __init__(
        self,
        centroids: Tensor,
        temperature: float | Tensor,
        abstain_bias: float | Tensor,
        class_labels: Tensor | None = None,
    ) -> None:
        super().__init__()
        check_tensor("centroids", centroids, ndim=2, floating=True, min_rows=1)
        raise_if_any([(~torch.isfinite(centroids).all(), "centroids contains NaN or inf values")])
        value = check_temperature("temperature", temperature)
        bias = check_float("abstain_bias", abstain_bias)
        k = centroids.shape[0]
        if class_labels is None:
            class_labels = torch.arange(k)
        check_tensor("class_labels", class_labels, ndim=1, integer=True)
        if class_labels.shape[0] != k:
            raise ValueError(f"class_labels must have shape ({k},), got {tuple(class_labels.shape)}")
        self.register_buffer("centroids", centroids.detach().float().clone())
        self.register_buffer("temperature", torch.tensor([value], dtype=torch.float32))
        self.register_buffer("abstain_bias", torch.tensor(bias, dtype=torch.float32))
        self.register_buffer("class_labels", class_labels.detach().long().clone())

    @classmethod
    def from_trained(cls, model: nn.Module, loss: nn.Module) -> "HALOHead":
        """Build from a trained :class:`~halo_embed.HALOModel` and :class:`~halo_embed.HALOLoss`."""
        from .losses import HALOLoss
        from .models import HALOModel

        if not isinstance(model, HALOModel):
            raise TypeError(f"model must be a HALOModel, got {type(model).__name__}")
        if not isinstance(loss, HALOLoss):
            raise TypeError(f"loss must be a HALOLoss, got {type(loss).__name__}")
        if (model.num_classes, model.embed_dim) != (loss.num_classes, loss.embed_dim):
            raise ValueError(
                f"model has (K, D) = ({model.num_classes}, {model.embed_dim}) but loss has "
                f"({loss.num_classes}, {loss.embed_dim})"
            )
        with torch.no_grad():
            return cls(model.centered_centroids(), loss.temperature, loss.abstain_bias)

    @property
    def can_abstain(self) -> bool:
        """False when no embedding can make the sink win (the temperature is too low for the abstain bias;
        see :func:`~halo_embed.geometry.abstention_possible`)."""
        return geometry.abstention_possible(self.centroids, self.temperature, self.abstain_bias)

    @property
    def num_classes(self) -> int:
        return self.centroids.shape[0]

    @property
    def embed_dim(self) -> int:
        return self.centroids.shape[1]

    def _check_embeddings(self, embeddings: Tensor) -> Tensor:
        check_tensor("embeddings", embeddings, ndim=2, floating=True, min_rows=1)
        if embeddings.shape[1] != self.embed_dim:
            raise ValueError(
                f"embeddings has D={embeddings.shape[1]} dimensions, the head expects {self.embed_dim}"
            )
        raise_if_any([(~torch.isfinite(embeddings).all(), "embeddings contains NaN or inf values")])
        return embeddings.to(device=self.centroids.device)

    def _shifted(self, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        """``(shifted, true)`` logits in float64, finite for every finite input (float32 products of large
        embeddings would overflow into inf - inf = NaN)."""
        embeddings = self._check_embeddings(embeddings)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return geometry.finite_shifted_and_true_logits(embeddings, self.centroids, self.temperature)

    def logits(self, embeddings: Tensor) -> Tensor:
        """``(N, D) -> (N, K+1)`` shifted logits (float32, saturating at its range), the last column is the
        abstain bias."""
        shifted = self._shifted(embeddings)[0]
        limit = torch.finfo(torch.float32).max
        return geometry.with_abstain(shifted.clamp(-limit, limit).float(), self.abstain_bias)

    @torch.no_grad()
    def forward(self, embeddings: Tensor) -> HALOPrediction:
        """Probabilities over the ``K`` classes + abstain, predictions and OOD scores.

        Args:
            embeddings: ``(N, D)`` from the trained backbone.

        Returns:
            :class:`HALOPrediction`.

        Raises:
            TypeError / ValueError: not a 2-D float tensor, wrong ``D``, empty,
            non-finite values.
        """
        shifted, true = self._shifted(embeddings)
        logits = geometry.with_abstain(shifted, self.abstain_bias.double())
        probs = torch.softmax(logits, dim=-1)  # float64: a saturated row is one-hot, never NaN
        abstained = geometry.abstain_mask(shifted, self.abstain_bias.double())
        labels = torch.where(abstained, ABSTAIN, self.class_labels[shifted.argmax(dim=-1)])
        scores = halo_ood_scores(probs, true, self.temperature.double())
        limit = torch.finfo(torch.float32).max  # float32 outputs, as before; beyond its range they saturate
        scores = {name: value.clamp(-limit, limit).float() for name, value in scores.items()}
        return HALOPrediction(probs=probs.float(), labels=labels, abstained=abstained, scores=scores,
                              logits=logits.clamp(-limit, limit).float())
