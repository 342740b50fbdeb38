"""Plots for reports (PNG, matplotlib's Agg canvas; pyplot's global state is never touched).

Each function writes one PNG atomically and returns its path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..io import atomic_path
from .metrics import CalibrationResult

__all__ = ["embedding_pca", "reliability_diagram", "risk_coverage_curves", "roc_curves", "score_histograms",
           "tradeoff_curves"]


def _figure(width: float = 5.0, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def _numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def reliability_diagram(calibration: CalibrationResult, path: str | os.PathLike, title: str = "") -> Path:
    """Accuracy vs confidence per bin, with the diagonal and the gap shaded; ECE in the legend."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    bins = [b for b in calibration.bins if b["count"]]
    centers = np.array([(b["lower"] + b["upper"]) / 2 for b in bins])
    width = calibration.bins[0]["upper"] - calibration.bins[0]["lower"]
    acc = np.array([b["accuracy"] for b in bins])
    conf = np.array([b["confidence"] for b in bins])
    ax.bar(centers, acc, width=width * 0.95, color="#4c72b0", edgecolor="black", label="accuracy")
    ax.bar(centers, conf - acc, bottom=acc, width=width * 0.95, color="#dd8452", alpha=0.5,
           edgecolor="#dd8452", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "Reliability diagram")
    ax.legend(loc="upper left", title=f"ECE {calibration.ece:.4f}")
    return _save(fig, path)


def score_histograms(
    id_scores: Any, ood_scores: Mapping[str, Any], path: str | os.PathLike, title: str = "", bins: int = 50
) -> Path:
    """Histograms of one score on the ID set and on each OOD set (densities, shared bins)."""
    fig = _figure(6, 4)
    ax = fig.add_subplot(1, 1, 1)
    id_arr = _numpy(id_scores)
    all_values = np.concatenate([id_arr] + [_numpy(v) for v in ood_scores.values()])
    edges = np.histogram_bin_edges(all_values, bins=bins)
    ax.hist(id_arr, bins=edges, density=True, alpha=0.55, label="ID")
    for name, values in ood_scores.items():
        ax.hist(_numpy(values), bins=edges, density=True, alpha=0.45, label=name)
    ax.set_xlabel("score (larger = more in-distribution)")
    ax.set_ylabel("density")
    ax.set_title(title or "Score distributions")
    ax.legend()
    return _save(fig, path)


def roc_curves(id_scores: Any, ood_scores: Mapping[str, Any], path: str | os.PathLike, title: str = "") -> Path:
    """ROC curves (ID positive) of one score against each OOD set, AUROC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    id_arr = _numpy(id_scores)
    for name, values in ood_scores.items():
        ood_arr = _numpy(values)
        y = np.r_[np.ones(len(id_arr)), np.zeros(len(ood_arr))]
        s = np.r_[id_arr, ood_arr]
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {100 * roc_auc_score(y, s):.1f})")
    ax.plot([0, 1], [0, 1], "k:", linewidth=1)
    ax.axhline(0.95, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("OOD accepted (FPR)")
    ax.set_ylabel("ID accepted (TPR)")
    ax.set_title(title or "ROC")
    ax.legend(loc="lower right")
    return _save(fig, path)


def embedding_pca(
    embeddings: Any,
    labels: Any,
    path: str | os.PathLike,
    centroids: Any = None,
    title: str = "",
    extra: Mapping[str, Any] | None = None,
    max_points: int = 3000,
) -> Path:
    """2-D PCA of embeddings coloured by class, with centroids (stars) and the origin (black cross).

    The projection is fitted on the embeddings; the origin is projected with the
    same affine map, so its position relative to the clusters is true. HALO's
    clusters sit on bounded shells around their centroids with the origin (the
    abstain sink) in the middle; cross-entropy's spread out radially.

    Args:
        embeddings: ``(N, D)``.
        labels: ``(N,)`` ints.
        centroids: optional ``(K, D)``.
        extra: optional ``{name: (M, D)}`` point sets drawn in grey (e.g. OOD inputs).
        max_points: a fixed-seed subsample keeps the plot readable.
    """
    from sklearn.decomposition import PCA

    x = _numpy(embeddings)
    y = np.asarray(labels.detach().cpu().numpy() if hasattr(labels, "detach") else labels)
    if len(x) > max_points:
        keep = np.random.default_rng(0).choice(len(x), max_points, replace=False)
        x, y = x[keep], y[keep]
    pca = PCA(n_components=2, random_state=0).fit(x)
    fig = _figure(5.5, 5)
    ax = fig.add_subplot(1, 1, 1)
    for name, points in (extra or {}).items():
        p = pca.transform(_numpy(points)[:max_points])
        ax.scatter(p[:, 0], p[:, 1], s=4, c="lightgrey", label=name)
    xy = pca.transform(x)
    ax.scatter(xy[:, 0], xy[:, 1], c=y, s=4, cmap="tab10" if y.max() < 10 else "tab20")
    if centroids is not None:
        c = pca.transform(_numpy(centroids))
        ax.scatter(c[:, 0], c[:, 1], marker="*", s=160, c="gold", edgecolors="black", label="centroids")
    origin = pca.transform(np.zeros((1, x.shape[1])))
    ax.scatter(origin[:, 0], origin[:, 1], marker="X", s=120, c="black", label="origin (abstain)")
    ax.set_title(title or "Embeddings (PCA)")
    ax.set_xlabel(f"PC1 ({100 * pca.explained_variance_ratio_[0]:.0f}%)")
    ax.set_ylabel(f"PC2 ({100 * pca.explained_variance_ratio_[1]:.0f}%)")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def tradeoff_curves(curves: Mapping[str, Sequence[tuple[float, float, str]]], path: str | os.PathLike,
                    xlabel: str, ylabel: str, title: str = "") -> Path:
    """One line per name through its ``(x, y, annotation)`` points (e.g. a WiSE-FT sweep, alpha annotated)."""
    fig = _figure(5.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for label, points in curves.items():
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, marker="o", label=label)
        for x, y, note in points:
            ax.annotate(note, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def risk_coverage_curves(curves: Mapping[str, tuple[Any, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Selective risk against coverage, one line per ``name -> (coverage, risk)``
    (:func:`~halo_embed.eval.selective.risk_coverage`); lower is better."""
    fig = _figure(5.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for label, (coverage, risk) in curves.items():
        ax.plot(100 * _numpy(coverage), 100 * _numpy(risk), label=label)
    ax.set_xlabel("coverage % (inputs kept, most confident first)")
    ax.set_ylabel("error rate of the kept inputs %")
    ax.set_xlim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)
