"""Nearest-neighbour search (FAISS, or an exact torch fallback) and retrieval recall.

``metric="l2"`` ranks by squared Euclidean distance, which is HALO's ranking:
the nearest candidate in L2 is the one with the largest HALO logit
(:func:`halo_embed.geometry.shifted_logits`). ``metric="cosine"`` ranks by cosine
similarity, the CLIP baseline.

The FAISS and torch backends of an exact (``kind="flat"``) index return the
same neighbours; approximate indexes (``"hnsw"``, ``"ivf"``) are FAISS-only and
:func:`retrieval_recall` reports how many of the exact neighbours they find.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .._validation import check_choice, check_int, check_tensor, raise_if_any

__all__ = ["METRICS", "INDEX_KINDS", "VectorIndex", "import_faiss", "retrieval_recall"]

METRICS = ("l2", "cosine")
BACKENDS = ("faiss", "torch")
INDEX_KINDS = ("flat", "hnsw", "ivf")


def import_faiss():
    """Import faiss, or raise an ImportError that says how to install it."""
    try:
        import faiss  # noqa: PLC0415 - imported only when a FAISS index is built
    except ImportError as error:
        raise ImportError(
            "FAISS is not installed: `pip install faiss-gpu` on Linux x86-64 (a dependency of halo-embed there; "
            "it runs CPU indexes too), `pip install faiss-cpu` elsewhere; backend='torch' needs neither"
        ) from error
    return faiss


def faiss_has_gpu(faiss) -> bool:
    """True when the installed faiss was built with GPU support and a CUDA device is visible."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 and torch.cuda.is_available()


def _check_embeddings(name: str, x: Any) -> Tensor:
    x = check_tensor(name, x, ndim=2, floating=True, min_rows=1)
    raise_if_any([(~torch.isfinite(x).all(), f"{name} contains NaN or inf values")])
    return x


@dataclass
class SearchResult:
    """``k`` neighbours per query, best first.

    Attributes:
        scores: ``(N, k)`` float32: squared L2 distances (ascending) for
            ``metric="l2"``, cosine similarities (descending) for ``"cosine"``.
        indices: ``(N, k)`` long row numbers into the gallery.
    """

    scores: Tensor
    indices: Tensor


class VectorIndex:
    """An index over a gallery of embeddings.

    Args:
        gallery: ``(M, D)`` float tensor.
        metric: ``"l2"`` (HALO's ranking) or ``"cosine"`` (CLIP's).
        backend: ``"faiss"`` (default) or ``"torch"`` (exact brute force, on
            the gallery's device, for parity checks and machines without FAISS).
        kind: ``"flat"`` (exact), ``"hnsw"`` or ``"ivf"`` (approximate, FAISS only).
        use_gpu: ``None`` = use FAISS on GPU when the installed faiss supports
            it and CUDA is present (flat and IVF indexes); ``False`` = CPU.
        hnsw_m / ef_search: HNSW graph degree and search breadth.
        nlist / nprobe: IVF cells (default ``~4 sqrt(M)``) and cells visited.

    Raises:
        TypeError / ValueError: bad gallery or option; ImportError when FAISS is
        needed and missing.
    """

    def __init__(
        self,
        gallery: Tensor,
        metric: str = "l2",
        backend: str = "faiss",
        kind: str = "flat",
        *,
        use_gpu: bool | None = None,
        hnsw_m: int = 32,
        ef_search: int = 128,
        nlist: int | None = None,
        nprobe: int = 16,
    ) -> None:
        gallery = _check_embeddings("gallery", gallery)
        self.metric = check_choice("metric", metric, METRICS)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.kind = check_choice("kind", kind, INDEX_KINDS)
        if self.backend == "torch" and self.kind != "flat":
            raise ValueError(f"kind={kind!r} needs backend='faiss'; the torch backend is exact only")
        self.size, self.dim = gallery.shape
        self.on_gpu = False
        gallery = self._prepare(gallery)
        if self.backend == "torch":
            self._gallery = gallery
            return
        faiss = import_faiss()
        data = np.ascontiguousarray(gallery.detach().cpu().numpy(), dtype=np.float32)
        faiss_metric = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        if self.kind == "flat":
            index = faiss.IndexFlat(self.dim, faiss_metric)
        elif self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, check_int("hnsw_m", hnsw_m, minimum=2), faiss_metric)
            index.hnsw.efSearch = check_int("ef_search", ef_search, minimum=1)
        else:
            cells = nlist if nlist is not None else max(1, min(self.size // 39, int(4 * math.sqrt(self.size))))
            quantizer = faiss.IndexFlat(self.dim, faiss_metric)
            index = faiss.IndexIVFFlat(quantizer, self.dim, check_int("nlist", cells, minimum=1), faiss_metric)
            index.train(data)
            index.nprobe = check_int("nprobe", nprobe, minimum=1)
            self._quantizer = quantizer  # the IVF index does not own it
        if use_gpu is not False and self.kind != "hnsw" and faiss_has_gpu(faiss):
            self._gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
            self.on_gpu = True
        index.add(data)
        self._index = index

    def _prepare(self, x: Tensor) -> Tensor:
        x = x.detach().float()
        if self.metric == "cosine":
            x = torch.nn.functional.normalize(x, dim=-1)
        return x

    def search(self, queries: Tensor, k: int) -> SearchResult:
        """The ``k`` nearest gallery rows of each query (``k`` is capped at the gallery size).

        Args:
            queries: ``(N, D)``.
            k: neighbours per query.
        """
        queries = _check_embeddings("queries", queries)
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries has D={queries.shape[1]}, the index holds D={self.dim}")
        k = min(check_int("k", k, minimum=1), self.size)
        queries = self._prepare(queries)
        if self.backend == "torch":
            return self._torch_search(queries, k)
        data = np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32)
        scores, indices = self._index.search(data, k)
        return SearchResult(torch.from_numpy(scores), torch.from_numpy(indices).long())

    def _torch_search(self, queries: Tensor, k: int, chunk: int = 4096) -> SearchResult:
        gallery = self._gallery
        queries = queries.to(gallery.device)
        gallery_sq = gallery.pow(2).sum(1) if self.metric == "l2" else None
        all_scores, all_indices = [], []
        for block in queries.split(chunk):
            dot = block @ gallery.T
            if self.metric == "l2":
                # the expansion FAISS uses, clamped like FAISS at 0
                dist = (block.pow(2).sum(1, keepdim=True) + gallery_sq - 2.0 * dot).clamp_min_(0.0)
                scores, indices = dist.topk(k, dim=1, largest=False)
            else:
                scores, indices = dot.topk(k, dim=1, largest=True)
            all_scores.append(scores.cpu())
            all_indices.append(indices.cpu())
        return SearchResult(torch.cat(all_scores), torch.cat(all_indices))


def _recall_from_neighbours(hits: Tensor, ks: Sequence[int]) -> dict[int, float]:
    """``hits``: ``(N, k)`` bool, True where the neighbour is a right answer."""
    first = torch.where(hits.any(1), hits.float().argmax(1), hits.shape[1])
    return {k: (first < k).double().mean().item() for k in ks}


def retrieval_recall(
    image_embeddings: Tensor,
    text_embeddings: Tensor,
    text_image_ids: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    metric: str = "l2",
    backend: str = "faiss",
    kind: str = "flat",
    *,
    exact_check_queries: int = 1000,
    image_ids: Tensor | None = None,
    **index_options: Any,
) -> dict[str, float]:
    """Recall@k in both directions for image-text data with several captions per image.

    Args:
        image_embeddings: ``(N_img, D)``, row ``i`` is image ``i``.
        text_embeddings: ``(N_txt, D)``.
        text_image_ids: ``(N_txt,)`` long, the image each caption describes
            (its row, or its entry in ``image_ids``).
        image_ids: ``(N_img,)`` optional id of each image row (default
            ``arange(N_img)``). Rows may share an id, e.g. the class for
            class-name captions: a retrieved item is a hit when its id matches.
        ks: the cut-offs.
        metric: ``"l2"`` (HALO's ranking) or ``"cosine"`` (CLIP's).
        backend / kind / index_options: see :class:`VectorIndex`.
        exact_check_queries: for an approximate ``kind``, how many queries per
            direction are also searched exactly to measure the approximation.

    Returns:
        ``image_to_text_R@k`` (an image is a hit when any of its captions is
        in its top ``k``) and ``text_to_image_R@k``, fractions in ``[0, 1]``;
        for approximate indexes also ``{direction}_exact_overlap@K`` with
        ``K = max(ks)``, the share of the exact top-K found by the index.

    Raises:
        TypeError / ValueError: mismatched shapes, ids outside ``[0, N_img)``,
        an image without any caption, bad ``ks``.
    """
    images = _check_embeddings("image_embeddings", image_embeddings)
    texts = _check_embeddings("text_embeddings", text_embeddings)
    if images.shape[1] != texts.shape[1]:
        raise ValueError(
            f"image_embeddings has D={images.shape[1]} but text_embeddings has D={texts.shape[1]}"
        )
    ids = check_tensor("text_image_ids", text_image_ids, ndim=1, integer=True)
    if ids.shape[0] != texts.shape[0]:
        raise ValueError(
            f"text_image_ids must have one id per caption, shape ({texts.shape[0]},), got {tuple(ids.shape)}"
        )
    ids = ids.long().cpu()
    n_img = images.shape[0]
    if image_ids is None:
        if ids.min() < 0 or ids.max() >= n_img:
            raise ValueError(f"text_image_ids must be in [0, {n_img}), got min {int(ids.min())}, max {int(ids.max())}")
        row_ids = torch.arange(n_img)
    else:
        row_ids = check_tensor("image_ids", image_ids, ndim=1, integer=True).long().cpu()
        if row_ids.shape[0] != n_img:
            raise ValueError(f"image_ids must have one id per image, shape ({n_img},), got {tuple(row_ids.shape)}")
    captioned = torch.isin(row_ids, ids)
    if not captioned.all():
        raise ValueError(f"{int((~captioned).sum())} image(s) have no caption in text_image_ids")
    ks = tuple(check_int("ks", k, minimum=1) for k in ks)
    if not ks:
        raise ValueError("ks must not be empty")
    k_max = max(ks)

    results: dict[str, float] = {}
    directions = (
        ("image_to_text", images, texts, lambda nbrs, rows: ids[nbrs] == row_ids[rows][:, None]),
        ("text_to_image", texts, images, lambda nbrs, rows: row_ids[nbrs] == ids[rows][:, None]),
    )
    for name, queries, gallery, is_hit in directions:
        index = VectorIndex(gallery, metric, backend, kind, **index_options)
        found = index.search(queries, k_max).indices
        rows = torch.arange(queries.shape[0])
        for k, value in _recall_from_neighbours(is_hit(found, rows), ks).items():
            results[f"{name}_R@{k}"] = value
        if kind != "flat":
            k_check = min(k_max, gallery.shape[0])
            sample = torch.randperm(queries.shape[0], generator=torch.Generator().manual_seed(0))
            sample = sample[:exact_check_queries]
            exact = VectorIndex(gallery, metric, backend, "flat").search(queries[sample], k_check).indices
            approx = found[sample, :k_check]
            overlap = (approx.unsqueeze(2) == exact.unsqueeze(1)).any(2).float().mean().item()
            results[f"{name}_exact_overlap@{k_check}"] = overlap
    return results
