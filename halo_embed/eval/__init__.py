"""Evaluation: calibration, OOD detection, selective classification, retrieval with FAISS, search with rejection, plots, reports.

Metric conventions (a score is larger for in-distribution / accepted inputs):
see :mod:`halo_embed.eval.metrics`. FAISS and matplotlib are imported when used.
"""

from .metrics import (
    CalibrationResult,
    accuracy,
    balanced_accuracy,
    best_threshold,
    binary_calibration,
    expected_calibration_error,
    fpr_at_tpr,
    mean_std,
    ood_metrics,
    threshold_accuracy,
)
from .ood import OOD_KEYS, OODResults, collect_scores, evaluate_ood, ood_table
from .plots import embedding_pca, reliability_diagram, risk_coverage_curves, roc_curves, score_histograms
from .report import format_value, markdown_table, side_by_side, write_report
from .retrieval import SearchResult, VectorIndex, import_faiss, retrieval_recall
from .search import RejectionIndex, RejectionResult
from .selective import aurc, decision_rates, excess_aurc, keep_threshold, risk_coverage, thresholded_decisions

__all__ = [
    "CalibrationResult",
    "OODResults",
    "OOD_KEYS",
    "RejectionIndex",
    "RejectionResult",
    "SearchResult",
    "VectorIndex",
    "accuracy",
    "aurc",
    "balanced_accuracy",
    "best_threshold",
    "binary_calibration",
    "collect_scores",
    "decision_rates",
    "embedding_pca",
    "evaluate_ood",
    "excess_aurc",
    "expected_calibration_error",
    "format_value",
    "fpr_at_tpr",
    "import_faiss",
    "keep_threshold",
    "markdown_table",
    "mean_std",
    "ood_metrics",
    "ood_table",
    "reliability_diagram",
    "retrieval_recall",
    "risk_coverage",
    "risk_coverage_curves",
    "roc_curves",
    "score_histograms",
    "side_by_side",
    "threshold_accuracy",
    "thresholded_decisions",
    "write_report",
]
