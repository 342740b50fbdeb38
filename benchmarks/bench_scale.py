"""`halo-embed score` on webdataset shards: pairs per second of the streaming path and of Ray Data with 1 and 2
scorer actors, and the scoring process's peak memory as the pool grows.

Usage: python benchmarks/bench_scale.py [--pairs 30000] [--pools 10000 30000 100000] [--per-shard 1000]
                                        [--model halo-tiny-vit] [--batch-size 64]

Data: shards written with halo-embed's own writer (webdataset's TarWriter),
``--per-shard`` samples each (a jpg of 128 x 160 pixels, 200 distinct smooth
colour fields cycled, and a caption); the model is open_clip's ``--model``
config with random weights (seed 0) and a fitted feature adapter, as in
``bench_score.py``. Every run is the CLI in a fresh process, timed end to end
(model loading and, for Ray, starting the local instance included), writing a
parquet file:

* throughput on ``--pairs`` pairs: ``--engine stream --workers 2`` (two
  decoding processes, the scorer in the main one), and ``--engine ray
  --ray-workers 1`` / ``2`` (each actor reads, decodes and scores whole shards
  with one thread); end to end, and *marginal*: the extra pairs of the full
  pool over a fifth of it divided by the extra seconds, so that start-up
  (imports, model loading, Ray's instance and actors: ~15-20 s here) cancels.
  The 2-actor / 1-actor ratio measures how Ray's actors scale on this
  machine's cores;
* memory: ``score`` and ``filter --top-fraction 0.5`` (which scores, selects
  and writes new shards) on each ``--pools`` size, the streaming path: the
  peak resident set of the run's largest process (the command or one of its
  DataLoader workers, measured per run), which should not grow with the pool.

The scores of the three throughput runs are compared per key (``--threads 1``
on the streaming path, one thread per actor): identical to the bit.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import print_table, save

REPO = Path(__file__).resolve().parents[1]


def write_pool(folder: Path, pairs: int, per_shard: int) -> str:
    """``pairs`` samples in shards of ``per_shard``; returns the brace spec."""
    import numpy as np
    from PIL import Image

    from halo_embed.data.shards import write_shard

    rng = np.random.default_rng(0)
    images = []
    for _ in range(200):
        buffer = io.BytesIO()
        small = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
        Image.fromarray(small).resize((160, 128), Image.BICUBIC).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    words = ("dog", "cat", "red car", "child on a swing")
    shards = -(-pairs // per_shard)
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        first, last = shard * per_shard, min(pairs, (shard + 1) * per_shard)
        write_shard(folder / f"{shard:05d}.tar",
                    ((f"{i:09d}", {"jpg": images[i % 200], "txt": f"a photo of a {words[i % 4]} number {i}".encode()})
                     for i in range(first, last)))
    return f"{folder}/{{00000..{shards - 1:05d}}}.tar"


def make_checkpoint(folder: Path, model_name: str) -> Path:
    import torch
    from PIL import Image

    from halo_embed.clip import HALOCLIP, load_backbone, save_checkpoint

    torch.manual_seed(0)
    backbone = load_backbone("open_clip", model_name)
    model = HALOCLIP(backbone, num_candidates=64)
    transform = backbone.image_transform(train=False)
    pixels = torch.stack([transform(Image.new("RGB", (160, 128), (i * 3 % 256, 90, 200))) for i in range(64)])
    model.fit_adapter([(pixels, backbone.tokenize([f"a photo number {i}" for i in range(64)]))])
    return save_checkpoint(model, folder / "checkpoint")


#: runs the command and prints the largest peak resident set of its processes (the command and the
#: DataLoader workers it waited for): measured per run, not the benchmark's cumulative maximum
PEAK = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def run_score(checkpoint: Path, spec: str, output: Path, batch: int, *engine: str, command: str = "score") -> dict:
    """One CLI run (``score``, or ``filter`` into the folder ``output``) in a fresh process: wall seconds and
    its peak RSS (MiB)."""
    where = ["--pairs", spec, "--output", str(output)] if command == "score" else \
        ["--input", spec, "--output-dir", str(output)]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK, sys.executable, "-m", "halo_embed.cli", command,
                           "--checkpoint", str(checkpoint), *where, "--device", "cpu", "--batch-size", str(batch),
                           *engine], capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"score failed ({done.returncode}): {done.stderr[-2000:]}")
    return {"seconds": seconds, "peak_mb": int(done.stdout.strip().splitlines()[-1]) / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=30_000, help="pairs of the throughput comparison (0: none)")
    parser.add_argument("--pools", type=int, nargs="*", default=[10_000, 30_000, 100_000],
                        help="pool sizes of the memory measurement (streaming path; none: no memory runs)")
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--model", default="halo-tiny-vit")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    checkpoint = make_checkpoint(work, args.model)
    results = {"per_shard": args.per_shard, "model": args.model, "batch_size": args.batch_size}
    if args.pairs:
        results.update(throughput_runs(args, work, checkpoint))
    if args.pools:
        results["memory"] = memory_runs(args, work, checkpoint)
    save("bench_scale" + ("" if args.pairs and args.pools else "_throughput" if args.pairs else "_memory"), results)
    return 0 if results.get("identical_per_key", True) else 1


def throughput_runs(args: argparse.Namespace, work: Path, checkpoint: Path) -> dict:
    import pyarrow.parquet as pq

    small = max(args.per_shard, args.pairs // 5)
    specs = {args.pairs: write_pool(work / "pool", args.pairs, args.per_shard),
             small: write_pool(work / "pool-small", small, args.per_shard)}
    engines = {"stream, 2 decoding workers": ("--engine", "stream", "--workers", "2", "--threads", "1"),
               "ray, 1 actor": ("--engine", "ray", "--ray-workers", "1"),
               "ray, 2 actors": ("--engine", "ray", "--ray-workers", "2")}
    throughput, tables = {}, {}
    for name, engine in engines.items():
        runs = {}
        for size, spec in specs.items():
            output = work / f"{len(tables)}-{size}.parquet"
            runs[size] = run_score(checkpoint, spec, output, args.batch_size, *engine)["seconds"]
            if size == args.pairs:
                tables[name] = pq.read_table(output).sort_by("key")
        # the pairs between the two sizes over the seconds between them: start-up (imports, model, Ray) cancels
        marginal = (args.pairs - small) / max(runs[args.pairs] - runs[small], 1e-9)
        throughput[name] = {"seconds": runs[args.pairs], "pairs_per_s": args.pairs / runs[args.pairs],
                            "seconds_small": runs[small], "marginal_pairs_per_s": marginal}
    reference = next(iter(tables.values()))
    identical = all(table.equals(reference) for table in tables.values())
    ratio = {key: throughput["ray, 2 actors"][key] / throughput["ray, 1 actor"][key]
             for key in ("pairs_per_s", "marginal_pairs_per_s")}
    print(f"throughput on {args.pairs:,} pairs ({-(-args.pairs // args.per_shard)} shards) and {small:,}:")
    print_table(["engine", f"s ({args.pairs:,})", "pairs/s end to end", f"s ({small:,})", "pairs/s marginal"],
                [[name, f"{r['seconds']:.1f}", f"{r['pairs_per_s']:.0f}", f"{r['seconds_small']:.1f}",
                  f"{r['marginal_pairs_per_s']:.0f}"] for name, r in throughput.items()])
    print(f"ray 2 actors / 1 actor: {ratio['pairs_per_s']:.2f}x end to end, {ratio['marginal_pairs_per_s']:.2f}x "
          f"marginal; scores identical per key on all three: {identical}")
    return {"pairs": args.pairs, "small": small, "throughput": throughput, "ray_2_over_1": ratio,
            "identical_per_key": identical}


def memory_runs(args: argparse.Namespace, work: Path, checkpoint: Path) -> dict:
    memory = {}
    for size in args.pools:
        pool = write_pool(work / f"pool-{size}", size, args.per_shard)
        result = run_score(checkpoint, pool, work / f"memory-{size}.parquet", args.batch_size,
                           "--engine", "stream", "--workers", "2")
        filtered = run_score(checkpoint, pool, work / f"filter-{size}", args.batch_size, "--engine", "stream",
                             "--workers", "2", "--top-fraction", "0.5", command="filter")
        memory[size] = {"peak_mb": result["peak_mb"], "seconds": result["seconds"],
                        "pairs_per_s": size / result["seconds"], "filter_peak_mb": filtered["peak_mb"],
                        "filter_seconds": filtered["seconds"]}
    print("streaming path, peak resident set of the run's largest process (MiB):")
    print_table(["pairs", "score: peak MiB", "seconds", "pairs/s", "filter --top-fraction 0.5: peak MiB", "seconds"],
                [[f"{size:,}", f"{m['peak_mb']:.0f}", f"{m['seconds']:.1f}", f"{m['pairs_per_s']:.0f}",
                  f"{m['filter_peak_mb']:.0f}", f"{m['filter_seconds']:.1f}"] for size, m in memory.items()])
    return {str(size): values for size, values in memory.items()}


if __name__ == "__main__":
    sys.exit(main())
