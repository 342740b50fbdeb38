"""``halo-embed score``: does this caption belong to this image? (HALO's built-in threshold)

Single pair:  halo-embed score --checkpoint CKPT --image dog.jpg --text "a dog on the grass"
Batch:        halo-embed score --checkpoint CKPT --pairs pairs.csv --output scores.csv   (or .json)

The batch form reports each bad row (missing, unreadable or oversized image,
empty text, a row that is not UTF-8; with --strict-text a caption longer than
the text tower reads) on stderr with its file and line, scores the rest
(decoding a few hundred images at a time) and writes one output row per input
row (bad rows with their error). Exit status: 0 all scored, 1 some rows could
not be scored, 2 a usage or input error (bad arguments, missing or damaged
checkpoint, unreadable CSV; checked before anything is scored), 3 an internal
error.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

from ..data.images import DEFAULT_MAX_PIXELS

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
    parser.add_argument("--batch-size", type=int, default=64)
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


def _batch(args: argparse.Namespace) -> int:
    from ..data.images import ImageLoadError, load_image
    from ..data.tables import CAPTION_COLUMNS, IMAGE_COLUMNS, read_csv
    from ..io import atomic_write_json, atomic_write_text

    pairs_path = Path(args.pairs)
    if not pairs_path.is_file():
        raise FileNotFoundError(f"pairs file {'is a folder' if pairs_path.is_dir() else 'not found'}: {pairs_path}")
    # the same columns as `halo-embed finetune` reads, so a training CSV scores as it is
    rows, (image_column, text_column) = read_csv(
        pairs_path, [(args.image_column or IMAGE_COLUMNS, "--image-column"),
                     (args.text_column or CAPTION_COLUMNS, "--text-column")])
    if not rows:
        raise ValueError(f"{pairs_path} has no rows")
    if args.output:
        output = Path(args.output)
        if output.suffix.lower() not in (".csv", ".json"):
            raise ValueError(f"--output must end in .csv or .json, got {args.output}")
        folder = output.parent
        if output.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ValueError(f"--output {args.output} cannot be written: "
                             + ("it is a folder" if output.is_dir() else f"the folder {folder} "
                                + ("is not writable" if folder.is_dir() else "does not exist")))
    root = Path(args.image_root) if args.image_root else pairs_path.parent
    scorer = _scorer(args)
    records, scored_records, truncated = [], [], 0
    chunk = max(256, args.batch_size)  # rows decoded at a time: memory stays flat for any file size
    for first in range(0, len(rows), chunk):
        good, images, texts = [], [], []
        for number, row in enumerate(rows[first : first + chunk], start=first + 1):
            values = row.values
            image_path, text = (values.get(image_column) or "").strip(), (values.get(text_column) or "").strip()
            record = {"row": number, "line": row.line, "image": image_path, "text": text, "probability": None,
                      "accept": None, "logit": None, "truncated": None, "error": None}
            records.append(record)
            try:
                if row.error:
                    raise ValueError(row.error)
                if not text:
                    raise ValueError("empty caption")
                if not image_path:
                    raise ValueError("empty image path")
                path = Path(image_path)
                images.append(load_image(path if path.is_absolute() else root / path,
                                         max_pixels=args.max_image_pixels))
                texts.append(text)
                good.append(record)
            except (ImageLoadError, ValueError) as error:
                record["error"] = str(error)
                print(f"{pairs_path}, line {row.line} (row {number}): {error}", file=sys.stderr)
        if not good:
            continue
        flags = scorer.truncated(texts)
        too_long = [False] * len(texts) if flags is None else flags.tolist()
        for record, long in zip(good, too_long):
            if long:
                context = scorer.model.backbone.context_length
                truncated += 1
                where = f"{pairs_path}, line {record['line']} (row {record['row']})"
                if args.strict_text:
                    record["error"] = f"caption longer than the {context} tokens the text tower reads (--strict-text)"
                    print(f"{where}: {record['error']}", file=sys.stderr)
                else:
                    print(f"{where}: warning: caption longer than {context} tokens; its beginning is scored",
                          file=sys.stderr)
        keep = [i for i, long in enumerate(too_long) if not (long and args.strict_text)]
        good, images, texts = [good[i] for i in keep], [images[i] for i in keep], [texts[i] for i in keep]
        if good:
            # the captions were checked for length above: score the embeddings (each caption tokenized once more)
            scores = scorer.score_embeddings(scorer.encode_images(images), scorer.encode_texts(texts))
            scores.truncated = None if flags is None else flags[keep]
            for record, scored in zip(good, scores.to_records()):
                record.update(scored)
            scored_records += good
    good = scored_records
    if args.output:
        output = Path(args.output)
        if output.suffix.lower() == ".json":
            atomic_write_json(output, {"abstain_bias": scorer.abstain_bias, "pairs": records})
        else:
            import io

            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
            atomic_write_text(output, buffer.getvalue())
    else:
        for record in records:
            print(json.dumps(record))
    bad = len(records) - len(good)
    summary = f"scored {len(good)} of {len(records)} pairs"
    accepted = sum(1 for r in good if r["accept"])
    print(f"{summary}: {accepted} accepted, {len(good) - accepted} rejected"
          + (f"; {bad} row(s) skipped (see above)" if bad else "")
          + (f"; {truncated} caption(s) longer than the text tower reads" if truncated else "")
          + (f"; wrote {args.output}" if args.output else ""), file=sys.stderr)
    return 1 if bad else 0


def run(args: argparse.Namespace) -> int:
    import torch

    from .._validation import check_device

    # checked before any file is read or model loaded
    args.device = check_device("--device", args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_image_pixels < 1:
        raise ValueError(f"--max-image-pixels must be >= 1, got {args.max_image_pixels}")
    if args.pairs:
        if args.image or args.text:
            raise ValueError("give either --image/--text (one pair) or --pairs (a CSV), not both")
        return _batch(args)
    if not args.image or args.text is None:
        raise ValueError("give --image and --text for one pair, or --pairs CSV for many")
    return _single(args)
