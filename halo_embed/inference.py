"""Inference on a trained HALO classifier: K+1 probabilities, abstention, OOD scores.

    head = HALOHead.from_trained(model, loss)        # HALOModel + HALOLoss after training
    embeddings, _ = model(images)
    out = head(embeddings)
    out.probs          # (N, K+1), last column = "I don't know"
    out.labels         # (N,) predicted class, or ABSTAIN (-1) where the decision declines
    out.scores["not_abstain"]   # (N,) larger = more in-distribution

    head.calibrate(model(held_out_images)[0])   # the decision keeps 95 % of held-out ID inputs

The probabilities use the abstain bias the loss trained with (the reference's
constant); the decision (``labels``, ``abstained``) uses the head's
``decision_bias``, the reference's constant until :meth:`HALOHead.calibrate`
sets it on held-out data.

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
    "DECISION_RULES",
    "AbstentionCalibration",
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


#: How :meth:`HALOHead.calibrate` may decide. ``sink``: the origin's logit against every class logit (the
#: K+1 argmax) with a calibrated bias; ``sink+distance``: also decline inputs farther from their nearest
#: prototype than held-out ID inputs are (the sink compares distances to the origin and to the prototypes,
#: so an input far from both, e.g. noise of large norm, passes it).
DECISION_RULES = ("sink", "sink+distance")


@dataclass
class AbstentionCalibration:
    """The decision :meth:`HALOHead.calibrate` set, and how.

    Attributes:
        rule: one of :data:`DECISION_RULES`, or ``reference`` (the loss's constant; nothing calibrated).
        fitted_on: how the thresholds were chosen, in words.
        decision_bias: the sink's logit in the decision (shifted terms; the class wins at ``>=``).
        max_mean_sq_distance: ``|x - c|^2 / D`` to the nearest prototype above which an input is declined
            (``inf``: no distance limit).
        held_out_kept: share of the held-out ID inputs the decision keeps.
        held_out_ood_rejected: share of the held-out OOD inputs it declines (``None`` without OOD data).
        n_id, n_ood: held-out inputs used.
    """

    rule: str
    fitted_on: str
    decision_bias: float
    max_mean_sq_distance: float
    held_out_kept: float | None = None
    held_out_ood_rejected: float | None = None
    n_id: int = 0
    n_ood: int = 0

    def to_dict(self) -> dict:
        from dataclasses import asdict

        values = asdict(self)
        if values["max_mean_sq_distance"] == float("inf"):
            values["max_mean_sq_distance"] = None  # JSON has no inf
        return values


@dataclass
class HALOPrediction:
    """What :class:`HALOHead` returns for ``N`` embeddings.

    Attributes:
        probs: ``(N, K+1)`` softmax over the classes and the sink (last column).
        labels: ``(N,)`` long, the predicted class label, or :data:`ABSTAIN` where the decision declines.
        abstained: ``(N,)`` bool, the decision declines: the sink's decision bias beats every class logit
            (before :meth:`HALOHead.calibrate`: the sink has the largest probability), or the input is beyond
            the calibrated distance limit.
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
        abstain_bias: the loss's abstain bias (the probabilities' sink logit).
        class_labels: ``(K,)`` label of each centroid; default ``arange(K)``.

    The state (centroids, temperature, abstain bias, labels, the decision) is held in buffers and the
    module's extra state, so ``state_dict()`` saves everything needed to score and decide.
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
        self.register_buffer("decision_bias", torch.tensor(bias, dtype=torch.float64))
        self.register_buffer("max_mean_sq_distance", torch.tensor(float("inf"), dtype=torch.float64))
        self.calibration = AbstentionCalibration("reference", "the loss's constant abstain bias", bias, float("inf"))

    def get_extra_state(self) -> dict:
        return self.calibration.to_dict()

    def set_extra_state(self, state: dict) -> None:
        limit = state.get("max_mean_sq_distance")
        self.calibration = AbstentionCalibration(**{**state, "max_mean_sq_distance":
                                                    float("inf") if limit is None else float(limit)})

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a head saved before the decision was calibratable decides with its abstain bias, as it did
        if prefix + "decision_bias" not in state_dict and prefix + "abstain_bias" in state_dict:
            state_dict[prefix + "decision_bias"] = state_dict[prefix + "abstain_bias"].double()
            state_dict.setdefault(prefix + "max_mean_sq_distance", torch.tensor(float("inf"), dtype=torch.float64))
            state_dict.setdefault(prefix + "_extra_state", self.get_extra_state())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_trained(cls, model: nn.Module, loss: nn.Module) -> "HALOHead":
        """Build from a trained :class:`~halo_embed.HALOModel` and :class:`~halo_embed.HALOLoss`."""
        from .losses import HALOLoss
        from .classifier import HALOModel

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
        """False when no embedding can make the decision decline (the temperature is too low for the decision
        bias and no distance limit is set; see :func:`~halo_embed.geometry.abstention_possible`)."""
        if torch.isfinite(self.max_mean_sq_distance):
            return True
        return geometry.abstention_possible(self.centroids, self.temperature, self.decision_bias)

    @torch.no_grad()
    def calibrate(self, embeddings: Tensor, keep: float = 0.95, ood_embeddings: Tensor | None = None,
                  rule: str = "sink") -> AbstentionCalibration:
        """Set the decision on held-out data the model never trained on (in place); returns what was set.

        Without ``ood_embeddings`` the thresholds keep ``keep`` of the held-out ID inputs (the operating
        point of FPR@95 tables); with them, they give the best balanced accuracy between the two sets. The
        probabilities keep the loss's abstain bias: only ``labels`` / ``abstained`` change.

        Args:
            embeddings: ``(N, D)`` held-out in-distribution embeddings.
            keep: share of them to keep, in ``(0, 1]``.
            ood_embeddings: ``(M, D)`` held-out OOD embeddings, optional.
            rule: one of :data:`DECISION_RULES`.

        Raises:
            TypeError / ValueError: embeddings as in :meth:`forward`; ``keep`` outside ``(0, 1]``; an
            unknown ``rule``.
        """
        from .eval.selective import keep_threshold

        if rule not in DECISION_RULES:
            raise ValueError(f"rule must be one of {DECISION_RULES}, got {rule!r}")
        known = self._shifted(embeddings)
        sink, near = self._decision_scores(*known)
        keep_threshold(sink, keep)  # validates keep before anything changes
        if ood_embeddings is None:
            bias, limit = _keep_thresholds(sink, near if rule == "sink+distance" else None, keep)
            fitted_on = f"keep {keep:.1%} of {len(sink)} held-out ID inputs"
            ood = None
        else:
            ood = self._shifted(ood_embeddings)
            bias, limit = _separating_thresholds((sink, near), self._decision_scores(*ood), rule == "sink+distance")
            fitted_on = f"best balanced accuracy on {len(sink)} held-out ID and {len(ood[0])} OOD inputs"
        self.decision_bias.fill_(bias)
        self.max_mean_sq_distance.fill_(limit)
        declined = lambda logits: float(geometry.classifier_abstains(  # noqa: E731  (the decision as applied)
            *logits, self.temperature.double(), self.decision_bias, self.max_mean_sq_distance).double().mean())
        self.calibration = AbstentionCalibration(
            rule, fitted_on, bias, limit, 1.0 - declined(known), None if ood is None else declined(ood), len(sink),
            0 if ood is None else len(ood[0]))
        return self.calibration

    def _decision_scores(self, shifted: Tensor, true: Tensor) -> tuple[Tensor, Tensor]:
        """``(N,)`` float64 sink margin ``max_k shifted`` and ``-min_k |x - c_k|^2 / D`` of each row of the
        :meth:`_shifted` logits."""
        return shifted.max(dim=-1).values, true.max(dim=-1).values / self.temperature.double()

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
        abstained = geometry.classifier_abstains(shifted, true, self.temperature.double(), self.decision_bias,
                                                 self.max_mean_sq_distance)
        labels = torch.where(abstained, ABSTAIN, self.class_labels[shifted.argmax(dim=-1)])
        scores = halo_ood_scores(probs, true, self.temperature.double())
        limit = torch.finfo(torch.float32).max  # float32 outputs, as before; beyond its range they saturate
        scores = {name: value.clamp(-limit, limit).float() for name, value in scores.items()}
        return HALOPrediction(probs=probs.float(), labels=labels, abstained=abstained, scores=scores,
                              logits=logits.clamp(-limit, limit).float())


def _keep_thresholds(sink: Tensor, near: Tensor | None, keep: float) -> tuple[float, float]:
    """``(decision_bias, max_mean_sq_distance)`` keeping ``keep`` of the held-out ID inputs: the sink alone,
    or (``near`` given) a distance limit that keeps all but a fifth of the rejected share (99 % for
    ``keep`` = 95 %: only inputs beyond the held-out ones' range) and the sink lowered until together they
    keep ``keep``."""
    from .eval.selective import keep_threshold

    if near is None:
        return keep_threshold(sink, keep), float("inf")
    limit = keep_threshold(near, 1.0 - (1.0 - keep) / 5.0)
    inside = near >= limit
    kept = lambda q: ((sink >= keep_threshold(sink, q)) & inside).double().mean()  # noqa: E731
    low, high = keep, 1.0
    for _ in range(40):
        middle = 0.5 * (low + high)
        low, high = (low, middle) if kept(middle) >= keep else (middle, high)
    return keep_threshold(sink, high), -limit


def _separating_thresholds(known: tuple[Tensor, Tensor], ood: tuple[Tensor, Tensor],
                           with_distance: bool) -> tuple[float, float]:
    """``(decision_bias, max_mean_sq_distance)`` with the best balanced accuracy between held-out ID and OOD
    inputs; with the distance, over a grid of both limits at the ID quantiles 0-50 %."""
    from .eval.metrics import best_threshold

    if not with_distance:
        return best_threshold(known[0], ood[0])[0], float("inf")
    grid = torch.linspace(0.0, 0.5, 51, dtype=torch.float64)
    sink_limits = torch.quantile(known[0], grid).tolist() + [known[0].min().item() - 1.0]
    near_limits = torch.quantile(known[1], grid).tolist() + [known[1].min().item() - 1.0]
    best, choice = -1.0, (sink_limits[-1], near_limits[-1])
    for b in sink_limits:
        for t in near_limits:
            kept = ((known[0] >= b) & (known[1] >= t)).double().mean()
            caught = 1.0 - ((ood[0] >= b) & (ood[1] >= t)).double().mean()
            if 0.5 * (kept + caught) > best:
                best, choice = float(0.5 * (kept + caught)), (b, t)
    return choice[0], -choice[1]
