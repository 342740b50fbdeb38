"""Score image-text alignment with rejection: no threshold to tune.

    scorer = AlignmentScorer.from_checkpoint("runs/flickr-halo/checkpoint")
    scorer.score(["dog.jpg"], ["a dog runs on the grass"])     # probability + accept/reject
    scorer.rank(["dog.jpg"], captions, k=5)                   # top-5 captions, or "none of these"

The captions act as centroids for the images, as in training, and the abstain
sink competes with them. A pair is judged by the model's
:class:`~halo_embed.clip.decision.PairDecision`: HALO's two-candidate softmax
``[caption, sink]`` for the image placed on the unit shell (``|x|^2 / D = 1``):

    logit       = g * (1 - |x - t|^2 / D)          (geometry.pair_decision)
    probability = sigmoid(logit - bias)
    accept      = logit >= bias                    (probability >= 0.5)

with ``(g, bias)`` fitted on held-out pairs where the checkpoint was
calibrated (``halo-embed finetune --calibration-split``, ``halo-embed
calibrate``), else the training temperature and HALO's constant abstain bias.
Normalising the image's own norm out makes the decision depend on the pair's
distance only. With the image's actual norm (the ``K + 1`` softmax of training)
a large-norm image would accept almost any caption: measured on the built-in
data's validation pairs, the pooled AUROC of mismatched captions falls from
98.5 to 87.1 and the built-in threshold's accuracy from 95.9 to 79.8
(``experiments/pair_diagnostics.py``, README).
:meth:`AlignmentScorer.rank` scores a query against many candidates through
:class:`~halo_embed.eval.RejectionIndex` (FAISS) with the same rule.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from .._validation import check_int, check_tensor
from ..data.images import load_image
from ..eval.search import RejectionIndex, RejectionResult
from .backbones import Tokens, move_tokens
from .model import HALOCLIP

__all__ = ["AlignmentScorer", "PairScores", "Ranking"]


@dataclass
class PairScores:
    """Scores of ``N`` (image, text) pairs.

    Attributes:
        probability: ``(N,)`` p(the caption belongs to the image), ``sigmoid(logit - abstain_bias)``.
        accept: ``(N,)`` bool, the caption beats the abstain sink (``probability >= 0.5``).
        logit: ``(N,)`` the caption's HALO logit for the image on the unit shell.
        abstain_bias: the sink's logit (the built-in threshold on ``logit``).
        truncated: ``(N,)`` bool, the caption was longer than the text tower's
            context and only its beginning was scored (``None`` when scored
            from embeddings).
        cosine: ``(N,)`` the cosine of the towers' own embeddings (before the
            feature adapter): the "CLIP score" that threshold filters use, for
            comparison (``None`` when scored from embeddings).
    """

    probability: Tensor
    accept: Tensor
    logit: Tensor
    abstain_bias: float
    truncated: Tensor | None = None
    cosine: Tensor | None = None

    def to_records(self) -> list[dict[str, Any]]:
        missing = [None] * len(self.probability)
        truncated = self.truncated if self.truncated is not None else missing
        cosine = self.cosine if self.cosine is not None else missing
        return [
            {"probability": float(p), "accept": bool(a), "logit": float(l),
             **({} if t is None else {"truncated": bool(t)}), **({} if c is None else {"cosine": float(c)})}
            for p, a, l, t, c in zip(self.probability, self.accept, self.logit, truncated, cosine)
        ]


@dataclass
class Ranking:
    """Top-``k`` candidates per query, or "none of these".

    Attributes:
        result: the :class:`~halo_embed.eval.RejectionResult` (indices,
            logits, probabilities over ``[k candidates + abstain]``, ``abstained``).
        candidates: the candidate labels (texts, or image names) in index order.
    """

    result: RejectionResult
    candidates: Sequence[Any]

    def to_records(self) -> list[dict[str, Any]]:
        records = []
        for row in range(self.result.indices.shape[0]):
            top = [
                {"index": int(i), "candidate": self.candidates[int(i)], "probability": float(p), "logit": float(l)}
                for i, p, l in zip(self.result.indices[row], self.result.probs[row, :-1], self.result.logits[row])
            ]
            records.append({
                "abstained": bool(self.result.abstained[row]),
                "p_none_of_these": float(self.result.probs[row, -1]),
                "top": top,
            })
        return records


class AlignmentScorer:
    """Pairwise alignment probabilities and rejection from a trained :class:`HALOCLIP`.

    Args:
        model: a HALOCLIP (live or from :meth:`from_checkpoint`).
        device: where to run the towers (default: the model's device).
        batch_size: images / texts encoded per forward pass.
    """

    def __init__(self, model: HALOCLIP, device: str | torch.device | None = None, batch_size: int = 64) -> None:
        if not isinstance(model, HALOCLIP):
            raise TypeError(f"model must be a HALOCLIP, got {type(model).__name__}")
        if not bool(model.adapter.calibrated):  # the abstain bias assumes the adapter's unit-mean-square geometry
            raise ValueError("model's feature adapter has no statistics: call model.fit_adapter(batches) on training "
                             "data first (checkpoints of halo-embed finetune have them)")
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self._transform = model.backbone.image_transform(train=False)
        self.decision = model.decision

    @classmethod
    def from_checkpoint(cls, directory: str, device: str | torch.device | None = None, batch_size: int = 64) -> "AlignmentScorer":
        from .checkpoint import load_checkpoint

        return cls(load_checkpoint(directory), device=device, batch_size=batch_size)

    @property
    def temperature(self) -> float:
        """The pair rule's temperature (the decision's)."""
        return self.decision.temperature

    @property
    def abstain_bias(self) -> float:
        """The sink's logit in the pair rule (the decision's bias)."""
        return self.decision.bias

    def _pixels(self, images: Sequence[Any] | Tensor) -> Tensor:
        if isinstance(images, Tensor):
            if images.dim() != 4:
                raise ValueError(f"images as a tensor must be a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
            return images
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
            raise TypeError(f"images must be a list of paths / PIL images or a tensor, got {type(images).__name__}")
        return torch.stack([self._transform(load_image(image)) for image in images])

    @torch.no_grad()
    def encode_images(self, images: Sequence[Any] | Tensor) -> Tensor:
        """``N`` images (paths, PIL images, or a preprocessed ``(N, 3, H, W)`` tensor) -> ``(N, D)`` on CPU."""
        if len(images) == 0:
            raise ValueError("images must not be empty")
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = self._pixels(images[start : start + self.batch_size]).to(self.device)
            out.append(self.model.encode_image(pixels).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """``N`` strings -> ``(N, D)`` on CPU."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
        if len(texts) == 0:
            raise ValueError("texts must not be empty")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"texts[{i}] must be a non-empty string, got {text!r}")
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.model.tokenize(list(texts[start : start + self.batch_size]))
            tokens = move_tokens(tokens, self.device)
            out.append(self.model.encode_text(tokens).float().cpu())
        return torch.cat(out)

    def score_embeddings(self, image_embeddings: Tensor, text_embeddings: Tensor) -> PairScores:
        """:meth:`score` from ``(N, D)`` embeddings of the pairs.

        Raises:
            ValueError: shapes that differ, or a NaN / inf embedding (naming its
                row: a probability is never NaN, and NaN must never mean accept).
        """
        check_tensor("image_embeddings", image_embeddings, ndim=2, floating=True)
        check_tensor("text_embeddings", text_embeddings, ndim=2, floating=True)
        if image_embeddings.shape != text_embeddings.shape:
            raise ValueError(
                f"one text per image: got {image_embeddings.shape[0]} images and {text_embeddings.shape[0]} texts"
            )
        for name, embeddings in (("image_embeddings", image_embeddings), ("text_embeddings", text_embeddings)):
            bad = (~torch.isfinite(embeddings).all(dim=1)).nonzero().flatten()
            if bad.numel():
                raise ValueError(f"{name} has NaN or inf values in row(s) {bad[:5].tolist()}"
                                 + (f" and {bad.numel() - 5} more" if bad.numel() > 5 else ""))
        logit, probability, accept = self.decision.judge_pairs(image_embeddings.float(), text_embeddings.float())
        return PairScores(probability, accept, logit, self.abstain_bias)

    @torch.no_grad()
    def score_preprocessed(self, pixels: Tensor, tokens: Tokens) -> PairScores:
        """:meth:`score` of ``(N, 3, H, W)`` pixels from the backbone's image transform and tokens from its
        tokenizer, each tower run once on the whole batch (the streaming path of ``halo-embed score``)."""
        check_tensor("pixels", pixels, ndim=4, floating=True)
        backbone, adapter = self.model.backbone, self.model.adapter
        raw_images = backbone.encode_image(pixels.to(self.device, non_blocking=True))
        raw_texts = backbone.encode_text(move_tokens(tokens, self.device))
        scores = self.score_embeddings(adapter(raw_images, "image").float().cpu(),
                                       adapter(raw_texts, "text").float().cpu())
        scores.cosine = torch.nn.functional.cosine_similarity(raw_images.float(), raw_texts.float(), dim=1).cpu()
        return scores

    def score(self, images: Sequence[Any] | Tensor, texts: Sequence[str]) -> PairScores:
        """For each pair ``(images[i], texts[i])``: the probability that they belong together and accept/reject."""
        for name, value in (("images", images), ("texts", texts)):
            if isinstance(value, (str, bytes, os.PathLike)):
                raise TypeError(f"{name} must be a list (one entry per pair), got a single "
                                f"{type(value).__name__}; wrap it in a list")
        if len(images) != len(texts):
            raise ValueError(f"one text per image: got {len(images)} images and {len(texts)} texts")
        scores = self.score_embeddings(self.encode_images(images), self.encode_texts(texts))
        scores.truncated = self.truncated(texts)
        return scores

    def truncated(self, texts: Sequence[str]) -> Tensor | None:
        """``(N,)`` bool: which texts are longer than the text tower reads (it scores their beginning).

        ``None`` for a backbone that cannot tell (no :meth:`CLIPBackbone.context_length`).
        """
        try:
            parts = [self.model.backbone.truncated(list(texts[start : start + self.batch_size]))
                     for start in range(0, len(texts), self.batch_size)]
        except NotImplementedError:
            return None
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)

    def rank(self, images: Sequence[Any] | Tensor, candidate_texts: Sequence[str], k: int = 5,
             backend: str = "faiss") -> Ranking:
        """For each image, the top-``k`` captions among ``candidate_texts``, or abstention."""
        index = RejectionIndex(self.encode_texts(candidate_texts), self.temperature, self.abstain_bias, backend=backend,
                               query_norm="unit")
        return Ranking(index.search(self.encode_images(images), k), list(candidate_texts))

    def rank_images(self, texts: Sequence[str], candidate_images: Sequence[Any] | Tensor, k: int = 5,
                    backend: str = "faiss", candidate_names: Sequence[Any] | None = None) -> Ranking:
        """For each text, the top-``k`` images among ``candidate_images`` (images as centroids), or abstention."""
        index = RejectionIndex(self.encode_images(candidate_images), self.temperature, self.abstain_bias, backend=backend,
                               query_norm="unit")
        names = list(candidate_names) if candidate_names is not None else (
            [str(c) for c in candidate_images] if not isinstance(candidate_images, Tensor) else list(range(len(candidate_images)))
        )
        return Ranking(index.search(self.encode_texts(texts), k), names)
