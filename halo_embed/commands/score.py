"""``halo-embed score``: does this caption belong to this image? (HALO's built-in threshold)

Single pair:  halo-embed score --checkpoint CKPT --image dog.jpg --text "a dog on the grass"
Batch:        halo-embed score --checkpoint CKPT --pairs pairs.csv --output scores.csv   (or .json, .parquet)
Shards:       halo-embed score --checkpoint CKPT --pairs 'shards/{00000..00099}.tar' --output scores.parquet
Parquet:      halo-embed score --checkpoint CKPT --pairs pool/ --output scores.parquet  (image bytes or paths)
On Ray:       ... --engine ray [--ray-address HOST:6379] [--ray-workers N]

Webdataset shards and parquet files are scored one unit (a shard, a row
group) at a time, on this machine or on Ray Data actors with the same
answer; each finished unit is kept in ``<output>.parts/``, and ``--resume``
goes on at unit granularity (see :mod:`halo_embed.clip.shard_scoring`).
A truncated or corrupt tar, a sample without an image or caption and an image
that does not decode are skipped and counted per shard.

The batch form streams: worker processes decode the images and tokenize the
captions (--workers) while the model scores the batch before, a progress bar
counts the pairs, and every finished batch is appended to
``<output>.partial.jsonl``; a killed run goes on from its last complete batch
with ``--resume`` and writes the same output as an uninterrupted one. At the
end the output appears in one step and the summary gives pairs per second.
Each bad row (missing, unreadable or oversized image, empty text, a row that is
not UTF-8; with --strict-text a caption longer than the text tower reads) is
reported on stderr with its file and line and written with its error; the rest
are scored. A finished output is never overwritten. Exit status: 0 all scored,
1 some rows could not be scored, 2 a usage or input error (bad arguments,
missing or damaged checkpoint, unreadable CSV, an existing output; checked
before anything is scored), 3 an internal error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..data.images import DEFAULT_MAX_PIXELS
from ..io import file_stamp

#: Image decoding dominates on a GPU: as many workers as cores, up to 8.
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)

HELP = "probability that an image and a caption belong together, with accept/reject"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    single = parser.add_argument_group("one pair")
    single.add_argument("--image", help="image file")
    single.add_argument("--text", help="caption")
    parser.add_argument("--json", action="store_true", help="single pair: print JSON instead of a sentence")
    batch = parser.add_argument_group("many pairs")
    batch.add_argument("--output", help="scores file, .csv, .json or .parquet (default: print JSON lines)")
    batch.add_argument("--image-root", help="folder that relative image paths are relative to (default: the CSV's folder)")
    add_scoring_arguments(parser, batch, "--pairs")


def add_scoring_arguments(parser: argparse.ArgumentParser, batch, pairs_flag: str) -> None:
    """The model, input and engine options ``score`` and ``filter`` share."""
    parser.add_argument("--checkpoint", required=True, help="a HALOCLIP checkpoint folder (model.safetensors + config.json)")
    batch.add_argument(pairs_flag, dest="pairs", required=pairs_flag != "--pairs",
                       help=("CSV/TSV with an image path column and a caption column; " if pairs_flag == "--pairs"
                             else "") + "webdataset shards ('shards/{00000..00009}.tar', '::'-separated lists, "
                                        "globs); or parquet files (a file, a folder, a pattern)")
    batch.add_argument("--input-type", default="auto", choices=("auto", "csv", "webdataset", "parquet"),
                       help=f"how to read {pairs_flag} (default: from its name)")
    batch.add_argument("--image-column", help="image column (CSV default: open_clip's filepath, else image; parquet: "
                                              "jpg, image, ... holding bytes, an HF image struct or a path)")
    batch.add_argument("--text-column", help="caption column (CSV default: open_clip's title, else caption; "
                                             "parquet: txt, caption, text, title)")
    batch.add_argument("--key-column", help="parquet: the pair's key column (default: key, uid, __key__ or id; "
                                            "else file:row group:row)")
    batch.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                       help=f"processes that decode images and tokenize captions (default {DEFAULT_WORKERS}: "
                            "the CPU count, at most 8; 0: in the main process)")
    batch.add_argument("--resume", action="store_true",
                       help="go on from where an interrupted run with the same output stopped")
    engine = parser.add_argument_group("engine (shards and parquet)")
    engine.add_argument("--engine", default="stream", choices=("stream", "ray"),
                        help="stream: this process, --workers decoding; ray: Ray Data actors, one per GPU or per "
                             "--ray-cpus-per-worker cores (pip install 'halo-embed[ray]')")
    engine.add_argument("--ray-address", default=None,
                        help="a running Ray cluster (HOST:PORT of `ray start --head`, or 'auto'); default: a local "
                             "Ray instance on this machine")
    engine.add_argument("--ray-workers", type=int, default=None,
                        help="scorer actors (default: one per GPU, else the CPUs / --ray-cpus-per-worker)")
    engine.add_argument("--ray-cpus-per-worker", type=int, default=1,
                        help="CPU cores per scorer actor without GPUs (default 1)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per forward pass (default 64)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of the scoring process (default: torch's, the cores); the same "
                             "count as --ray-cpus-per-worker gives bit-identical scores on both engines")
    parser.add_argument("--strict-text", action="store_true",
                        help="reject captions longer than the text tower reads (default: score their beginning "
                             "and warn)")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"reject larger images (default {DEFAULT_MAX_PIXELS:,})")


def _scorer(args: argparse.Namespace):
    from ..clip.scorer import AlignmentScorer

    return AlignmentScorer.from_checkpoint(args.checkpoint, device=args.device, batch_size=args.batch_size)


def _single(args: argparse.Namespace) -> int:
    from ..data.images import load_image

    if not args.text or not args.text.strip():
        raise ValueError("--text must be a non-empty caption")
    image = load_image(args.image, max_pixels=args.max_image_pixels)  # a clear error before the model is loaded
    scorer = _scorer(args)
    too_long = scorer.truncated([args.text])
    if too_long is not None and bool(too_long[0]):
        message = f"--text is longer than the {scorer.model.backbone.context_length} tokens the text tower reads"
        if args.strict_text:
            raise ValueError(f"{message} (--strict-text)")
        print(f"warning: {message}: only its beginning is scored", file=sys.stderr)
    record = scorer.score([image], [args.text]).to_records()[0]
    record.update(image=args.image, text=args.text, abstain_bias=scorer.abstain_bias)
    if args.json:
        print(json.dumps(record))
    else:
        verdict = "ACCEPT" if record["accept"] else "REJECT"
        print(f"{verdict}  p(belongs) = {record['probability']:.3f}  logit {record['logit']:.3f} vs abstain bias "
              f"{record['abstain_bias']:.3f}  ({args.image!r}, {args.text!r})")
    return 0


def checkpoint_stamp(checkpoint: str) -> list:
    """The checkpoint folder and its files' sizes and times (a resume must score with the same model)."""
    folder = Path(checkpoint).resolve()
    return [str(folder)] + ([[p.name, *file_stamp(p)[1:]] for p in sorted(folder.iterdir()) if p.is_file()]
                            if folder.is_dir() else [])  # a missing one: the loader says


def _journal_header(args: argparse.Namespace, pairs_path: Path, root: Path, columns: tuple[str, str]) -> dict:
    """What an interrupted run must share with its resume: the same inputs, checkpoint and row rules."""
    return {"pairs": file_stamp(pairs_path), "checkpoint": checkpoint_stamp(args.checkpoint),
            "image_column": columns[0], "text_column": columns[1], "image_root": str(root.resolve()),
            "strict_text": args.strict_text, "max_image_pixels": args.max_image_pixels}


def _batch(args: argparse.Namespace) -> int:
    from ..data.shards import input_kind
    from ..io import claim_for

    kind = input_kind(args.pairs) if args.input_type == "auto" else args.input_type
    units = None
    if kind == "csv":
        pairs_path = Path(args.pairs)
        if not pairs_path.is_file():
            raise FileNotFoundError(f"pairs file {'is a folder' if pairs_path.is_dir() else 'not found'}: {pairs_path}")
        if args.engine != "stream":
            raise ValueError("--engine ray reads webdataset shards and parquet files; a CSV is scored with the "
                             "default --engine stream")
    else:
        if args.engine == "ray" and not args.output:
            raise ValueError("--engine ray needs --output (its actors write the scores next to it)")
        units = scoring_units(args, kind, "--pairs")
    if args.output:
        output = Path(args.output)
        if output.suffix.lower() not in (".csv", ".json", ".parquet"):
            raise ValueError(f"--output must end in .csv, .json or .parquet, got {args.output}")
        folder = output.parent
        if output.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ValueError(f"--output {args.output} cannot be written: "
                             + ("it is a folder" if output.is_dir() else f"the folder {folder} "
                                + ("is not writable" if folder.is_dir() else "does not exist")))
        # one process per output: a second one (a --resume of a run still going, the same command twice)
        # stops here, before it reads or writes anything
        with claim_for(output, f"--output {args.output}"):
            return _batch_owned(args, pairs_path, output) if units is None else _units_owned(args, units, output)
    if args.resume:
        raise ValueError("--resume needs --output (the scores of the interrupted run are kept next to it)")
    return _batch_owned(args, pairs_path, None) if units is None else _units_owned(args, units, None)


def scoring_units(args: argparse.Namespace, kind: str, flag: str):
    """The shard / parquet units of ``args.pairs``, and Ray reachable if asked for (before any model loads)."""
    from ..data.shards import list_units, parquet_columns

    units = list_units(args.pairs, kind, flag)
    if args.key_column is not None and kind != "parquet":
        raise ValueError("--key-column names a parquet column; a shard sample's key is its file name")
    if kind == "parquet":  # every file has the columns (its schema only is read)
        for path in dict.fromkeys(unit.path for unit in units):
            parquet_columns(path, args.key_column, args.image_column, args.text_column)
    if args.engine == "ray":
        from ..clip.ray_engine import check_ray

        check_ray(args.ray_address)
    return units


def score_settings(args: argparse.Namespace):
    from ..clip.shard_scoring import ScoreSettings

    return ScoreSettings(args.batch_size, args.max_image_pixels, args.strict_text, args.key_column,
                         args.image_column, args.text_column)


def units_header(args: argparse.Namespace, units, settings) -> dict:
    """What an interrupted unit run must share with its resume: the same units, checkpoint and settings."""
    from dataclasses import asdict

    return {"units": [[*file_stamp(unit.path), unit.row_group] for unit in units],
            "checkpoint": checkpoint_stamp(args.checkpoint), "settings": asdict(settings)}


def report_unit(units, index: int, report, write=print) -> None:
    """One stderr line for a unit with skipped samples or its own errors (a corrupt tar)."""
    if report.broken or report.errors:
        write(f"{units[index]}: {report.broken} of {report.samples} sample(s) skipped"
              + "".join(f"; {error}" for error in report.errors[:3])
              + (f" (and {len(report.errors) - 3} more errors)" if len(report.errors) > 3 else ""))


def score_units_to_parts(args: argparse.Namespace, units, store, done: set[int], settings) -> None:
    """Score every unit not in ``done`` into ``store``, on the engine ``args.engine`` asks for."""
    from tqdm.auto import tqdm

    from ..clip.shard_scoring import score_units_streaming

    todo = [(i, unit) for i, unit in enumerate(units) if i not in done]
    if done:
        print(f"resuming {store.folder}: {len(done)} of {len(units)} units were scored before", file=sys.stderr)
    if not todo:  # interrupted while the output was written: no model needed
        return
    with tqdm(total=len(units), initial=len(done), unit="unit", disable=None, file=sys.stderr) as bar:
        def finished(index: int, report) -> None:
            report_unit(units, index, report, lambda line: bar.write(line, file=sys.stderr))
            bar.update(1)

        if args.engine == "ray":
            from ..clip.ray_engine import score_units_ray

            score_units_ray(args.checkpoint, todo, settings, store, args.ray_address, args.ray_workers,
                            args.ray_cpus_per_worker, finished)
            return
        scorer = _scorer(args)

        def keep(index: int, records, report) -> None:
            store.write(index, records, report, scorer.abstain_bias)
            finished(index, report)

        score_units_streaming(scorer, todo, settings, args.workers, keep)


def _units_owned(args: argparse.Namespace, units, output: Path | None) -> int:
    """Score shard / parquet units (``--pairs`` not a CSV) into ``output`` or as JSON lines."""
    from ..clip.pair_stream import ScoreSummary
    from ..clip.shard_scoring import score_units_streaming

    settings = score_settings(args)
    start = time.perf_counter()
    if output is None:  # JSON lines as units finish, in the order they finish
        summary, scorer = ScoreSummary(), _scorer(args)

        def show(index: int, records, report) -> None:
            report_unit(units, index, report, lambda line: print(line, file=sys.stderr))
            summary.damaged_units += bool(report.errors)
            for record in records:
                summary.add(record)
            sys.stdout.write("".join(json.dumps(record) + "\n" for record in records))
            sys.stdout.flush()

        score_units_streaming(scorer, list(enumerate(units)), settings, args.workers, show)
        return print_summary(args, summary, len(units), time.perf_counter() - start)
    summary = score_to_output(args, units, output, settings)
    return print_summary(args, summary, len(units), time.perf_counter() - start)


def score_to_output(args: argparse.Namespace, units, output: Path, settings):
    """Score every unit into ``output`` through ``<output>.parts/`` (resumed with ``args.resume``);
    returns the output's :class:`~halo_embed.clip.pair_stream.ScoreSummary`."""
    from ..clip.shard_scoring import PartStore

    if output.exists():
        raise ValueError(f"{output} already exists: a finished run is never overwritten; choose another name")
    store = PartStore(output.with_name(output.name + ".parts"), units_header(args, units, settings))
    if store.folder.exists() and not args.resume:
        raise ValueError(f"an interrupted run left {store.folder}: add --resume to go on from where it stopped, or "
                         "delete it to start again")
    done = store.resume() if store.folder.exists() else set()  # checked before the model is loaded
    if not store.folder.exists():
        store.start()
    score_units_to_parts(args, units, store, done, settings)
    return store.finish(units, output)


def print_summary(args: argparse.Namespace, summary, units: int, seconds: float) -> int:
    bad, damaged_units = summary.rows - summary.scored, summary.damaged_units
    print(f"scored {summary.scored} of {summary.rows} pairs in {units} unit(s): {summary.accepted} accepted, "
          f"{summary.scored - summary.accepted} rejected"
          + (f"; {bad} sample(s) skipped" if bad else "")
          + (f"; {damaged_units} unit(s) damaged (read up to the damage)" if damaged_units else "")
          + (f"; {summary.too_long} caption(s) longer than the text tower reads" if summary.too_long else "")
          + (f"; wrote {args.output}" if args.output else "")
          + f"; {summary.rows} rows in {seconds:.1f} s ({summary.rows / max(seconds, 1e-9):.0f} pairs/s)",
          file=sys.stderr)
    return 1 if bad or damaged_units else 0


def _batch_owned(args: argparse.Namespace, pairs_path: Path, output: Path | None) -> int:
    """:func:`_batch` once this process owns ``output`` (or prints JSON lines)."""
    from tqdm.auto import tqdm

    from ..clip.pair_stream import (PairRows, ScoreJournal, ScoreSummary, context_length, pair_batches, score_batch,
                                    write_scores)
    from ..data.tables import CAPTION_COLUMNS, IMAGE_COLUMNS, read_csv

    journal_path = None
    if output is not None:
        if output.exists():
            raise ValueError(f"--output {args.output} already exists: a finished run is never overwritten; "
                             "choose another name")
        journal_path = output.with_name(output.name + ".partial.jsonl")
        if journal_path.exists() and not args.resume:
            raise ValueError(f"an interrupted run left {journal_path}: add --resume to go on from where it "
                             "stopped, or delete it to start again")
    # the same columns as `halo-embed finetune` reads, so a training CSV scores as it is
    rows, columns = read_csv(pairs_path, [(args.image_column or IMAGE_COLUMNS, "--image-column"),
                                          (args.text_column or CAPTION_COLUMNS, "--text-column")])
    if not rows:
        raise ValueError(f"{pairs_path} has no rows")
    root = Path(args.image_root) if args.image_root else pairs_path.parent
    journal = done = None
    if journal_path is not None:
        journal = ScoreJournal(journal_path, _journal_header(args, pairs_path, root, columns), args.batch_size)
        done = journal.resume() if journal_path.exists() else None  # checked before the model is loaded
        if done is not None and journal.batch_size != args.batch_size:
            # a row's score depends (in the last float bits) on the batch it is computed in: the rest is scored
            # in the interrupted run's batches, so the output is the uninterrupted run's, byte for byte
            print(f"resuming with the interrupted run's --batch-size {journal.batch_size} (not "
                  f"{args.batch_size}): the output is then identical to an uninterrupted run's", file=sys.stderr)
            args.batch_size = journal.batch_size
    scorer = _scorer(args)
    if journal is not None and done is None:
        journal.start()
    done = done or 0
    backbone = scorer.model.backbone
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers tokenize; no threads across a fork
    context = context_length(scorer)
    dataset = PairRows(rows, *columns, root, backbone.image_transform(train=False), args.max_image_pixels, done)
    loader = pair_batches(dataset, backbone.tokenize_checked, args.batch_size, min(args.workers, len(dataset)),
                          pin_memory=scorer.device.type == "cuda")
    if done:
        print(f"resuming {journal_path}: {done} of {len(rows)} rows were scored before", file=sys.stderr)
    summary, start = ScoreSummary(), time.perf_counter()
    with tqdm(total=len(rows), initial=done, unit="pair", disable=None, file=sys.stderr) as bar:
        try:
            for batch in loader:
                records = score_batch(scorer, batch, args.strict_text)
                for record in records:
                    summary.add(record)
                    where = f"{pairs_path}, line {record['line']} (row {record['row']})"
                    if record["error"] is not None:
                        bar.write(f"{where}: {record['error']}", file=sys.stderr)
                    elif record["truncated"]:
                        bar.write(f"{where}: warning: caption longer than {context} tokens; its beginning is "
                                  "scored", file=sys.stderr)
                if journal is not None:
                    journal.append(records)
                else:
                    sys.stdout.write("".join(json.dumps(record) + "\n" for record in records))
                    sys.stdout.flush()
                bar.update(len(records))
        except KeyboardInterrupt:
            if journal is not None:
                print(f"stopped: {journal_path} keeps every finished batch; run the same command with --resume "
                      "to go on", file=sys.stderr)
            raise
        finally:
            if journal is not None:
                journal.close()
    seconds = time.perf_counter() - start
    rate = f"{summary.rows} rows in {seconds:.1f} s ({summary.rows / max(seconds, 1e-9):.0f} pairs/s)"
    if journal is not None:
        summary = write_scores(journal, output, scorer.abstain_bias)  # every row, the resumed ones too
        journal_path.unlink()
    bad = summary.rows - summary.scored
    print(f"scored {summary.scored} of {summary.rows} pairs: {summary.accepted} accepted, "
          f"{summary.scored - summary.accepted} rejected"
          + (f"; {bad} row(s) skipped (see above)" if bad else "")
          + (f"; {summary.too_long} caption(s) longer than the text tower reads" if summary.too_long else "")
          + (f"; wrote {args.output}" if args.output else "") + f"; {rate}", file=sys.stderr)
    return 1 if bad else 0


def run(args: argparse.Namespace) -> int:
    check_scoring_args(args)
    if args.pairs:
        if args.image or args.text:
            raise ValueError("give either --image/--text (one pair) or --pairs (a CSV), not both")
        return _batch(args)
    if not args.image or args.text is None:
        raise ValueError("give --image and --text for one pair, or --pairs CSV for many")
    return _single(args)


def check_scoring_args(args: argparse.Namespace) -> None:
    """The shared options' values (before any file is read or model loaded); sets ``--threads``."""
    import torch

    from .._validation import check_device

    args.device = check_device("--device", args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for name in ("batch_size", "max_image_pixels", "ray_cpus_per_worker"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.ray_workers is not None and args.ray_workers < 1:
        raise ValueError(f"--ray-workers must be >= 1, got {args.ray_workers}")
    if args.engine != "ray" and (args.ray_address or args.ray_workers):
        raise ValueError("--ray-address / --ray-workers need --engine ray")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
