"""``halo-embed score``: does this caption belong to this image? (HALO's built-in threshold)

Single pair:  halo-embed score --checkpoint CKPT --image dog.jpg --text "a dog on the grass"
Batch:        halo-embed score --checkpoint CKPT --pairs pairs.csv --output scores.csv   (or .json)

The batch form reports each bad row (missing or unreadable image, empty text)
on stderr, scores the rest and writes one output row per input row (bad rows
with their error). Exit status: 0 all scored, 1 some rows could not be
scored, 2 a usage error (bad arguments, missing checkpoint, unreadable CSV).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

HELP = "probability that an image and a caption belong together, with accept/reject"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a HALOCLIP checkpoint folder (model.safetensors + config.json)")
    single = parser.add_argument_group("one pair")
    single.add_argument("--image", help="image file")
    single.add_argument("--text", help="caption")
    batch = parser.add_argument_group("many pairs")
    batch.add_argument("--pairs", help="CSV/TSV with an image path column and a caption column")
    batch.add_argument("--image-column", default="image", help="image path column (default: image)")
    batch.add_argument("--text-column", default="caption", help="caption column (default: caption)")
    batch.add_argument("--image-root", help="folder that relative image paths are relative to (default: the CSV's folder)")
    batch.add_argument("--output", help="scores file, .csv or .json (default: print JSON lines)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="single pair: print JSON instead of a sentence")


def _scorer(args: argparse.Namespace):
    import torch

    from ..clip.scorer import AlignmentScorer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return AlignmentScorer.from_checkpoint(args.checkpoint, device=device, batch_size=args.batch_size)


def _single(args: argparse.Namespace) -> int:
    from ..data.images import load_image

    if not args.text or not args.text.strip():
        raise ValueError("--text must be a non-empty caption")
    image = load_image(args.image)  # a clear error before the model is loaded
    scorer = _scorer(args)
    record = scorer.score([image], [args.text]).to_records()[0]
    record.update(image=args.image, text=args.text, abstain_bias=scorer.abstain_bias)
    if args.json:
        print(json.dumps(record))
    else:
        verdict = "ACCEPT" if record["accept"] else "REJECT"
        print(f"{verdict}  p(belongs) = {record['probability']:.3f}  logit {record['logit']:.3f} vs abstain bias "
              f"{record['abstain_bias']:.3f}  ({args.image!r}, {args.text!r})")
    return 0


def _read_pairs(path: Path, image_column: str, text_column: str) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    columns = reader.fieldnames or []
    for column, flag in ((image_column, "--image-column"), (text_column, "--text-column")):
        if column not in columns:
            raise ValueError(f"{path} has no column {column!r} (columns: {columns}); set {flag}")
    return list(reader)


def _batch(args: argparse.Namespace) -> int:
    from ..data.images import ImageLoadError, load_image
    from ..io import atomic_write_json, atomic_write_text

    pairs_path = Path(args.pairs)
    rows = _read_pairs(pairs_path, args.image_column, args.text_column)
    if not rows:
        raise ValueError(f"{pairs_path} has no rows")
    if args.output and Path(args.output).suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--output must end in .csv or .json, got {args.output}")
    root = Path(args.image_root) if args.image_root else pairs_path.parent
    scorer = _scorer(args)
    records, good, images, texts = [], [], [], []
    for number, row in enumerate(rows, start=1):
        image_path, text = (row.get(args.image_column) or "").strip(), (row.get(args.text_column) or "").strip()
        record = {"row": number, "image": image_path, "text": text, "probability": None, "accept": None,
                  "logit": None, "error": None}
        try:
            if not text:
                raise ValueError("empty caption")
            if not image_path:
                raise ValueError("empty image path")
            path = Path(image_path)
            images.append(load_image(path if path.is_absolute() else root / path))
            texts.append(text)
            good.append(record)
        except (ImageLoadError, ValueError) as error:
            record["error"] = str(error)
            print(f"row {number}: {error}", file=sys.stderr)
        records.append(record)
    if good:
        for record, scored in zip(good, scorer.score(images, texts).to_records()):
            record.update(scored)
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
          + (f"; wrote {args.output}" if args.output else ""), file=sys.stderr)
    return 1 if bad else 0


def run(args: argparse.Namespace) -> int:
    if args.pairs:
        if args.image or args.text:
            raise ValueError("give either --image/--text (one pair) or --pairs (a CSV), not both")
        return _batch(args)
    if not args.image or args.text is None:
        raise ValueError("give --image and --text for one pair, or --pairs CSV for many")
    return _single(args)
