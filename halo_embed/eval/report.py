"""Run reports: ``metrics.json`` + ``report.md`` (tables and plots), written atomically.

    write_report("runs/cifar10-halo", "CIFAR-10, HALO", metrics,
                 sections=["## OOD\n\n" + results.to_markdown()],
                 plots={"Reliability": "reliability.png"})

    side_by_side({"CCE": cce, "HALO": halo, "HALO (published)": published}, ROWS)
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..io import atomic_write_json, atomic_write_text

__all__ = ["format_value", "markdown_table", "side_by_side", "write_report"]

# Metric keys shown in percent (fractions in [0, 1] internally).
_PERCENT_MARKERS = ("auroc", "aupr", "aurc", "fpr", "accuracy", "acc", "recall", "R@", "rate", "overlap", "kept",
                    "rejected")


def format_value(key: str, value: Any) -> str:
    """How a metric reads in a table: fractions as percent, ECE with 4 decimals."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if value != value:
        return "nan"
    lowered = key.lower()
    if "ece" in lowered or "mce" in lowered:
        return f"{value:.4f}"
    if any(marker.lower() in lowered for marker in _PERCENT_MARKERS):
        return f"{100 * value:.2f}"
    return f"{value:.4g}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    cells = [[str(c).replace("|", "\\|") for c in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def side_by_side(
    runs: Mapping[str, Mapping[str, Any]],
    rows: Sequence[tuple[str, str]],
    *,
    first_column: str = "metric",
) -> str:
    """A table with one column per run and one row per metric.

    Args:
        runs: ``{column name: {metric key: value}}`` (flat dicts; a key a run
            does not have shows as ``-``), e.g. CCE, HALO and the published numbers.
        rows: ``(metric key, row label)`` pairs, in order. Percent metrics are
            shown in percent (see :func:`format_value`).
    """
    header = [first_column] + list(runs)
    body = [[label] + [format_value(key, run.get(key)) for run in runs.values()] for key, label in rows]
    return markdown_table(header, body)


def write_report(
    run_dir: str | os.PathLike,
    title: str,
    metrics: Mapping[str, Any],
    sections: Sequence[str] = (),
    plots: Mapping[str, str] | None = None,
) -> Path:
    """Write ``metrics.json`` and ``report.md`` into ``run_dir``; return the report's path.

    Args:
        run_dir: the run folder (created if needed).
        title: the report's heading.
        metrics: everything measured (nested dicts fine; numpy/torch values converted).
        sections: markdown blocks, in order.
        plots: ``{caption: file name relative to run_dir}``, embedded after the sections.
    """
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / "metrics.json", metrics)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [f"# {title}\n", f"_written {stamp}; every number is also in `metrics.json`_\n"]
    parts += [section.rstrip() + "\n" for section in sections]
    for caption, file_name in (plots or {}).items():
        parts.append(f"### {caption}\n\n![{caption}]({file_name})\n")
    return atomic_write_text(run_dir / "report.md", "\n".join(parts))
