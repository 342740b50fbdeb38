"""Score a file of (image, caption) pairs as a stream, resumably (``halo-embed score --pairs``).

A :class:`~torch.utils.data.DataLoader` decodes and transforms the images and
tokenizes the captions in worker processes while the model scores the batch
before; batches arrive in row order. Every finished batch is appended to a
journal next to the output (``<output>.partial.jsonl``: a header line that
fingerprints the inputs and settings, then one JSON line per input row), so a
run that is killed loses at most the batch in flight and ``--resume`` goes on
from the last complete batch. When every row is in the journal it becomes the
output file in one atomic step and the journal is removed.

Batches are cut at multiples of the batch size counted from the first row,
also after a resume, so a resumed run scores exactly the batches an
uninterrupted one would: the output is identical to the last bit.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..data.images import ImageLoadError, load_image
from ..data.tables import CSVRow
from ..io import atomic_path

__all__ = ["JOURNAL_FORMAT", "RECORD_FIELDS", "PairCollate", "PairRows", "ScoreJournal", "ScoreSummary", "context_length",
           "pair_batches", "score_batch", "write_records", "write_scores"]

JOURNAL_FORMAT = "halo-embed/score-journal/1"
#: The fields of one output row, in the output's column order.
RECORD_FIELDS = ("row", "line", "image", "text", "probability", "accept", "logit", "cosine", "truncated", "error")
#: The prefix of the error of a caption rejected by --strict-text (counted as too long in the summary).
TOO_LONG = "caption longer than the"


class PairRows(Dataset):
    """Rows ``first + 1 ... len(rows)`` of a pairs file as ``(record, pixels or None)``.

    A row that cannot be scored (undecodable text, empty caption or path,
    missing / unreadable / oversized image) comes back with its ``error`` set
    and no pixels; nothing raises for a bad row.
    """

    def __init__(self, rows: Sequence[CSVRow], image_column: str, text_column: str, root: Path,
                 transform: Callable, max_pixels: int | None, first: int = 0) -> None:
        self.rows, self.image_column, self.text_column = rows, image_column, text_column
        self.root, self.transform, self.max_pixels, self.first = root, transform, max_pixels, first

    def __len__(self) -> int:
        return len(self.rows) - self.first

    def __getitem__(self, index: int) -> tuple[dict[str, Any], Tensor | None]:
        number = self.first + index + 1
        row = self.rows[number - 1]
        image_path = (row.values.get(self.image_column) or "").strip()
        text = (row.values.get(self.text_column) or "").strip()
        record = dict.fromkeys(RECORD_FIELDS)
        record.update(row=number, line=row.line, image=image_path, text=text)
        try:
            if row.error:
                raise ValueError(row.error)
            if not text:
                raise ValueError("empty caption")
            if not image_path:
                raise ValueError("empty image path")
            path = Path(image_path)
            image = load_image(path if path.is_absolute() else self.root / path, max_pixels=self.max_pixels)
            return record, self.transform(image)
        except (ImageLoadError, ValueError) as error:
            record["error"] = str(error)
            return record, None


class PairCollate:
    """Stack the good rows' pixels and tokenize their captions (in the worker, with the truncation check)."""

    def __init__(self, tokenize_checked: Callable) -> None:
        self.tokenize_checked = tokenize_checked

    def __call__(self, items: list[tuple[dict[str, Any], Tensor | None]]) -> dict[str, Any]:
        records = [record for record, _ in items]
        good = [i for i, (_, pixels) in enumerate(items) if pixels is not None]
        batch: dict[str, Any] = {"records": records, "good": good, "pixels": None, "tokens": None, "truncated": None}
        if good:
            batch["pixels"] = torch.stack([items[i][1] for i in good])
            batch["tokens"], batch["truncated"] = self.tokenize_checked([records[i]["text"] for i in good])
        return batch


def pair_batches(rows: PairRows, tokenize_checked: Callable, batch_size: int, workers: int,
                 pin_memory: bool = False) -> DataLoader:
    """Batches of ``rows`` in order: ``{"records", "good", "pixels", "tokens", "truncated"}``."""
    return DataLoader(rows, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory,
                      collate_fn=PairCollate(tokenize_checked), prefetch_factor=4 if workers else None)


def _select(tokens: Any, keep: list[int]) -> Any:
    index = torch.tensor(keep, dtype=torch.long)
    if isinstance(tokens, dict):
        return {key: value[index] for key, value in tokens.items()}
    return tokens[index]


def context_length(scorer: Any) -> int | None:
    """The tokens the scorer's text tower reads (``None``: a backbone that cannot tell)."""
    try:
        return scorer.model.backbone.context_length
    except NotImplementedError:
        return None


def score_batch(scorer: Any, batch: dict[str, Any], strict_text: bool) -> list[dict]:
    """Fill in the batch's records: scores for the good rows, an error for captions ``strict_text`` rejects."""
    records, good, flags = batch["records"], batch["good"], batch["truncated"]
    keep = list(range(len(good)))
    if flags is not None:
        for position, i in enumerate(good):
            if bool(flags[position]) and strict_text:
                records[i]["error"] = (f"{TOO_LONG} {context_length(scorer)} tokens the text tower reads "
                                       "(--strict-text)")
        keep = [p for p in keep if not (strict_text and bool(flags[p]))]
    if keep:
        full = len(keep) == len(good)
        pixels = batch["pixels"] if full else batch["pixels"][torch.tensor(keep)]
        tokens = batch["tokens"] if full else _select(batch["tokens"], keep)
        scores = scorer.score_preprocessed(pixels, tokens)
        scores.truncated = None if flags is None else flags[keep]
        for position, scored in zip(keep, scores.to_records()):
            records[good[position]].update(scored)
    return records


@dataclass
class ScoreSummary:
    rows: int = 0
    scored: int = 0
    accepted: int = 0
    too_long: int = 0
    damaged_units: int = 0  # shards / row groups read only up to their damage (a corrupt tar)

    def add(self, record: dict[str, Any]) -> None:
        self.rows += 1
        if record["error"] is None:
            self.scored += 1
            self.accepted += bool(record["accept"])
        if record["truncated"] is True or (record["error"] or "").startswith(TOO_LONG):
            self.too_long += 1


class ScoreJournal:
    """The rows scored so far: a header line, then one JSON line per row, appended one batch at a time.

    Args:
        path: the journal file.
        header: what must match for a resume (inputs, checkpoint, settings).
        batch_size: rows per batch of this run (the resume point is a multiple of the interrupted run's).
    """

    def __init__(self, path: Path, header: dict[str, Any], batch_size: int) -> None:
        self.path, self.header, self.batch_size = Path(path), header, batch_size
        self._handle = None
        self._last_sync = time.monotonic()

    def start(self) -> None:
        """Create the journal (it must not exist)."""
        self._handle = open(self.path, "x", encoding="utf-8")
        self._handle.write(json.dumps({"format": JOURNAL_FORMAT, "batch_size": self.batch_size,
                                       **self.header}) + "\n")
        self._handle.flush()

    def resume(self) -> int:
        """Reopen an interrupted run's journal; returns the rows kept (whole batches of that run) and takes
        that run's batch size (:attr:`batch_size`).

        Raises:
            ValueError: the journal is not one, or was written for other inputs or settings (named).
        """
        with open(self.path, "rb") as handle:
            data = handle.read()
        lines = data.split(b"\n")
        try:
            header = json.loads(lines[0])
            if header.pop("format") != JOURNAL_FORMAT:
                raise ValueError
            old_batch = int(header.pop("batch_size"))
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{self.path} is not a halo-embed score journal: delete it to start again") from None
        differ = [key for key in sorted(set(header) | set(self.header)) if header.get(key) != self.header.get(key)]
        if differ:
            raise ValueError(f"{self.path} was written for other inputs or settings ({', '.join(differ)} "
                             "differ): run with the interrupted run's, or delete it to start again")
        self.batch_size = old_batch  # the rest is scored in the interrupted run's batches
        complete = lines[1:-1]  # the text after the last newline is a row cut off by the interruption
        done = len(complete) - len(complete) % old_batch  # a batch cut off part-way is scored again
        keep = len(lines[0]) + 1 + sum(len(line) + 1 for line in complete[:done])
        self._handle = open(self.path, "r+", encoding="utf-8")
        self._handle.truncate(keep)
        self._handle.seek(keep)
        return done

    def append(self, records: list[dict[str, Any]]) -> None:
        self._handle.write("".join(json.dumps(record) + "\n" for record in records))
        self._handle.flush()  # a killed process loses nothing written; fsync bounds what a machine crash loses
        if time.monotonic() - self._last_sync > 10:
            os.fsync(self._handle.fileno())
            self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def records(self) -> Iterator[dict[str, Any]]:
        with open(self.path, encoding="utf-8") as handle:
            next(handle)
            for line in handle:
                yield json.loads(line)


def write_scores(journal: ScoreJournal, output: Path, abstain_bias: float) -> ScoreSummary:
    """Turn a complete journal into ``output`` atomically (see :func:`write_records`)."""
    return write_records(journal.records(), output, abstain_bias, RECORD_FIELDS)


#: the parquet type of each output field (CSV rows and shard samples)
FIELD_TYPES = {"row": "int64", "line": "int64", "image": "string", "text": "string", "key": "string",
               "shard": "string", "probability": "float64", "accept": "bool_", "logit": "float64",
               "cosine": "float64", "truncated": "bool_", "error": "string"}


def parquet_schema(fields: Sequence[str], metadata: dict[str, str] | None = None):
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, FIELD_TYPES[name])()) for name in fields], metadata=metadata)


def write_records(records: Iterable[dict[str, Any]], output: Path, abstain_bias: float,
                  fields: Sequence[str], metadata: dict[str, str] | None = None) -> ScoreSummary:
    """Write scored records to ``output`` atomically: ``.csv``, ``.json`` (``{"abstain_bias", "pairs"}``) or
    ``.parquet`` (the abstain bias and ``metadata`` in the file's metadata), a chunk at a time (memory stays
    flat for any number of rows); returns the counts for the summary line."""
    summary = ScoreSummary()
    suffix = output.suffix.lower()
    with atomic_path(output) as tmp:
        if suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = parquet_schema(fields, {"abstain_bias": json.dumps(abstain_bias), **(metadata or {})})
            with pq.ParquetWriter(tmp, schema) as writer:
                chunk: list[dict[str, Any]] = []
                for record in records:
                    summary.add(record)
                    chunk.append(record)
                    if len(chunk) == 65536:
                        writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
                        chunk = []
                writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
            return summary
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            if suffix == ".json":
                handle.write(f'{{"abstain_bias": {json.dumps(abstain_bias)}, "pairs": [')
                for record in records:
                    handle.write(("\n  " if summary.rows == 0 else ",\n  ") + json.dumps(record))
                    summary.add(record)
                handle.write("\n]}\n")
            else:
                writer = csv.DictWriter(handle, fieldnames=list(fields))
                writer.writeheader()
                for record in records:
                    writer.writerow({key: _spreadsheet_safe(value) for key, value in record.items()})
                    summary.add(record)
    return summary


#: a cell starting with one of these is a formula to a spreadsheet (OWASP's CSV injection list)
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _spreadsheet_safe(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula, prefixed with ``'`` (shown, not evaluated);
    numbers and other values unchanged. The JSON output keeps the text as it is."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value
