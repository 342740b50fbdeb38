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
    keep = data.add_mutually_exclusive_group()
    keep.add_argument("--keep", default="accepted", choices=("accepted",),
                      help="accepted (default): the pairs whose caption beats the abstain sink")
    keep.add_argument("--top-fraction", type=float, default=None,
                      help="instead: this share of the scored pairs, highest probability first (e.g. 0.3)")
    add_scoring_arguments(parser, data, "--input")


def _kept_mask(scores, top_fraction: float | None):
    """Which rows to keep: the accepted ones, or the ``top_fraction`` of scored rows by probability (ties
    by position, so the choice is the same on every run)."""
    import numpy as np

    error = scores.column("error").is_null().to_numpy(zero_copy_only=False)
    if top_fraction is None:
        accept = scores.column("accept").fill_null(False).to_numpy(zero_copy_only=False)
        return accept & error
    probability = scores.column("probability").fill_null(-1.0).to_numpy(zero_copy_only=False)
    count = math.ceil(top_fraction * int(error.sum()))
    order = np.argsort(-np.where(error, probability, -np.inf), kind="stable")[:count]
    mask = np.zeros(len(probability), dtype=bool)
    mask[order] = True
    return mask


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
    from .score import _summarise, score_settings, score_to_output, scoring_units

    check_scoring_args(args)
    if args.top_fraction is not None and not 0 < args.top_fraction <= 1:
        raise ValueError(f"--top-fraction must be in (0, 1], got {args.top_fraction}")
    kind = input_kind(args.pairs) if args.input_type == "auto" else args.input_type
    if kind == "csv":
        raise ValueError(f"--input {args.pairs} is not webdataset shards or parquet: halo-embed filter writes "
                         "shards of shards (score a CSV with halo-embed score)")
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
            from ..clip.pair_stream import ScoreSummary

            summary, damaged = ScoreSummary(), 0
            for record in _read_records(scores_path):
                summary.add(record)
        else:
            summary, damaged = score_to_output(args, units, scores_path, settings)
        code = _summarise(args, summary, damaged, len(units), time.perf_counter() - start)
        kept, shards = _write_kept(args, units, scores_path, folder, settings)
    pattern = (f"{folder / 'shards'}/{{{0:0{SHARD_DIGITS}d}..{shards - 1:0{SHARD_DIGITS}d}}}.tar" if shards
               else None)
    rule = "accepted" if args.top_fraction is None else f"top {args.top_fraction:g}"
    print(f"kept {kept} of {summary.scored} scored pairs ({rule}) in {shards} shard(s); index {index}"
          + (f"\ntrain on them: halo-embed finetune --dataset-type webdataset --train-data '{pattern}' "
             f"--train-num-samples {kept}" if kept else ""), file=sys.stderr)
    return code


def _read_records(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    scores = pq.ParquetFile(path)
    for group in range(scores.num_row_groups):
        yield from scores.read_row_group(group).to_pylist()


def _write_kept(args: argparse.Namespace, units, scores_path: Path, folder: Path, settings) -> tuple[int, int]:
    """The selection, its shards and the index (last); returns (pairs kept, shards written)."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..data.shards import Unit
    from ..io import atomic_path

    columns = ["key", "shard", "probability", "accept", "logit", "cosine", "error"]
    scores = pq.read_table(scores_path, columns=columns)  # one row per pair, no captions: small beside the pool
    kept = scores.filter(pa.array(_kept_mask(scores, args.top_fraction)))
    by_path: dict[str, list[str]] = {}
    for key, shard in zip(kept.column("key").to_pylist(), kept.column("shard").to_pylist()):
        by_path.setdefault(shard, []).append(key)
    shards = folder / "shards"
    shards.mkdir(exist_ok=True)
    for stale in shards.glob("*.tar"):  # a resumed filter writes its shards again
        stale.unlink()
    # one job per unit that may keep something (a parquet file's row groups each look for the file's keys);
    # absolute paths, so that a Ray task on another node reads and writes the same files
    jobs = [{"unit": Unit(os.path.abspath(unit.path) if "://" not in unit.path else unit.path, unit.row_group),
             "source": unit.path, "keys": by_path[unit.path], "settings": settings,
             "path": str((shards / f"part-{n:08d}.tar").resolve())}
            for n, unit in enumerate(units) if unit.path in by_path]
    written = _run_jobs(args, jobs)
    shard_of, count = {}, 0
    for job, keys in zip(jobs, written):
        if not keys:
            Path(job["path"]).unlink()
            continue
        final = shards / f"{count:0{SHARD_DIGITS}d}.tar"  # numbered without gaps, in the input's order
        os.replace(job["path"], final)
        count += 1
        for key in keys:
            shard_of[(job["source"], key)] = str(final)
    shard_names = [shard_of.get((s, k)) for s, k in zip(kept.column("shard").to_pylist(), kept.column("key").to_pylist())]
    index = kept.select(["key", "probability", "accept", "logit", "cosine"]).append_column(
        "source_shard", kept.column("shard")).append_column("shard", pa.array(shard_names, pa.string()))
    rule = {"rule": "accepted" if args.top_fraction is None else "top_fraction", "top_fraction": args.top_fraction,
            "input": args.pairs, "checkpoint": str(Path(args.checkpoint).resolve())}
    with atomic_path(folder / "index.parquet") as tmp:
        pq.write_table(index.replace_schema_metadata({"filter": json.dumps(rule)}), tmp)
    return index.num_rows, count


def _run_jobs(args: argparse.Namespace, jobs: list[dict[str, Any]]) -> list[list[str]]:
    if args.engine != "ray":
        return [reshard_unit(job) for job in jobs]
    from ..clip.ray_engine import run_tasks

    return run_tasks(reshard_unit, jobs, args.ray_address)
