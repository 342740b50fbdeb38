"""Score webdataset shards and parquet files one unit (a shard, a row group) at a time, resumably, in one
process or on Ray (:mod:`halo_embed.clip.ray_engine`), with the same answer.

Every unit's samples are scored in batches cut at multiples of the batch size
from the unit's first sample, whoever scores it (a DataLoader worker here, a
Ray actor on another machine): the same pairs meet in the same batches, so
each key gets the same numbers on every engine. A finished unit is written as
one parquet part (``<output>.parts/<unit>.parquet``, atomically, with its
counts in the file's metadata); a killed run keeps every finished unit and
``--resume`` scores the rest. When every unit is in, the parts become the
output in one step (parquet, CSV or JSON) and the parts folder is removed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..data.images import ImageLoadError, load_image
from ..data.shards import RawPair, Unit, UnitReport, parquet_columns, read_unit
from ..io import atomic_path, atomic_write_json
from .pair_stream import PairCollate, ScoreSummary, parquet_schema, score_batch, write_records

__all__ = ["PARTS_FORMAT", "SHARD_RECORD_FIELDS", "PartStore", "ScoreSettings", "UnitStream",
           "score_unit", "score_units_streaming", "unit_batches"]

PARTS_FORMAT = "halo-embed/score-parts/1"
#: the fields of one output row of a shard / parquet input, in the output's column order
SHARD_RECORD_FIELDS = ("key", "shard", "text", "probability", "accept", "logit", "cosine", "truncated", "error")


@dataclass(frozen=True)
class ScoreSettings:
    """What scoring a unit depends on (sent to every worker and Ray actor; part of the resume fingerprint)."""

    batch_size: int
    max_pixels: int
    strict_text: bool
    key_column: str | None = None
    image_column: str | None = None
    text_column: str | None = None


def _record(unit: Unit, raw: RawPair) -> dict[str, Any]:
    record = dict.fromkeys(SHARD_RECORD_FIELDS)
    record.update(key=raw.key, shard=unit.path, text=raw.text, error=raw.error)
    return record


def unit_batches(unit: Unit, transform: Callable, tokenize_checked: Callable,
                 settings: ScoreSettings) -> Iterator[dict[str, Any]]:
    """The unit's samples as scoring batches (:class:`~halo_embed.clip.pair_stream.PairCollate`'s, cut every
    ``batch_size`` samples from the unit's start), then ``{"end": True, "report": UnitReport}``."""
    report = UnitReport()
    collate = PairCollate(tokenize_checked)
    items: list[tuple[dict[str, Any], torch.Tensor | None]] = []
    try:
        columns = None if unit.row_group is None else parquet_columns(unit.path, settings.key_column,
                                                                      settings.image_column, settings.text_column)
    except ValueError as error:
        report.errors.append(str(error))
        yield {"end": True, "report": report}
        return
    for raw in read_unit(unit, report, columns):
        record, pixels = _record(unit, raw), None
        if raw.error is None:
            try:
                pixels = transform(load_image(raw.image, settings.max_pixels, name=f"{unit.path}:{raw.key}"))
            except (ImageLoadError, TypeError) as error:
                record["error"] = str(error)
        items.append((record, pixels))
        if len(items) == settings.batch_size:
            yield collate(items)
            items = []
    if items:
        yield collate(items)
    yield {"end": True, "report": report}


class UnitStream(IterableDataset):
    """The batches of ``units`` (``(index, Unit)``), each DataLoader worker reading every ``num_workers``-th
    unit; every batch carries its unit's ``index``."""

    def __init__(self, units: Sequence[tuple[int, Unit]], transform: Callable, tokenize_checked: Callable,
                 settings: ScoreSettings) -> None:
        self.units, self.transform, self.settings = list(units), transform, settings
        self.tokenize_checked = tokenize_checked

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index, unit in self.units[worker::workers]:
            for batch in unit_batches(unit, self.transform, self.tokenize_checked, self.settings):
                batch["unit"] = index
                yield batch


def _finish(records: list[dict[str, Any]], report: UnitReport) -> UnitReport:
    # counted after scoring: an image that does not decode, a caption --strict-text rejects are broken too
    report.broken = sum(record["error"] is not None for record in records)
    return report


def score_unit(scorer: Any, unit: Unit, settings: ScoreSettings) -> tuple[list[dict[str, Any]], UnitReport]:
    """Every record of one unit, scored in this process (a Ray actor's work)."""
    backbone = scorer.model.backbone
    records: list[dict[str, Any]] = []
    for batch in unit_batches(unit, backbone.image_transform(train=False), backbone.tokenize_checked, settings):
        if batch.get("end"):
            return records, _finish(records, batch["report"])
        records.extend(score_batch(scorer, batch, settings.strict_text))
    raise AssertionError("unit_batches ends with its report")


def score_units_streaming(scorer: Any, units: Sequence[tuple[int, Unit]], settings: ScoreSettings, workers: int,
                          on_unit: Callable[[int, list[dict[str, Any]], UnitReport], None]) -> None:
    """Score ``units`` here, DataLoader workers decoding (``workers`` at most one per unit); ``on_unit(index,
    records, report)`` is called as each unit completes (units in flight: at most one per worker)."""
    if not units:
        return
    backbone = scorer.model.backbone
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers tokenize; no threads across a fork
    workers = min(workers, len(units))
    loader = DataLoader(UnitStream(units, backbone.image_transform(train=False), backbone.tokenize_checked, settings),
                        batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None,
                        pin_memory=scorer.device.type == "cuda")
    pending: dict[int, list[dict[str, Any]]] = {}
    for batch in loader:
        index = batch["unit"]
        if batch.get("end"):
            records = pending.pop(index, [])
            on_unit(index, records, _finish(records, batch["report"]))
        else:
            pending.setdefault(index, []).extend(score_batch(scorer, batch, settings.strict_text))


class PartStore:
    """``<output>.parts/``: ``header.json`` (what a resume must share: inputs, checkpoint, settings) and one
    ``<index>.parquet`` per finished unit, its report in the file's metadata.

    Args:
        folder: the parts folder.
        header: the fingerprint of the inputs and settings.
    """

    def __init__(self, folder: str | os.PathLike, header: dict[str, Any]) -> None:
        self.folder, self.header = Path(folder), header

    def _part(self, index: int) -> Path:
        return self.folder / f"{index:08d}.parquet"

    def start(self) -> None:
        """Create the folder (it must not exist) with its header."""
        self.folder.mkdir(parents=True)
        atomic_write_json(self.folder / "header.json", {"format": PARTS_FORMAT, **self.header})

    def resume(self) -> set[int]:
        """The finished units of an interrupted run.

        Raises:
            ValueError: the folder is not a parts folder, or was written for other inputs or settings (named).
        """
        try:
            header = json.loads((self.folder / "header.json").read_text())
            if header.pop("format") != PARTS_FORMAT:
                raise ValueError
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{self.folder} is not a halo-embed scores folder: delete it to start again") from None
        differ = [key for key in sorted(set(header) | set(self.header)) if header.get(key) != self.header.get(key)]
        if differ:
            raise ValueError(f"{self.folder} was written for other inputs or settings ({', '.join(differ)} differ): "
                             "run with the interrupted run's, or delete it to start again")
        return {int(path.stem) for path in self.folder.glob("*.parquet") if path.stem.isdigit()}

    def write(self, index: int, records: list[dict[str, Any]], report: UnitReport, abstain_bias: float) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = parquet_schema(SHARD_RECORD_FIELDS, {"report": json.dumps(asdict(report)),
                                                      "abstain_bias": json.dumps(abstain_bias)})
        with atomic_path(self._part(index)) as tmp:
            pq.write_table(pa.Table.from_pylist(records, schema=schema), tmp)

    def report(self, index: int) -> tuple[UnitReport, float]:
        """A finished unit's report and the abstain bias it was scored with."""
        import pyarrow.parquet as pq

        metadata = pq.read_schema(self._part(index)).metadata or {}
        return UnitReport(**json.loads(metadata[b"report"])), json.loads(metadata[b"abstain_bias"])

    def records(self, indices: Sequence[int]) -> Iterator[dict[str, Any]]:
        """The records of the units ``indices``, in that order, one row group at a time."""
        import pyarrow.parquet as pq

        for index in indices:
            part = pq.ParquetFile(self._part(index))
            for group in range(part.num_row_groups):
                yield from part.read_row_group(group).to_pylist()

    def finish(self, units: Sequence[Unit], output: Path) -> ScoreSummary:
        """Write every unit's records to ``output`` in unit order (atomically) and remove the parts folder;
        the summary counts the damaged units too. A parquet output records each unit's ``[path, row group, rows, errors]`` in its metadata (``units``: the
        rows of a unit are contiguous, so a reader can slice them without a column for it) and the run's
        fingerprint (``header``)."""
        indices = range(len(units))
        abstain_bias = self.report(0)[1]
        reports = [self.report(i)[0] for i in indices]
        rows = [[unit.path, unit.row_group, report.samples, len(report.errors)]
                for unit, report in zip(units, reports)]
        summary = write_records(self.records(indices), output, abstain_bias, SHARD_RECORD_FIELDS,
                                {"units": json.dumps(rows), "header": json.dumps(self.header)})
        shutil.rmtree(self.folder)
        summary.damaged_units = sum(bool(report.errors) for report in reports)
        return summary
