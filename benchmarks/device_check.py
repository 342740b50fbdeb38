"""The prepared device check: everything this project wants to know from a GPU, in one run.

Usage:
    make device-check                 # on a GPU machine: the `cuda` tests and the GPU benchmarks
    make device-check DRY_RUN=1       # the same script at tiny sizes on the CPU (CI runs it; < 2 minutes)

What it runs, each part on its own so one failure does not stop the rest:

1. the environment (torch, CUDA device, faiss GPU support);
2. the tests marked ``cuda`` and their CPU twins (``tests/test_devices.py``, plus
   :data:`CUDA_TESTS`: CIFAR training in bf16 + channels-last, the 2-process
   paired loss over NCCL where two GPUs exist);
3. HALOLoss (fused) against ``F.linear`` + ``F.cross_entropy(label_smoothing=0.1)``,
   forward + backward, at (N, D, K) = (1024, 512, 1000), (4096, 128, 100) and
   (65,536, 512, 32,000);
4. PairedHALOLoss (tiled) against open_clip's ``ClipLoss`` at B = 32,768, D = 512;
5. HALOLoss(chunk_size=...) against torch's chunked ``F.linear_cross_entropy`` at
   (4096, 256, 262,144);
6. scoring throughput (``bench_score.py``): ``halo-embed score --pairs`` against
   open_clip's own ``encode_image`` / ``encode_text`` + cosine, files to a scores
   file, ViT-B-32 (random weights), both reading with the same DataLoader workers;
7. the CIFAR-10 comparison at full width (ResNet-18 width 64, the published
   setting, bf16 + channels-last): HALO and cross-entropy, same seed and data,
   for as many epochs as fit in ``--cifar-seconds`` (a one-epoch probe on a
   tenth of the data sets the number). The data travel with the command:
   ``--cifar-data DIR`` is a folder like ../shared/datasets (``cifar10-jpg.tar.gz``
   or an unpacked ``cifar10/``, ``cifar100-partial.npz`` as near-OOD,
   ``svhn-partial.npz`` as far-OOD); without it the part is skipped.

Times are medians of interleaved repeats (CUDA synchronised); memory is the
CUDA allocator's peak for one step. Writes ``benchmarks/results/device-check.json``
and ``device-check.md`` (``-2``, ``-3`` ... when taken) and prints the summary.

On the lent GPU machine (no package index) run it through ``make device-check
WHEELS=.whl``: the image's own ``python3`` (its torch) plus the wheels that
``make device-wheels`` put in ``.whl/`` here (benchmarks/device_wheels.sh).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tarfile
import tempfile
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from _common import RESULTS_DIR, hardware, interleaved_times
from bench_score import scoring_throughput

from halo_embed import HALOLoss
from halo_embed.io import atomic_write_json, atomic_write_text, unused_path
from halo_embed.losses import PairedHALOLoss

ROOT = Path(__file__).resolve().parents[1]

#: (full size on a GPU, tiny size for the dry run on a CPU)
LOSS_SIZES = [((1024, 512, 1000), (256, 32, 100)), ((4096, 128, 100), (512, 16, 10)),
              ((65536, 512, 32000), (1024, 32, 500))]
PAIRED_SIZE = ((32768, 512, 4096), (256, 16, 64))           # batch, dim, chunk rows
CHUNKED_SIZE = ((4096, 256, 262144, 128), (256, 16, 4096, 32))  # n, d, k, chunk rows


def timed_pair(device: torch.device, variants: dict[str, Callable[[], None]], repeats: int) -> dict[str, Any]:
    """Median seconds of each variant and, on CUDA, the allocator's peak for one call (MiB)."""
    cuda = device.type == "cuda"
    seconds = interleaved_times(variants, repeats=repeats, warmup=1, sync=cuda)
    result: dict[str, Any] = {"seconds": seconds}
    if cuda:
        peaks = {}
        for name, fn in variants.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peaks[name] = (torch.cuda.max_memory_allocated() - before) / 2**20
        result["peak_mib"] = peaks
    names = list(variants)
    result["time_ratio"] = seconds[names[1]] / seconds[names[0]]
    return result


def classification(device: torch.device, n: int, d: int, k: int, repeats: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).to(device).requires_grad_(True)
    w = torch.randn(k, d, generator=g).to(device).requires_grad_(True)
    y = torch.randint(0, k, (n,), generator=g).to(device)
    halo = HALOLoss(d, k).to(device)

    def baseline() -> None:
        F.cross_entropy(F.linear(x, w), y, label_smoothing=0.1).backward()
        x.grad = w.grad = None

    def fused() -> None:
        halo(x, y, w)[0].backward()
        x.grad = w.grad = None

    return timed_pair(device, {"linear+cross_entropy": baseline, "halo fused": fused}, repeats)


def paired(device: torch.device, batch: int, dim: int, chunk: int, repeats: int) -> dict[str, Any]:
    from open_clip.loss import ClipLoss

    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, dim, generator=g).to(device).requires_grad_(True)
    texts = (images.detach() + torch.randn(batch, dim, generator=g).to(device)).requires_grad_(True)
    scale = torch.tensor(1 / 0.07, device=device)
    halo = PairedHALOLoss(dim, num_candidates=batch, chunk_size=chunk).to(device)

    def clip() -> None:
        ClipLoss()(F.normalize(images, dim=-1), F.normalize(texts, dim=-1), scale).backward()
        images.grad = texts.grad = None

    def tiled() -> None:
        halo(images, texts).backward()
        images.grad = texts.grad = None

    return timed_pair(device, {"open_clip ClipLoss": clip, "halo tiled": tiled}, repeats)


def chunked(device: torch.device, n: int, d: int, k: int, chunk: int, repeats: int) -> dict[str, Any]:
    from torch.nn import LinearCrossEntropyOptions

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, d, generator=g) * 0.5).to(device).requires_grad_(True)
    w = torch.randn(k, d, generator=g).to(device).requires_grad_(True)
    y = torch.randint(0, k, (n,), generator=g).to(device)
    halo = HALOLoss(d, k, chunk_size=chunk).to(device)

    def torch_chunked() -> None:  # its chunked path needs label_smoothing == 0
        F.linear_cross_entropy(x, w, y, options=LinearCrossEntropyOptions()).backward()
        x.grad = w.grad = None

    def halo_chunked() -> None:
        halo(x, y, w)[0].backward()
        x.grad = w.grad = None

    return timed_pair(device, {"torch linear_cross_entropy": torch_chunked, "halo chunked": halo_chunked}, repeats)


PARTS = ("tests", "losses", "paired", "chunked", "scoring", "cifar")
CIFAR_FILES = ("cifar10-jpg.tar.gz", "cifar100-partial.npz", "svhn-partial.npz")


def _tiny_cifar(folder: Path) -> Path:
    """The dry run's stand-in: 10 classes of random 32 px images in the same layout, and OOD arrays."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 26), ("test", 6)):
        for label in range(10):
            (folder / "cifar10" / split / f"class{label}").mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) // (label + 1)
                Image.fromarray(pixels).save(folder / "cifar10" / split / f"class{label}" / f"{i}.png")
    for name in CIFAR_FILES[1:]:
        np.savez(folder / name, x=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8))
    return folder


def cifar_compare(device: torch.device, source: Path | None, seconds: float, dry: bool) -> dict[str, Any]:
    """HALO and cross-entropy on CIFAR-10, full width, same seed and data, as many epochs as fit in ``seconds``."""
    from dataclasses import replace

    from halo_embed.recipes.cifar import CifarData, load_data, train
    from halo_embed.recipes.cifar_config import CifarConfig
    from halo_embed.recipes.cifar_report import headline

    if source is None and not dry:
        return {"skipped": "no --cifar-data: copy ../shared/datasets/{" + ",".join(CIFAR_FILES) + "} into a "
                           "folder that travels (carry) and name it"}
    work = Path(tempfile.mkdtemp(prefix="device-cifar-"))
    if dry:
        source = _tiny_cifar(work)
    images = source / "cifar10"
    if not images.is_dir():
        images = work / "cifar10"
        with tarfile.open(source / CIFAR_FILES[0]) as archive:  # train/<class>/*.jpg and test/<class>/*.jpg
            archive.extractall(images, filter="data")
    base = CifarConfig(dataset="imagefolder", data_dir=str(images), near_ood=[str(source / CIFAR_FILES[1])],
                       far_ood=[str(source / CIFAR_FILES[2])], output=str(work / "runs"), progress=False,
                       device=str(device), epochs=1, **({"width": 8, "batch_size": 32} if dry else {}))
    start = time.perf_counter()
    data = load_data(base)
    load_s = time.perf_counter() - start
    # the probe: one epoch on a tenth of the images (after a warm-up epoch of the kernels' autotuning)
    tenth = CifarData(data.train.subset(max(len(data.train) // 10, base.batch_size)), data.test.subset(256),
                      {k: v.subset(64) for k, v in data.near.items()}, {k: v.subset(64) for k, v in data.far.items()},
                      data.classes, data.calibration.subset(256))
    train(replace(base, loss="halo", name="warmup"), tenth)
    start = time.perf_counter()
    train(replace(base, loss="halo", name="probe"), tenth)
    epoch_s = (time.perf_counter() - start) * len(data.train) / len(tenth.train)
    epochs = max(1, min(200, int(seconds / (2 * epoch_s))))
    result: dict[str, Any] = {"epochs": epochs, "estimated_epoch_s": round(epoch_s, 1), "data_load_s": round(load_s, 1),
                              "n_train": len(data.train), "n_test": len(data.test), "width": base.width,
                              "batch_size": base.batch_size}
    for loss in ("cce", "halo"):
        start = time.perf_counter()
        metrics = train(replace(base, loss=loss, epochs=epochs, name=f"cifar10-{loss}"), data)
        result[loss] = {**headline(metrics, loss), "train_s": round(time.perf_counter() - start, 1)}
    return result


#: The tests marked ``cuda`` outside ``tests/test_devices.py`` (they skip without a GPU, or two).
CUDA_TESTS = ("tests/test_cifar_recipe.py::test_training_on_cuda_in_bf16_and_channels_last",
              "tests/test_paired_loss.py::test_two_gpus_over_nccl_equal_one_process")


def device_tests() -> dict[str, Any]:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_devices.py", *CUDA_TESTS,
               "-rs"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = done.stdout.strip().splitlines()
    result = {"returncode": done.returncode, "summary": lines[-1] if lines else "", "tail": "\n".join(lines[-15:])}
    if done.returncode:   # a failing test, or a test id that no longer exists (pytest exits 4), fails the check
        result.update(ok=False, error=f"pytest exited {done.returncode}: {result['summary'] or done.stderr[-300:]}")
    return result


def run_part(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    start = time.perf_counter()
    try:
        results[name] = {"ok": True, **fn()}
    except Exception as error:  # noqa: BLE001 - one part failing must not stop the others
        results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}",
                         "traceback": traceback.format_exc(limit=5)}
    results[name]["wall_s"] = round(time.perf_counter() - start, 1)
    print(f"  {name}: {'ok' if results[name]['ok'] else results[name]['error']} "
          f"({results[name]['wall_s']} s)", flush=True)


def summary(results: dict[str, Any], dry_run: bool) -> str:
    lines = [f"# Device check{' (dry run: tiny sizes on the CPU)' if dry_run else ''}", "",
             f"Hardware: {results['environment']}", ""]
    lines += ["| part | result | wall s |", "|---|---|---|"]
    for name, part in results.items():
        if name == "environment":
            continue
        if not part["ok"]:
            cell = f"FAILED: {part['error']}"
        elif "time_ratio" in part:
            seconds = ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in part["seconds"].items())
            peaks = part.get("peak_mib")
            cell = f"ratio {part['time_ratio']:.2f} ({seconds})" + (
                "; peak " + ", ".join(f"{k} {v:.0f} MiB" for k, v in peaks.items()) if peaks else "")
        elif "cce" in part:
            cell = (f"{part['epochs']} epochs, {part['n_train']} images: " + "; ".join(
                f"{loss.upper()} accuracy {100 * part[loss]['accuracy']:.2f}, near AUROC "
                f"{100 * part[loss]['near_auroc']:.2f}, far AUROC {100 * part[loss]['far_auroc']:.2f}, ECE "
                f"{100 * part[loss]['ece']:.2f} ({part[loss]['train_s']:.0f} s)" for loss in ("cce", "halo")))
        else:
            cell = part.get("summary") or part.get("skipped") or "ok"
        lines.append(f"| {name} | {cell} | {part['wall_s']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (checks that the script works)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 5; dry run 2)")
    parser.add_argument("--cifar-data", type=Path, default=None,
                        help="a folder with cifar10-jpg.tar.gz (or cifar10/), cifar100-partial.npz, svhn-partial.npz")
    parser.add_argument("--cifar-seconds", type=float, default=150.0,
                        help="training time for the CIFAR comparison, both losses together (default 150: the "
                             "whole check stays within about 8 minutes on one H100/H200-class GPU)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="run only these parts (default: all), e.g. to rerun the one that failed")
    args = parser.parse_args()
    dry = args.dry_run
    device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
    if not dry and device.type != "cuda":
        print("no CUDA device: run with --dry-run (DRY_RUN=1) to check the script on the CPU", file=sys.stderr)
        return 2
    repeats = args.repeats or (2 if dry else 5)
    pick = 1 if dry else 0
    results: dict[str, Any] = {"environment": hardware()}
    parts = set(args.parts)
    if "tests" in parts:
        run_part(results, "cuda tests (tests/test_devices.py and CUDA_TESTS)", device_tests)
    for full, tiny in LOSS_SIZES if "losses" in parts else ():
        n, d, k = tiny if dry else full
        run_part(results, f"HALOLoss vs linear+CE, N,D,K={n},{d},{k}",
                 lambda n=n, d=d, k=k: classification(device, n, d, k, repeats))
    if "paired" in parts:
        b, dim, chunk = PAIRED_SIZE[pick]
        run_part(results, f"PairedHALOLoss (tiled) vs ClipLoss, B={b}, D={dim}",
                 lambda: paired(device, b, dim, chunk, repeats))
    if "chunked" in parts:
        n, d, k, rows = CHUNKED_SIZE[pick]
        run_part(results, f"chunked HALO vs torch linear_cross_entropy, N,D,K={n},{d},{k}",
                 lambda: chunked(device, n, d, k, rows, repeats))
    if "scoring" in parts:
        model, pairs, batch, workers = ("halo-tiny-vit", 128, 32, 2) if dry else \
            ("ViT-B-32", 8192, 256, min(16, os.cpu_count() or 1))
        run_part(results, f"halo-embed score vs open_clip, {model}, {pairs} pairs, batch {batch}",
                 lambda: scoring_throughput(device, model, pairs, batch, workers, min(repeats, 3)))
    if "cifar" in parts:
        run_part(results, "CIFAR-10 HALO vs cross-entropy, full width",
                 lambda: cifar_compare(device, args.cifar_data, 1.0 if dry else args.cifar_seconds, dry))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = unused_path(RESULTS_DIR / "device-check.json")
    atomic_write_json(out, {"dry_run": dry, "results": results})
    text = summary(results, dry)
    atomic_write_text(out.with_suffix(".md"), text)
    print(text + f"\nwritten {out} and {out.with_suffix('.md')}")
    return 0 if all(part.get("ok", True) for name, part in results.items() if name != "environment") else 3


if __name__ == "__main__":
    sys.exit(main())
