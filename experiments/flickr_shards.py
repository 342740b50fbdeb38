"""Shards from real pairs, end to end: Flickr8k-1000 as webdataset shards, scored by a trained HALO
checkpoint through the streaming path and on a local Ray instance (2 actors), filtered, and the filter's
shards trained on.

    .venv/bin/python experiments/flickr_shards.py [--checkpoint runs/real/heads/halo-fixed-seed0/checkpoint]
                                                  [--name flickr-shards] [--per-shard 250]

The pool: every caption of the 200 validation images of ``experiments/real_start.py`` (never trained on by
that checkpoint), each as an aligned pair (key ``a…``) and once more with a caption of another validation
image (key ``m…``, a fixed derangement): 2,000 pairs, jpg + txt + json per sample, ``--per-shard`` per shard.
It measures: identical scores per key from both engines, seconds of each, the share of aligned and of
mismatched pairs ``filter`` keeps (HALO's own decision, no threshold chosen here), and that ``finetune``
trains 20 steps on the kept shards (heads only, both towers locked, from the checkpoint's base model).
Output: ``<runs>/<name>/report.json`` and ``report.md``. About 5 minutes on 2 CPU cores.

``--smoke``: the generated Flickr miniature, a tiny random-weight model (a calibrated HALOCLIP made here),
seconds; the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import REPO, add_common_options, datasets, flickr_csvs  # noqa: E402

DEFAULT_CHECKPOINT = REPO / "runs" / "real" / "heads" / "halo-fixed-seed0" / "checkpoint"


def write_pool(val_csv: Path, folder: Path, per_shard: int, limit: int | None) -> tuple[str, int]:
    """Aligned and mismatched pairs of the validation images as shards; returns (spec, pairs)."""
    from halo_embed.data.shards import write_shard

    with open(val_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))[:limit]
    images = sorted({r["filepath"] for r in rows})
    shift = {image: images[(i + len(images) // 2) % len(images)] for i, image in enumerate(images)}
    by_image: dict[str, list[str]] = {}
    for r in rows:
        by_image.setdefault(r["filepath"], []).append(r["title"])
    samples = []
    for n, r in enumerate(rows):
        other = by_image[shift[r["filepath"]]][n % len(by_image[shift[r["filepath"]]])]
        for kind, caption in (("a", r["title"]), ("m", other)):
            samples.append((f"{kind}{n:06d}", {"jpg": Path(r["filepath"]).read_bytes(), "txt": caption.encode(),
                                                "json": json.dumps({"image": Path(r["filepath"]).name}).encode()}))
    folder.mkdir(parents=True, exist_ok=True)
    shards = -(-len(samples) // per_shard)
    for shard in range(shards):
        write_shard(folder / f"{shard:05d}.tar", iter(samples[shard * per_shard : (shard + 1) * per_shard]))
    return f"{folder}/{{00000..{shards - 1:05d}}}.tar", len(samples)


def smoke_checkpoint(folder: Path) -> tuple[Path, str]:
    """A calibrated HALOCLIP from a tiny random open_clip model, and that model's folder."""
    import torch
    from PIL import Image

    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import open_clip_local_dir

    from halo_embed.clip import HALOCLIP, load_backbone, save_checkpoint

    model_dir = folder / "tiny-open-clip"
    if not (model_dir / "open_clip_config.json").exists():
        open_clip_local_dir(model_dir)
    torch.manual_seed(0)
    backbone = load_backbone("open_clip", f"local-dir:{model_dir}")
    transform = backbone.image_transform(train=False)
    pixels = torch.stack([transform(Image.new("RGB", (64, 64), (i * 9 % 256, 60, 200))) for i in range(32)])
    model = HALOCLIP(backbone, num_candidates=16)
    model.fit_adapter([(pixels, backbone.tokenize([f"a photo number {i}" for i in range(32)]))])
    return save_checkpoint(model, folder / "tiny-checkpoint"), f"local-dir:{model_dir}"


def cli(*args: str) -> tuple[int, str, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "halo_embed.cli", *args], capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise SystemExit(f"halo-embed {args[0]} failed ({done.returncode}): {done.stderr[-3000:]}")
    return done.returncode, done.stderr, time.perf_counter() - start


def main() -> int:
    import pyarrow.parquet as pq

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_options(parser)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="a trained HALOCLIP checkpoint")
    parser.add_argument("--name", default="flickr-shards")
    parser.add_argument("--per-shard", type=int, default=250)
    args = parser.parse_args()

    data = datasets(args)
    out = Path(args.runs) / (args.name + ("-smoke" if args.smoke else ""))
    if (out / "report.json").exists():
        raise SystemExit(f"{out} holds a finished run; choose another --name")
    out.mkdir(parents=True, exist_ok=True)
    _, val_csv = flickr_csvs(data, out / "csv")
    if args.smoke:
        checkpoint, base = smoke_checkpoint(out)
        per_shard, limit, steps, batch = 40, 60, 2, 8
    else:
        checkpoint = Path(args.checkpoint)
        base = json.loads((checkpoint / "config.json").read_text())["backbone"]["name"]
        per_shard, limit, steps, batch = args.per_shard, None, 20, 64
    spec, pairs = write_pool(val_csv, out / "pool", per_shard, limit)
    common = ["--checkpoint", str(checkpoint), "--device", "cpu", "--batch-size", "32", "--threads", "1"]

    # the same scores per key from both engines
    seconds = {}
    _, stream_log, seconds["stream"] = cli("score", *common, "--pairs", spec, "--output", str(out / "stream.parquet"),
                                           "--workers", "2")
    _, ray_log, seconds["ray"] = cli("score", *common, "--pairs", spec, "--output", str(out / "ray.parquet"),
                                     "--engine", "ray", "--ray-workers", "2")
    stream, ray = (pq.read_table(out / f"{n}.parquet").sort_by("key") for n in ("stream", "ray"))
    identical = stream.equals(ray)

    # the filter with HALO's own decision, and what it keeps of each kind
    _, filter_log, seconds["filter"] = cli("filter", *common, "--input", spec, "--output-dir", str(out / "kept"),
                                           "--workers", "2")
    kept = {row["key"] for row in pq.read_table(out / "kept" / "index.parquet", columns=["key"]).to_pylist()}
    share = {kind: 100 * sum(k.startswith(kind[0]) for k in kept) / (pairs // 2) for kind in ("aligned", "mismatched")}
    trained_on = "kept"
    if len(kept) < 2 * batch:  # (the smoke run's random model accepts nothing): the better half instead
        trained_on = "top-half"
        cli("filter", *common, "--input", spec, "--output-dir", str(out / trained_on), "--workers", "2",
            "--top-fraction", "0.5")
        kept = {r["key"] for r in pq.read_table(out / trained_on / "index.parquet", columns=["key"]).to_pylist()}
    shards = sorted((out / trained_on / "shards").glob("*.tar"))

    # the kept shards train
    train_spec = f"{out / trained_on / 'shards'}/{{00000..{len(shards) - 1:05d}}}.tar"
    finetune = ["finetune", "--model", base, "--dataset-type", "webdataset", "--train-data", train_spec,
                "--val-data", train_spec, "--train-num-samples", str(len(kept)), "--batch-size", str(batch),
                "--max-steps", str(steps), "--lock-image", "--lock-text", "--train-augment", "none",
                "--eval-images", "16" if args.smoke else "64", "--adapter-samples", "16" if args.smoke else "256",
                "--logs", str(out), "--name", "finetune-kept", "--no-progress", "--report-to", "none",
                "--log-every-n-steps", "1"]
    if not args.smoke:
        finetune += ["--lock-text-freeze-layer-norm", "--normalization", "fixed"]
    _, train_log, seconds["finetune"] = cli(*finetune)
    log = [json.loads(line) for line in (out / "finetune-kept" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]

    report = {"checkpoint": str(checkpoint), "pairs": pairs, "shards": -(-pairs // per_shard),
              "identical_per_key": identical, "seconds": seconds,
              "accepted_percent": share, "trained_on": trained_on, "trained_pairs": len(kept),
              "trained_shards": len(shards),
              "finetune": {"steps": len(losses), "first_loss": losses[0] if losses else None,
                           "last_loss": losses[-1] if losses else None},
              "logs": {"stream": stream_log.strip().splitlines()[-1], "ray": ray_log.strip().splitlines()[-1],
                       "filter": filter_log.strip().splitlines()[-2:]}}
    from halo_embed.io import atomic_write_json, atomic_write_text

    atomic_write_json(out / "report.json", report)
    lines = [f"# Flickr8k-1000 as shards ({pairs} pairs, {report['shards']} shards)", "",
             f"- checkpoint: `{checkpoint}`",
             f"- streaming path (2 decoding workers) vs Ray (2 actors): identical scores per key: **{identical}**; "
             f"{seconds['stream']:.0f} s vs {seconds['ray']:.0f} s end to end",
             f"- `filter` (HALO's decision) keeps {share['aligned']:.1f} % of the aligned pairs and "
             f"{share['mismatched']:.1f} % of the mismatched ones",
             f"- `finetune` on the {trained_on} shards ({len(kept)} pairs in {len(shards)} shards): {len(losses)} "
             f"steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "- `finetune`: no step logged"]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
