"""HALOModel: a backbone plus one learnable centroid per class (drop-in for the reference)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._validation import check_int

__all__ = ["HALOModel"]


class HALOModel(nn.Module):
    """Wrap a backbone that maps inputs to ``(N, D)`` embeddings and hold ``K`` centroids.

    The centroids are a ``(K, D)`` parameter drawn from a standard normal and
    returned *mean-centred across classes* on every call, ``c - c.mean(0)``:
    this keeps the class cloud around the origin, where HALO's abstain sink
    lives, and projects a common drift out of every update.

    Args:
        model: any module mapping inputs to ``(N, D)`` embeddings.
        n_classes: ``K`` (the reference's argument names; the attributes are
            :attr:`num_classes` and :attr:`embed_dim`).
        embedding_dim: ``D``.

    Raises:
        TypeError / ValueError: ``model`` is not a module, sizes are not positive ints.
    """

    def __init__(self, model: nn.Module, n_classes: int, embedding_dim: int) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.num_classes = check_int("n_classes", n_classes, minimum=1)
        self.embed_dim = check_int("embedding_dim", embedding_dim, minimum=2)
        self.centroids = nn.Parameter(torch.randn(self.num_classes, self.embed_dim, dtype=torch.float32))

    def centered_centroids(self) -> Tensor:
        """``(K, D)`` centroids minus their mean over classes (gradient flows through the centring)."""
        return self.centroids - self.centroids.mean(dim=0, keepdim=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(embeddings (N, D), centred centroids (K, D))``."""
        embeddings = self.model(x)
        if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or embeddings.shape[1] != self.embed_dim:
            shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
            raise ValueError(
                f"the wrapped model must return (N, {self.embed_dim}) embeddings, got {shape}"
            )
        return embeddings, self.centered_centroids()
