"""OOD evaluation runner: every metric, per OOD set and per score function.

    results = evaluate_ood(score_fn, id_loader, {"cifar100": c100, "svhn": svhn},
                           near=["cifar100"], far=["svhn"])
    print(results.to_markdown())

``score_fn`` maps a batch of inputs to one ``(N,)`` score tensor or to a dict
``{score name: (N,) tensor}`` (larger = more in-distribution), so one forward
pass yields every score function (e.g. :attr:`HALOPrediction.scores`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .metrics import ood_metrics

__all__ = ["OODResults", "collect_scores", "evaluate_ood", "ood_table", "OOD_KEYS"]

#: The metrics a table shows by default, in order.
OOD_KEYS = ("auroc", "fpr95_id_kept", "fpr95_ood_caught", "aupr_in", "aupr_out")

ScoreFn = Callable[[Tensor], "Tensor | Mapping[str, Tensor]"]


def _batches(data: Any, batch_size: int) -> Iterable[Tensor]:
    """Input tensors from a tensor (split into batches) or an iterable of batches / (x, y) tuples."""
    if isinstance(data, Tensor):
        yield from data.split(batch_size)
        return
    for batch in data:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        elif isinstance(batch, Mapping):
            batch = batch.get("pixel_values", batch.get("image", batch.get("x")))
        if not isinstance(batch, Tensor):
            raise TypeError(f"a batch must be a tensor or an (inputs, ...) tuple, got {type(batch).__name__}")
        yield batch


@torch.no_grad()
def collect_scores(score_fn: ScoreFn, data: Any, *, batch_size: int = 256, device: Any = None) -> dict[str, np.ndarray]:
    """Run ``score_fn`` over ``data`` and concatenate every score it returns."""
    collected: dict[str, list[np.ndarray]] = {}
    for batch in _batches(data, batch_size):
        if device is not None:
            batch = batch.to(device)
        out = score_fn(batch)
        if isinstance(out, Tensor):
            out = {"score": out}
        if not isinstance(out, Mapping):
            raise TypeError(f"score_fn must return a tensor or a dict of tensors, got {type(out).__name__}")
        for name, values in out.items():
            collected.setdefault(name, []).append(values.detach().float().cpu().reshape(-1).numpy())
    if not collected:
        raise ValueError("data yielded no batches")
    return {name: np.concatenate(parts) for name, parts in collected.items()}


@dataclass
class OODResults:
    """Per score function, per OOD set (and ``near_avg`` / ``far_avg``): the metrics of :func:`ood_metrics`.

    Attributes:
        metrics: ``metrics[score_name][set_name] -> {metric: value}``.
        id_scores: ``{score_name: (N_id,) array}``, kept for plots.
        ood_scores: ``{set_name: {score_name: (N,) array}}``.
        near / far: the set names averaged into ``near_avg`` / ``far_avg``.
    """

    metrics: dict[str, dict[str, dict[str, float]]]
    id_scores: dict[str, np.ndarray] = field(repr=False)
    ood_scores: dict[str, dict[str, np.ndarray]] = field(repr=False)
    near: tuple[str, ...] = ()
    far: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "near": list(self.near), "far": list(self.far)}

    def to_markdown(self, keys: Sequence[str] = OOD_KEYS) -> str:
        """One row per (score function, OOD set), metrics in percent."""
        from .report import format_value, markdown_table

        header = ["score", "OOD set"] + [_KEY_LABELS.get(k, k) for k in keys]
        rows = []
        single = {f"{name}_avg" for name, group in (("near", self.near), ("far", self.far)) if len(group) == 1}
        for score_name, per_set in self.metrics.items():
            for set_name, values in per_set.items():
                if set_name in single:  # the average of one set is that set's row
                    continue
                rows.append([score_name, set_name] + [format_value(k, values.get(k)) for k in keys])
        return markdown_table(header, rows)


_KEY_LABELS = {
    "auroc": "AUROC %",
    "fpr95_id_kept": "FPR@95 (ID kept) %",
    "fpr95_ood_caught": "FPR@95 (OOD caught) %",
    "aupr_in": "AUPR-in %",
    "aupr_out": "AUPR-out %",
}


def ood_table(
    id_scores: Mapping[str, Any],
    ood_scores: Mapping[str, Mapping[str, Any]],
    near: Sequence[str] = (),
    far: Sequence[str] = (),
) -> OODResults:
    """Metrics from precomputed scores.

    Args:
        id_scores: ``{score name: (N_id,) scores}``.
        ood_scores: ``{OOD set name: {score name: (N,) scores}}``; every set
            must have every score in ``id_scores``.
        near / far: OOD set names averaged into ``near_avg`` / ``far_avg``.

    Raises:
        ValueError: an unknown set in ``near``/``far``, a missing score, bad scores.
    """
    if not id_scores:
        raise ValueError("id_scores must name at least one score function")
    if not ood_scores:
        raise ValueError("ood_scores must hold at least one OOD set")
    for group_name, group in (("near", near), ("far", far)):
        unknown = [name for name in group if name not in ood_scores]
        if unknown:
            raise ValueError(f"{group_name} names OOD sets that were not given: {unknown}; have {list(ood_scores)}")
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for score_name, id_values in id_scores.items():
        per_set: dict[str, dict[str, float]] = {}
        for set_name, scores in ood_scores.items():
            if score_name not in scores:
                raise ValueError(f"OOD set {set_name!r} has no score {score_name!r}; has {list(scores)}")
            per_set[set_name] = ood_metrics(id_values, scores[score_name])
        for group_name, group in (("near_avg", near), ("far_avg", far)):
            if group:
                per_set[group_name] = {
                    key: float(np.mean([per_set[name][key] for name in group]))
                    for key in per_set[group[0]]
                }
        metrics[score_name] = per_set
    return OODResults(
        metrics,
        {k: np.asarray(v) for k, v in id_scores.items()},
        {s: {k: np.asarray(v) for k, v in d.items()} for s, d in ood_scores.items()},
        tuple(near),
        tuple(far),
    )


def evaluate_ood(
    score_fn: ScoreFn,
    id_data: Any,
    ood_data: Mapping[str, Any],
    near: Sequence[str] = (),
    far: Sequence[str] = (),
    *,
    batch_size: int = 256,
    device: Any = None,
) -> OODResults:
    """Score an ID set and named OOD sets with ``score_fn`` and tabulate every metric.

    Args:
        score_fn: batch of inputs -> ``(N,)`` tensor or ``{name: (N,) tensor}``.
        id_data / ood_data values: a tensor of inputs, or an iterable of
            batches (tensors, ``(inputs, labels)`` tuples or dicts), e.g. a
            ``DataLoader``.
        near / far: OOD set names averaged into ``near_avg`` / ``far_avg``.
    """
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
    id_scores = collect_scores(score_fn, id_data, batch_size=batch_size, device=device)
    ood_scores = {
        name: collect_scores(score_fn, data, batch_size=batch_size, device=device)
        for name, data in ood_data.items()
    }
    return ood_table(id_scores, ood_scores, near, far)
