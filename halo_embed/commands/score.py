"""``halo-embed score``: does this caption belong to this image? (HALO's built-in threshold)

Single pair:  halo-embed score --checkpoint CKPT --image dog.jpg --text "a dog on the grass"
Batch:        halo-embed score --checkpoint CKPT --pairs pairs.csv --output scores.csv   (or .json)

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

#: Image decoding dominates on a GPU: as many workers as cores, up to 8.
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)

HELP = "probability that an image and a caption belong together, with accept/reject"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a HALOCLIP checkpoint folder (model.safetensors + config.json)")
    single = parser.add_argument_group("one pair")
    single.add_argument("--image", help="image file")
    single.add_argument("--text", help="caption")
    batch = parser.add_argument_group("many pairs")
    batch.add_argument("--pairs", help="CSV/TSV with an image path column and a caption column")
    batch.add_argument("--image-column", help="image path column (default: open_clip's filepath, else image)")
    batch.add_argument("--text-column", help="caption column (default: open_clip's title, else caption)")
    batch.add_argument("--image-root", help="folder that relative image paths are relative to (default: the CSV's folder)")
    batch.add_argument("--output", help="scores file, .csv or .json (default: print JSON lines)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per forward pass (default 64)")
    batch.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                       help=f"processes that decode images and tokenize captions (default {DEFAULT_WORKERS}: "
                            "the CPU count, at most 8; 0: in the main process)")
    batch.add_argument("--resume", action="store_true",
                       help="go on from where an interrupted run with the same --output stopped")
    parser.add_argument("--json", action="store_true", help="single pair: print JSON instead of a sentence")
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


def _journal_header(args: argparse.Namespace, pairs_path: Path, root: Path, columns: tuple[str, str]) -> dict:
    """What an interrupted run must share with its resume: the same inputs, checkpoint and row rules."""
    def stamp(path: Path) -> list:
        info = path.stat()
        return [path.name, info.st_size, info.st_mtime_ns]

    checkpoint = Path(args.checkpoint).resolve()
    return {"pairs": [str(pairs_path.resolve()), *stamp(pairs_path)[1:]],
            "checkpoint": [str(checkpoint)] + ([stamp(p) for p in sorted(checkpoint.iterdir()) if p.is_file()]
                                               if checkpoint.is_dir() else []),  # a missing one: the loader says
            "image_column": columns[0], "text_column": columns[1], "image_root": str(root.resolve()),
            "strict_text": args.strict_text, "max_image_pixels": args.max_image_pixels}


def _batch(args: argparse.Namespace) -> int:
    from ..io import claim_for

    pairs_path = Path(args.pairs)
    if not pairs_path.is_file():
        raise FileNotFoundError(f"pairs file {'is a folder' if pairs_path.is_dir() else 'not found'}: {pairs_path}")
    if args.output:
        output = Path(args.output)
        if output.suffix.lower() not in (".csv", ".json"):
            raise ValueError(f"--output must end in .csv or .json, got {args.output}")
        folder = output.parent
        if output.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ValueError(f"--output {args.output} cannot be written: "
                             + ("it is a folder" if output.is_dir() else f"the folder {folder} "
                                + ("is not writable" if folder.is_dir() else "does not exist")))
        # one process per output: a second one (a --resume of a run still going, the same command twice)
        # stops here, before it reads or writes anything
        with claim_for(output, f"--output {args.output}"):
            return _batch_owned(args, pairs_path, output)
    if args.resume:
        raise ValueError("--resume needs --output (the scores of the interrupted run are kept next to it)")
    return _batch_owned(args, pairs_path, None)


def _batch_owned(args: argparse.Namespace, pairs_path: Path, output: Path | None) -> int:
    """:func:`_batch` once this process owns ``output`` (or prints JSON lines)."""
    from tqdm.auto import tqdm

    from ..clip.pair_stream import PairRows, ScoreJournal, ScoreSummary, pair_batches, score_batch, write_scores
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
    try:
        context = backbone.context_length
    except NotImplementedError:
        context = None
    dataset = PairRows(rows, *columns, root, backbone.image_transform(train=False), args.max_image_pixels, done)
    loader = pair_batches(dataset, backbone.tokenize_checked, args.batch_size, min(args.workers, len(dataset)),
                          pin_memory=scorer.device.type == "cuda")
    if done:
        print(f"resuming {journal_path}: {done} of {len(rows)} rows were scored before", file=sys.stderr)
    summary, start = ScoreSummary(), time.perf_counter()
    with tqdm(total=len(rows), initial=done, unit="pair", disable=None, file=sys.stderr) as bar:
        try:
            for batch in loader:
                records = score_batch(scorer, batch, args.strict_text, context)
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
    import torch

    from .._validation import check_device

    # checked before any file is read or model loaded
    args.device = check_device("--device", args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.max_image_pixels < 1:
        raise ValueError(f"--max-image-pixels must be >= 1, got {args.max_image_pixels}")
    if args.pairs:
        if args.image or args.text:
            raise ValueError("give either --image/--text (one pair) or --pairs (a CSV), not both")
        return _batch(args)
    if not args.image or args.text is None:
        raise ValueError("give --image and --text for one pair, or --pairs CSV for many")
    return _single(args)
