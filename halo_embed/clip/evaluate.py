"""Evaluate an image-text model: retrieval both ways, and rejection of mismatched pairs.

The same protocol for HALO and for the contrastive baselines, through a *view*
that says how a model embeds and scores a pair:

- :class:`HALOView`: adapted embeddings, L2 retrieval (HALO's logit ranking),
  pair score = the caption's HALO logit for the image on the unit shell,
  built-in decision = score >= the sink's bias, ``p(aligned)`` its sigmoid:
  the model's :class:`~halo_embed.clip.decision.PairDecision` (the rule of
  :class:`~halo_embed.clip.AlignmentScorer`).
- :class:`CosineView`: L2-normalised embeddings, cosine retrieval and score
  (CLIP); with a logit bias (SigLIP) also its built-in decision
  ``scale * cos + bias >= 0``.

Rejection sets: each evaluation image with its own caption (aligned) against
the same image with another image's caption (shuffled), with its caption with
one attribute changed (hard negatives, when the data define them) and
out-of-distribution images with any caption. Thresholds: every pair set is
split by position into a *tune* half (even) and a *report* half (odd); a tuned
threshold is chosen on the tune half and every accuracy is measured on the
report half (balanced accuracy: mean of aligned accepted and mismatched rejected).

With *calibration pairs* (held-out images never trained on, each with its own
and another image's caption), the evaluation also reports what a user
would do without HALO's decision, chosen on those pairs and measured on the
report half: the best threshold on the pair score, Platt scaling of the score
(a logistic fit of the label, decision at ``p = 0.5``), and, when given, a
fixed threshold carried over from another data set; and the calibration
(ECE, Brier score) of the built-in ``p(aligned)`` and of the Platt-scaled score.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .. import geometry
from ..eval import (balanced_accuracy, best_threshold, binary_calibration, ood_metrics, retrieval_recall,
                    threshold_accuracy)
from .backbones import move_tokens
from .decision import PairDecision

__all__ = ["AlignmentEvalData", "CosineView", "HALOView", "build_eval_data", "calibration_scores", "embed_images",
           "embed_texts", "evaluate_alignment", "view_of"]


class HALOView:
    """How a :class:`~halo_embed.clip.HALOCLIP` embeds and scores pairs."""

    metric = "l2"

    def __init__(self, model) -> None:
        self.model = model
        self.backbone = model.backbone

    def encode_images(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)

    def encode_texts(self, tokens: Any) -> Tensor:
        return self.model.encode_text(tokens)

    def pair_scores(self, images: Tensor, texts: Tensor) -> Tensor:
        return self.model.decision.judge_pairs(images, texts)[0]

    def builtin_threshold(self) -> float | None:
        """Accept a pair when its score is at least this (the decision's bias)."""
        return self.model.decision.bias

    def accepts(self, scores: np.ndarray) -> np.ndarray:
        """The built-in decision on pair scores (:func:`~halo_embed.geometry.pair_accepts`)."""
        return geometry.pair_accepts(torch.as_tensor(np.asarray(scores, dtype=np.float64)),
                                     self.model.decision.bias).numpy()

    def pair_probability(self, scores: np.ndarray) -> np.ndarray | None:
        """The built-in ``p(aligned)`` of pair scores."""
        logits = torch.as_tensor(np.asarray(scores, dtype=np.float64))
        return geometry.pair_probability(logits, self.model.decision.bias).numpy()

    def constant_threshold(self) -> float | None:
        """Where the fitted decision replaced HALO's constant one: the constant rule as a threshold on these
        scores (``g (1 - m) >= b`` with the training temperature ``g``, scores at the fitted ``g'``)."""
        if self.model.fitted_decision is None:
            return None
        constant = PairDecision(float(self.model.temperature.detach()), float(self.model.abstain_bias))
        return constant.bias * self.model.decision.temperature / constant.temperature


class CosineView:
    """How a contrastive CLIP (or SigLIP, with ``logit_bias``) embeds and scores pairs."""

    metric = "cosine"

    def __init__(self, backbone, logit_scale: Tensor | None = None, logit_bias: Tensor | None = None) -> None:
        self.backbone = backbone
        self.logit_scale, self.logit_bias = logit_scale, logit_bias

    def encode_images(self, pixels: Tensor) -> Tensor:
        return torch.nn.functional.normalize(self.backbone.encode_image(pixels).float(), dim=-1)

    def encode_texts(self, tokens: Any) -> Tensor:
        return torch.nn.functional.normalize(self.backbone.encode_text(tokens).float(), dim=-1)

    def pair_scores(self, images: Tensor, texts: Tensor) -> Tensor:
        return (images * texts).sum(-1)

    def builtin_threshold(self) -> float | None:
        if self.logit_bias is None or self.logit_scale is None:
            return None  # CLIP has no decision rule: a threshold must be tuned
        # sigmoid(scale * cos + bias) >= 0.5  <=>  cos >= -bias / scale
        return float(-self.logit_bias.detach() / self.logit_scale.detach().exp())

    def accepts(self, scores: np.ndarray) -> np.ndarray:
        """SigLIP's decision ``sigmoid(scale * cos + bias) >= 0.5`` (CLIP has none: not called)."""
        return np.asarray(scores, dtype=np.float64) >= self.builtin_threshold()

    def pair_probability(self, scores: np.ndarray) -> np.ndarray | None:
        """SigLIP's ``sigmoid(scale * cos + bias)``; ``None`` for CLIP (no probability of a pair)."""
        if self.logit_bias is None or self.logit_scale is None:
            return None
        scale, bias = float(self.logit_scale.detach().exp()), float(self.logit_bias.detach())
        return 1.0 / (1.0 + np.exp(-(scale * scores + bias)))


def view_of(model) -> HALOView | CosineView:
    """The view of a :class:`~halo_embed.clip.HALOCLIP` or a :class:`~halo_embed.clip.ContrastiveCLIP`."""
    from .contrastive import ContrastiveCLIP
    from .model import HALOCLIP

    if isinstance(model, HALOCLIP):
        return HALOView(model)
    if isinstance(model, ContrastiveCLIP):
        return CosineView(model.backbone, model.logit_scale, model.logit_bias if model.loss_name == "siglip" else None)
    raise TypeError(f"model must be a HALOCLIP or a ContrastiveCLIP, got {type(model).__name__}")


@dataclass
class AlignmentEvalData:
    """Everything the evaluation embeds, de-duplicated.

    Attributes:
        images: unique evaluation images (PIL); ``image_groups`` their positive groups.
        texts: unique captions; ``text_groups`` the group each describes
            (``-1`` for hard-negative captions, which describe no image).
        retrieval_texts: indices into ``texts`` used as the retrieval gallery.
        pair_sets: name -> ``(image refs, text indices)`` where an image ref is
            ``("eval", i)`` or ``(ood set name, i)``.
        ood_images: name -> list of PIL images.
    """

    images: list[Any]
    image_groups: Tensor
    texts: list[str]
    text_groups: Tensor
    retrieval_texts: list[int]
    pair_sets: dict[str, tuple[list[tuple[str, int]], list[int]]]
    ood_images: dict[str, list[Any]] = field(default_factory=dict)


def build_eval_data(
    source: Any,
    max_images: int = 500,
    seed: int = 0,
    ood: dict[str, Any] | None = None,
    hard_negative: Callable[[int, random.Random], str | None] | None = None,
) -> AlignmentEvalData:
    """Evaluation sets from a pair source (see :mod:`halo_embed.data.pairs`).

    Args:
        source: evaluation pairs ``(image, caption, group)``; an optional
            ``image_key(i)`` method identifies images shared by several pairs
            (default: the group).
        max_images: at most this many unique images (a seeded random subset).
        ood: name -> indexable of OOD images (e.g. :class:`ImageCollection`);
            up to ``max_images`` of each are paired with random captions.
        hard_negative: ``(pair index, rng) -> caption`` with one attribute changed
            (e.g. :meth:`ShapesDataset.hard_negative`).
    """
    rng = random.Random(seed)
    order = list(range(len(source)))
    rng.shuffle(order)
    key_of = getattr(source, "image_key", None)
    first_pair: dict[Any, int] = {}
    for index in order:
        key = key_of(index) if key_of else source.text_and_group(index)[1]
        if key not in first_pair:
            first_pair[key] = index
            if len(first_pair) >= max_images:
                break
    chosen = list(first_pair.values())
    images, image_groups, captions = [], [], []
    for index in chosen:
        image, caption, group = source[index]
        images.append(image)
        image_groups.append(int(group))
        captions.append(caption)
    groups = set(image_groups)
    # every caption of the chosen groups is in the retrieval gallery
    all_captions = [(c, int(g)) for c, g in map(source.text_and_group, range(len(source))) if int(g) in groups]
    texts: list[str] = []
    text_groups: list[int] = []
    text_index: dict[tuple[str, int], int] = {}

    def text_id(caption: str, group: int) -> int:
        key = (caption, group)
        if key not in text_index:
            text_index[key] = len(texts)
            texts.append(caption)
            text_groups.append(group)
        return text_index[key]

    for caption, group in all_captions:
        text_id(caption, group)
    retrieval_texts = list(range(len(texts)))
    aligned = [text_id(c, g) for c, g in zip(captions, image_groups)]
    eval_refs = [("eval", i) for i in range(len(chosen))]
    pair_sets = {"aligned": (eval_refs, aligned)}
    shuffled = []
    for i, group in enumerate(image_groups):
        others = [j for j in range(len(chosen)) if image_groups[j] != group]
        if not others:
            raise ValueError("the evaluation data need images of at least two groups to build mismatched pairs")
        j = rng.choice(others)
        shuffled.append(aligned[j])
    pair_sets["shuffled"] = (eval_refs, shuffled)
    if hard_negative is not None:
        hard = [hard_negative(index, rng) for index in chosen]
        keep = [i for i, caption in enumerate(hard) if caption]
        pair_sets["hard negatives"] = ([eval_refs[i] for i in keep], [text_id(hard[i], -1) for i in keep])
    ood_images = {}
    for name, collection in (ood or {}).items():
        count = min(len(collection), max_images)
        ood_images[name] = [collection[i] for i in range(count)]
        pair_sets[f"OOD: {name}"] = ([(name, i) for i in range(count)], [rng.choice(aligned) for _ in range(count)])
    return AlignmentEvalData(
        images, torch.tensor(image_groups), texts, torch.tensor(text_groups), retrieval_texts, pair_sets, ood_images
    )


class _ImageItems(torch.utils.data.Dataset):
    """PIL images or image paths (decoded in the loader's workers), transformed for the model."""

    def __init__(self, images: Sequence[Any], transform: Callable) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        from ..data.images import load_image

        image = self.images[index]
        return self.transform(image.convert("RGB") if hasattr(image, "convert") else load_image(image))


@torch.no_grad()
def embed_images(view, images: Sequence[Any], transform: Callable, device, batch_size: int,
                  workers: int = 0) -> Tensor:
    """``(N, D)`` embeddings of PIL images or image paths, in order (the view's adapted space)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(_ImageItems(images, transform), batch_size=batch_size, num_workers=workers)
    return torch.cat([view.encode_images(pixels.to(device)).float().cpu() for pixels in loader])


@torch.no_grad()
def embed_texts(view, texts: Sequence[str], device, batch_size: int) -> Tensor:
    """``(N, D)`` embeddings of captions, in order (the view's adapted space: HALO's, or CLIP's normalised)."""
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = view.backbone.tokenize(list(texts[start : start + batch_size]))
        tokens = move_tokens(tokens, device)
        out.append(view.encode_texts(tokens).float().cpu())
    return torch.cat(out)


def calibration_scores(view, data: AlignmentEvalData, device: str | torch.device = "cpu",
                       batch_size: int = 128) -> dict[str, Any]:
    """The adapted embeddings of calibration pairs (:func:`build_eval_data` of held-out images: the
    ``aligned`` and ``shuffled`` sets) and their pair scores: ``images``, ``aligned_texts``,
    ``mismatched_texts`` ``(N, D)``; ``aligned``, ``mismatched`` ``(N,)`` numpy scores."""
    transform = view.backbone.image_transform(train=False)
    image_emb = embed_images(view, data.images, transform, device, batch_size)
    text_emb = embed_texts(view, data.texts, device, batch_size)
    out: dict[str, Any] = {"images": image_emb}
    for name, key in (("aligned", "aligned"), ("shuffled", "mismatched")):
        refs, text_ids = data.pair_sets[name]
        if any(source != "eval" for source, _ in refs):
            raise ValueError("calibration pairs must come from the calibration images only")
        texts = text_emb[text_ids]
        out[f"{key}_texts"] = texts
        out[key] = view.pair_scores(image_emb[[i for _, i in refs]], texts).numpy()
    return out


def _user_rules(calibration: dict[str, Any] | None, carried_threshold: float | None) -> dict[str, Any]:
    """What a user would do with the calibration pairs instead of a built-in decision: the best threshold on
    them and Platt scaling of the score (``(a, b)`` of ``sigmoid(a s + b)``)."""
    rules: dict[str, Any] = {}
    if calibration is not None:
        from .decision import platt_scale

        aligned, mismatched = calibration["aligned"], calibration["mismatched"]
        rules["calibration_threshold"], _ = best_threshold(aligned, mismatched)
        rules["platt"] = platt_scale(torch.from_numpy(aligned), torch.from_numpy(mismatched))
    if carried_threshold is not None:
        rules["carried_threshold"] = float(carried_threshold)
    return rules


def evaluate_alignment(view, data: AlignmentEvalData, device: str | torch.device = "cpu",
                       batch_size: int = 128, calibration: dict[str, Any] | None = None,
                       carried_threshold: float | None = None) -> dict[str, Any]:
    """Retrieval and rejection metrics of one model on :class:`AlignmentEvalData`.

    Args:
        view: :func:`view_of` a model.
        data: the evaluation sets.
        calibration: :func:`calibration_scores` of held-out calibration pairs
            (optional): adds the thresholds a user would choose on them.
        carried_threshold: optional fixed threshold on the pair score (e.g.
            chosen on another data set), measured as it stands.

    Returns a dict with ``retrieval`` (R@1/5/10 both ways), ``rejection``
    (per negative set and pooled ``all mismatched``: :func:`ood_metrics` plus
    threshold accuracies on the report half: ``builtin_threshold_accuracy``
    where the model has a decision rule, ``tuned_threshold_accuracy`` with the
    threshold chosen on the tune half; with calibration pairs
    ``calibration_threshold_accuracy``, ``platt_accuracy``, ``platt_ece`` /
    ``platt_brier``; ``carried_threshold_accuracy``; ``builtin_ece`` /
    ``builtin_brier`` where the model has a ``p(aligned)``), ``rules`` (the
    thresholds and Platt parameters used) and ``scores`` (per set, for plots).
    """
    transform = view.backbone.image_transform(train=False)
    image_emb = embed_images(view, data.images, transform, device, batch_size)
    text_emb = embed_texts(view, data.texts, device, batch_size)
    ood_emb = {name: embed_images(view, imgs, transform, device, batch_size) for name, imgs in data.ood_images.items()}
    rules = _user_rules(calibration, carried_threshold)

    retrieval = retrieval_recall(
        image_emb, text_emb[data.retrieval_texts], data.text_groups[data.retrieval_texts],
        metric=view.metric, image_ids=data.image_groups,
    )

    scores: dict[str, np.ndarray] = {}
    for name, (image_refs, text_ids) in data.pair_sets.items():
        imgs = torch.stack([image_emb[i] if source == "eval" else ood_emb[source][i] for source, i in image_refs])
        scores[name] = view.pair_scores(imgs, text_emb[text_ids]).numpy()
    builtin = view.builtin_threshold()
    aligned = scores["aligned"]
    negative_sets = {name: s for name, s in scores.items() if name != "aligned"}
    negative_sets["all mismatched"] = np.concatenate(list(negative_sets.values()))
    rejection = {}
    for name, negatives in negative_sets.items():
        metrics: dict[str, Any] = ood_metrics(aligned, negatives)
        threshold, _ = best_threshold(aligned[0::2], negatives[0::2])
        metrics["tuned_threshold"] = threshold
        metrics["tuned_threshold_accuracy"] = threshold_accuracy(aligned[1::2], negatives[1::2], threshold)
        report_aligned, report_negatives = aligned[1::2], negatives[1::2]
        labels = np.r_[np.ones(len(report_aligned), dtype=np.int64), np.zeros(len(report_negatives), dtype=np.int64)]
        if builtin is not None:
            metrics["builtin_threshold_accuracy"] = balanced_accuracy(view.accepts(report_aligned),
                                                                       view.accepts(report_negatives))
            metrics["builtin_accept_aligned"] = float(view.accepts(aligned).mean())
            metrics["builtin_reject_mismatched"] = float((~view.accepts(negatives)).mean())
        probability = view.pair_probability(np.r_[report_aligned, report_negatives])
        if probability is not None:
            metrics.update({f"builtin_{k}": v for k, v in binary_calibration(probability, labels).items()})
        constant = getattr(view, "constant_threshold", lambda: None)()
        if constant is not None:  # what the fitted decision replaced
            metrics["constant_decision_accuracy"] = threshold_accuracy(report_aligned, report_negatives, constant)
        for rule in ("calibration_threshold", "carried_threshold"):
            if rule in rules:
                metrics[f"{rule}_accuracy"] = threshold_accuracy(report_aligned, report_negatives, rules[rule])
        if "platt" in rules:
            a, b = rules["platt"]
            platt = 1.0 / (1.0 + np.exp(-(a * np.r_[report_aligned, report_negatives] + b)))
            accept = platt >= 0.5
            metrics["platt_accuracy"] = balanced_accuracy(accept[:len(report_aligned)], accept[len(report_aligned):])
            metrics.update({f"platt_{k}": v for k, v in binary_calibration(platt, labels).items()})
        rejection[name] = metrics
    return {
        "retrieval": retrieval,
        "rejection": rejection,
        "rules": rules,
        "builtin_threshold": builtin,
        "scores": scores,
        "embeddings": {"images": image_emb, "texts": text_emb, "image_groups": data.image_groups},
    }
