"""``halo-embed filter``: keep the image-text pairs that belong together, as new webdataset shards.

    halo-embed filter --checkpoint CKPT --input 'pool/{00000..00999}.tar' --output-dir kept/
    halo-embed filter ... --top-fraction 0.3                 # the best 30 % by p(aligned) instead
    halo-embed filter ... --engine ray --ray-address HEAD:6379

DataComp's filtering track in one command: score the whole pool
(``halo-embed score``'s units, engines and resume), keep the pairs HALO
accepts (the sink loses to the caption; no threshold to tune) or the top
fraction by probability, and write

- ``kept/scores.parquet``: every pair's key, shard, caption, probability, accept, logit and the towers' cosine;
- ``kept/shards/00000.tar ...``: the kept samples, every file of each sample copied byte for byte, one output
  shard per input unit that keeps anything, numbered without gaps;
- ``kept/index.parquet`` (written last: its presence means the filter finished): the kept keys with their
  probability and the output shard that holds them.

``halo-embed finetune --dataset-type webdataset --train-data 'kept/shards/{00000..0NNNN}.tar'
--train-num-samples N`` trains on the result (the command prints it). A killed
filter goes on with ``--resume``: the finished units' scores are kept, the
shards are written again. Exit status as ``score``: 1 when samples were skipped.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from .score import add_scoring_arguments, check_scoring_args

HELP = "keep the pairs HALO accepts (or the top fraction), as new webdataset shards with a parquet index"

SHARD_DIGITS = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--output-dir", required=True, help="folder for scores.parquet, shards/ and index.parquet")
    data.add_argument("--top-fraction", type=float, default=None,
                      help="keep this share of the scored pairs, highest probability first (e.g. 0.3); default: "
                           "the pairs HALO accepts (the caption beats the abstain sink)")
    add_scoring_arguments(parser, data, "--input")


#: the columns of scores.parquet the selection reads (captions stay on disk)
SELECTION_COLUMNS = ["key", "probability", "accept", "logit", "cosine", "error"]


def _scored_probabilities(scores) -> Iterator[Any]:
    """The probabilities of the scored rows, one row group at a time, as non-negative float64 arrays."""
    import numpy as np

    for group in range(scores.num_row_groups):
        table = scores.read_row_group(group, columns=["probability", "error"])
        scored = table.column("error").is_null().to_numpy(zero_copy_only=False)
        values = table.column("probability").fill_null(0.0).to_numpy(zero_copy_only=False).astype(np.float64)
        yield np.abs(values[scored]) + 0.0  # +0.0 turns a -0.0 into 0.0: the bit order below needs it


def top_threshold(scores, count: int) -> tuple[float, int]:
    """``(t, ties)``: the ``count``-th largest probability among the scored rows of ``scores`` (a
    ``pyarrow.parquet.ParquetFile``), and how many rows equal to ``t`` complete ``count`` after every row
    above it. Exact, in four passes over the column with a 65,536-bin histogram each (memory does not grow
    with the pool): non-negative float64 values order like their bit patterns, 16 bits per pass."""
    import numpy as np

    prefix, remaining = 0, count
    for shift in (48, 32, 16, 0):
        counts = np.zeros(65536, dtype=np.int64)
        for values in _scored_probabilities(scores):
            bits = values.view(np.uint64)
            if shift < 48:
                bits = bits[(bits >> np.uint64(shift + 16)) == np.uint64(prefix)]
            counts += np.bincount(((bits >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.int64), minlength=65536)
        above = np.cumsum(counts[::-1])  # rows in this bin or a higher one
        step = int(np.searchsorted(above, remaining))  # the first bin, from the top, that reaches count
        remaining -= int(above[step - 1]) if step else 0
        prefix = (prefix << 16) | (65535 - step)
    return float(np.array([prefix], dtype=np.uint64).view(np.float64)[0]), remaining


class Selection:
    """Which rows to keep, decided row group by row group in the scores' order: the accepted ones, or (with
    ``threshold``) those above it and the first ``ties`` rows equal to it."""

    def __init__(self, threshold: tuple[float, int] | None) -> None:
        self.threshold, self.ties = (threshold[0], threshold[1]) if threshold else (None, 0)

    def mask(self, table) -> Any:
        import numpy as np

        scored = table.column("error").is_null().to_numpy(zero_copy_only=False)
        if self.threshold is None:
            return scored & table.column("accept").fill_null(False).to_numpy(zero_copy_only=False)
        values = np.abs(table.column("probability").fill_null(-1.0).to_numpy(zero_copy_only=False)) + 0.0
        keep = scored & (values > self.threshold)
        tied = np.flatnonzero(scored & (values == self.threshold))[: self.ties]
        keep[tied] = True
        self.ties -= len(tied)
        return keep


def unit_tables(scores, units_rows: list) -> Iterator[tuple[int, Any]]:
    """``(unit index, its rows)`` in order: the scores of each unit are contiguous, their counts in the
    file's metadata; row groups are read one at a time."""
    import pyarrow as pa

    pending, group = None, 0
    for index, (_, _, rows, *_) in enumerate(units_rows):
        while (pending.num_rows if pending is not None else 0) < rows:
            part = scores.read_row_group(group, columns=SELECTION_COLUMNS)
            group += 1
            pending = part if pending is None else pa.concat_tables([pending, part])
        if pending is None:
            pending = scores.schema_arrow.empty_table().select(SELECTION_COLUMNS)
        yield index, pending.slice(0, rows)
        pending = pending.slice(rows)


def _encoded(image: Any) -> tuple[str, bytes]:
    """A parquet row's image as a shard file: its bytes (read from its path if it is one) and the extension
    of its format."""
    from PIL import Image

    data = Path(image).read_bytes() if isinstance(image, str) else bytes(image)
    with Image.open(io.BytesIO(data)) as opened:
        extension = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(opened.format)
    if extension is None:  # another format: stored as PNG, which every reader decodes
        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").save(buffer, format="PNG")
        return "png", buffer.getvalue()
    return extension, data


def reshard_unit(job: dict[str, Any]) -> list[str]:
    """Write one output shard: the samples of ``job["unit"]`` whose keys are in ``job["keys"]``, in their
    stored order (a Ray task's work, or the streaming path's loop); returns the keys written."""
    from ..data.shards import UnitReport, parquet_columns, read_unit, write_shard

    unit, keys, settings = job["unit"], set(job["keys"]), job["settings"]
    columns = None if unit.row_group is None else parquet_columns(unit.path, settings.key_column,
                                                                  settings.image_column, settings.text_column)
    written: list[str] = []

    def samples() -> Iterator[tuple[str, dict[str, bytes]]]:
        for raw in read_unit(unit, UnitReport(), columns, keep_files=True):
            if raw.key not in keys:
                continue
            written.append(raw.key)
            if raw.files:
                yield raw.key, raw.files
            else:  # a parquet row
                extension, data = _encoded(raw.image)
                yield raw.key, {extension: data, "txt": raw.text.encode("utf-8")}

    write_shard(job["path"], samples())
    return written


def run(args: argparse.Namespace) -> int:
    from ..data.shards import input_kind
    from ..io import claim_for
    from .score import print_summary, score_settings, score_to_output, scoring_units, units_header

    check_scoring_args(args)
    if args.top_fraction is not None and not 0 < args.top_fraction <= 1:
        raise ValueError(f"--top-fraction must be in (0, 1], got {args.top_fraction}")
    kind = input_kind(args.pairs) if args.input_type == "auto" else args.input_type
    if kind == "csv":
        raise ValueError(f"--input {args.pairs} is not webdataset shards or parquet: halo-embed filter reads "
                         "those (score a CSV with halo-embed score)")
    folder = Path(args.output_dir)
    if folder.is_file():
        raise ValueError(f"--output-dir {folder} is a file")
    units = scoring_units(args, kind, "--input")
    folder.mkdir(parents=True, exist_ok=True)
    with claim_for(folder, f"--output-dir {folder}"):
        index = folder / "index.parquet"
        if index.exists():
            raise ValueError(f"--output-dir {folder} holds a finished filter ({index}): a finished run is never "
                             "overwritten; choose another folder")
        scores_path = folder / "scores.parquet"
        if (scores_path.exists() or (folder / "shards").exists()) and not args.resume:
            raise ValueError(f"an interrupted filter left {folder}: add --resume to go on, or choose another folder")
        start = time.perf_counter()
        settings = score_settings(args)
        args.output = str(scores_path)
        if scores_path.exists():  # scored before the interruption: only the selection and the shards remain
            summary = _finished_scores(scores_path, units_header(args, units, settings))
        else:
            summary = score_to_output(args, units, scores_path, settings)
        code = print_summary(args, summary, len(units), time.perf_counter() - start)
        kept, shards = _write_kept(args, units, scores_path, folder, settings, summary.scored)
    pattern = (f"{folder / 'shards'}/{{{0:0{SHARD_DIGITS}d}..{shards - 1:0{SHARD_DIGITS}d}}}.tar" if shards
               else None)
    rule = "accepted" if args.top_fraction is None else f"top {args.top_fraction:g}"
    print(f"kept {kept} of {summary.scored} scored pairs ({rule}) in {shards} shard(s); index {index}"
          + (f"\ntrain on them: halo-embed finetune --dataset-type webdataset --train-data '{pattern}' "
             f"--train-num-samples {kept}" if kept else ""), file=sys.stderr)
    return code


def _finished_scores(path: Path, header: dict[str, Any]):
    """The summary of an interrupted filter's finished ``scores.parquet``, which must have been scored from
    the same inputs, checkpoint and settings."""
    import pyarrow.parquet as pq

    from ..clip.pair_stream import ScoreSummary

    scores = pq.ParquetFile(path)
    if json.loads(scores.schema_arrow.metadata.get(b"header", b"null")) != json.loads(json.dumps(header)):
        raise ValueError(f"{path} was scored from other inputs, checkpoint or settings: run with the interrupted "
                         "filter's, or choose another --output-dir")
    summary = ScoreSummary()
    for group in range(scores.num_row_groups):
        for record in scores.read_row_group(group, columns=["probability", "accept", "truncated", "error"]).to_pylist():
            summary.add(record)
    summary.damaged_units = sum(bool(unit[3]) for unit in json.loads(scores.schema_arrow.metadata[b"units"]))
    return summary


def _write_kept(args: argparse.Namespace, units, scores_path: Path, folder: Path, settings,
                scored: int) -> tuple[int, int]:
    """The selection among the ``scored`` pairs, its shards and the index (last), streaming: one unit's rows
    and keys at a time (a window of units in flight on Ray); returns (pairs kept, shards written)."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..data.shards import Unit
    from ..io import atomic_path, is_remote

    scores = pq.ParquetFile(scores_path)
    units_rows = json.loads(scores.schema_arrow.metadata[b"units"])
    threshold = None
    if args.top_fraction is not None:
        count = math.ceil(args.top_fraction * scored)
        threshold = top_threshold(scores, count) if count else (float("inf"), 0)
    selection = Selection(threshold)
    shards = folder / "shards"
    shards.mkdir(exist_ok=True)
    for stale in shards.glob("*.tar"):  # a resumed filter writes its shards again
        stale.unlink()

    def jobs() -> Iterator[dict[str, Any]]:
        written = 0
        for index, table in unit_tables(scores, units_rows):
            kept = table.filter(pa.array(selection.mask(table)))
            if kept.num_rows == 0:
                continue
            unit = units[index]
            # absolute paths, so that a Ray task on another node reads and writes the same files
            yield {"unit": Unit(unit.path if is_remote(unit.path) else os.path.abspath(unit.path), unit.row_group),
                   "source": unit.path, "keys": kept.column("key").to_pylist(), "settings": settings,
                   "rows": kept, "path": str((shards / f"{written:0{SHARD_DIGITS}d}.tar").resolve())}
            written += 1

    schema = pa.schema([("key", pa.string()), ("probability", pa.float64()), ("accept", pa.bool_()),
                        ("logit", pa.float64()), ("cosine", pa.float64()), ("source_shard", pa.string()),
                        ("shard", pa.string())])
    rule = {"rule": "accepted" if args.top_fraction is None else "top_fraction", "top_fraction": args.top_fraction,
            "input": args.pairs, "checkpoint": str(Path(args.checkpoint).resolve())}
    kept_rows = shard_count = 0
    with atomic_path(folder / "index.parquet") as tmp, \
            pq.ParquetWriter(tmp, schema.with_metadata({"filter": json.dumps(rule)})) as index:
        for job, keys in _run_jobs(args, jobs()):
            written = set(keys)  # a sample that vanished since scoring has no shard
            rows = job["rows"]
            names = [job["path"] if key in written else None for key in rows.column("key").to_pylist()]
            index.write_table(pa.table({
                "key": rows.column("key"), "probability": rows.column("probability"),
                "accept": rows.column("accept"), "logit": rows.column("logit"), "cosine": rows.column("cosine"),
                "source_shard": pa.array([job["source"]] * rows.num_rows, pa.string()),
                "shard": pa.array(names, pa.string())}, schema=schema))
            kept_rows += rows.num_rows
            shard_count += 1
    return kept_rows, shard_count


def _run_jobs(args: argparse.Namespace, jobs: Iterator[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], list[str]]]:
    """``(job, keys written)`` of each reshard job, in the jobs' order: here, or as Ray tasks (a window of
    them in flight)."""
    if args.engine != "ray":
        for job in jobs:
            yield job, reshard_unit(job)
        return
    from ..clip.ray_engine import run_tasks

    yield from run_tasks(reshard_unit, jobs, args.ray_address, drop=("rows",))
