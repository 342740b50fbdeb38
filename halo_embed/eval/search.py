"""Search with rejection: the top-k candidates, or "none of these".

An index over candidate embeddings (class prototypes, or caption embeddings
that act as centroids) whose answer for each query carries HALO's logits, the
probabilities over ``[candidates + abstain]`` and an ``abstained`` flag that is
set when the origin sink beats every candidate. The ranking comes from an L2
index (FAISS or exact torch); the logits from the L2 identity
:func:`halo_embed.geometry.shifted_logits_from_sq_distances`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import geometry
from .._validation import check_choice, check_float, check_temperature
from .retrieval import VectorIndex

__all__ = ["RejectionIndex", "RejectionResult"]


@dataclass
class RejectionResult:
    """The answer for ``N`` queries and ``k`` candidates each, best first.

    Attributes:
        indices: ``(N, k)`` long, candidate rows.
        logits: ``(N, k)`` HALO (shifted) logits of those candidates.
        probs: ``(N, k + 1)`` softmax over the ``k`` logits and the abstain
            bias; the last column is p(none of these). With ``k`` equal to the
            number of candidates this is the model's full ``K + 1`` softmax;
            with fewer it is that softmax restricted to the returned candidates.
        abstained: ``(N,)`` bool, the sink's logit is above every candidate's.
    """

    indices: Tensor
    logits: Tensor
    probs: Tensor
    abstained: Tensor

    @property
    def abstain_prob(self) -> Tensor:
        return self.probs[:, -1]


class RejectionIndex:
    """Nearest-candidate search with HALO's abstain decision.

    Args:
        candidates: ``(K, D)`` embeddings that act as centroids.
        temperature: the effective temperature (``HALOLoss.temperature``, ``softplus`` of its raw ``gamma``).
        abstain_bias: the abstain logit.
        query_norm: ``"actual"`` (default): the logits of HALO's ``K + 1``
            softmax, ``g (|x|^2 - |x - c|^2) / D``, so a query near the origin
            abstains; ``"unit"``: the logits of the query placed on the unit
            shell, ``g (1 - |x - c|^2 / D)`` (:func:`~halo_embed.geometry.unit_shell_logits`),
            so the decision depends on the distances only (what the alignment
            scorer uses for pairs).
        backend / kind / options: the L2 index, see
            :class:`~halo_embed.eval.retrieval.VectorIndex`.
    """

    def __init__(
        self,
        candidates: Tensor,
        temperature: float | Tensor,
        abstain_bias: float | Tensor,
        backend: str = "faiss",
        kind: str = "flat",
        query_norm: str = "actual",
        **options,
    ) -> None:
        self.temperature = check_temperature("temperature", temperature)
        self.abstain_bias = check_float("abstain_bias", abstain_bias)
        self.query_norm = check_choice("query_norm", query_norm, ("actual", "unit"))
        self.index = VectorIndex(candidates, "l2", backend, kind, **options)
        # the found candidates' logits are recomputed from these in float64: the index's float32 squared
        # distances overflow to inf for large queries (|x| ~ 1e20), and inf would make the softmax NaN
        self._candidates = candidates.detach().float().cpu()

    def __len__(self) -> int:
        return self.index.size

    @torch.no_grad()
    def search(self, queries: Tensor, k: int = 5) -> RejectionResult:
        """Top-``k`` candidates per query with logits, probabilities and the abstain flag.

        Args:
            queries: ``(N, D)``.
            k: candidates per query (capped at the number of candidates).
        """
        found = self.index.search(queries, k)
        queries = queries.detach().double().cpu()
        candidates = self._candidates[found.indices.clamp_min(0)].double()  # (N, k, D)
        sq_distances = (queries[:, None, :] - candidates).pow(2).sum(-1)  # finite for finite float32 inputs
        if self.query_norm == "actual":
            logits = geometry.shifted_logits_from_sq_distances(queries, sq_distances, self.temperature)
        else:
            logits = geometry.unit_shell_logits(sq_distances / queries.shape[1], self.temperature)
        limit = torch.finfo(torch.float32).max
        logits = logits.masked_fill(found.indices < 0, -limit).clamp(-limit, limit)  # -1: an approximate index
        # found fewer than k candidates
        probs = torch.softmax(geometry.with_abstain(logits, self.abstain_bias), dim=-1)
        abstained = geometry.abstain_mask(logits, self.abstain_bias)
        return RejectionResult(found.indices, logits.float(), probs.float(), abstained)
