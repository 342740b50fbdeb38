"""The prepared device check: everything this project wants to know from a GPU, in one run.

Usage:
    make device-check                 # on a GPU machine: the `cuda` tests and the GPU benchmarks
    make device-check DRY_RUN=1       # the same script at tiny sizes on the CPU (CI runs it; < 2 minutes)

What it runs, each part on its own so one failure does not stop the rest:

1. the environment (torch, CUDA device, faiss GPU support);
2. the tests marked ``cuda`` and their CPU twins (``tests/test_devices.py``);
3. HALOLoss (fused) against ``F.linear`` + ``F.cross_entropy(label_smoothing=0.1)``,
   forward + backward, at (N, D, K) = (1024, 512, 1000), (4096, 128, 100) and
   (65,536, 512, 32,000);
4. PairedHALOLoss (tiled) against open_clip's ``ClipLoss`` at B = 32,768, D = 512;
5. HALOLoss(chunk_size=...) against torch's chunked ``F.linear_cross_entropy`` at
   (4096, 256, 262,144);
6. scoring throughput: ``AlignmentScorer.score`` against open_clip's own
   ``encode_image`` / ``encode_text`` + cosine on the same model and pairs.

Times are medians of interleaved repeats (CUDA synchronised); memory is the
CUDA allocator's peak for one step. Writes ``benchmarks/results/device-check.json``
and ``device-check.md`` (``-2``, ``-3`` ... when taken) and prints the summary.
Not yet in it: the full-width CIFAR-10 compare (the GPU machine has no
dataset download; the data would have to travel with the repository).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from _common import RESULTS_DIR, hardware, interleaved_times

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


def scoring(device: torch.device, pairs: int, batch: int, repeats: int) -> dict[str, Any]:
    """Pairs per second: AlignmentScorer.score against open_clip's encode_image / encode_text + cosine,
    both from preprocessed pixels and raw captions, on the same model (the built-in ``halo-tiny-vit``)."""
    from halo_embed.clip import HALOCLIP, AlignmentScorer, load_backbone

    torch.manual_seed(0)
    model = HALOCLIP(load_backbone("open_clip", "halo-tiny-vit"), num_candidates=batch)
    size = model.backbone.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    pixels = torch.randn(pairs, 3, size, size)
    captions = [f"a photo of a {('cat', 'dog', 'car')[i % 3]} number {i}" for i in range(pairs)]
    model.calibrate([(pixels[:batch], model.tokenize(captions[:batch]))])
    scorer = AlignmentScorer(model, device=device, batch_size=batch)
    inner = model.backbone.model

    @torch.no_grad()
    def open_clip_cosine() -> None:
        for start in range(0, pairs, batch):
            images = F.normalize(inner.encode_image(pixels[start : start + batch].to(device)), dim=-1)
            tokens = model.backbone.tokenize(captions[start : start + batch]).to(device)
            texts = F.normalize(inner.encode_text(tokens), dim=-1)
            (images * texts).sum(-1).cpu()

    def halo_scorer() -> None:
        scorer.score(pixels, captions)

    result = timed_pair(device, {"open_clip encode + cosine": open_clip_cosine, "AlignmentScorer.score": halo_scorer},
                        repeats)
    result["pairs_per_s"] = {name: pairs / s for name, s in result["seconds"].items()}
    return result


def device_tests() -> dict[str, Any]:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_devices.py", "-rs"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = done.stdout.strip().splitlines()
    return {"returncode": done.returncode, "summary": lines[-1] if lines else "", "tail": "\n".join(lines[-15:])}


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
        else:
            cell = part.get("summary", "ok")
        lines.append(f"| {name} | {cell} | {part['wall_s']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (checks that the script works)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 5; dry run 2)")
    args = parser.parse_args()
    dry = args.dry_run
    device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
    if not dry and device.type != "cuda":
        print("no CUDA device: run with --dry-run (DRY_RUN=1) to check the script on the CPU", file=sys.stderr)
        return 2
    repeats = args.repeats or (2 if dry else 5)
    pick = 1 if dry else 0
    results: dict[str, Any] = {"environment": hardware()}
    run_part(results, "cuda tests (tests/test_devices.py)", device_tests)
    for full, tiny in LOSS_SIZES:
        n, d, k = tiny if dry else full
        run_part(results, f"HALOLoss vs linear+CE, N,D,K={n},{d},{k}",
                 lambda n=n, d=d, k=k: classification(device, n, d, k, repeats))
    b, dim, chunk = PAIRED_SIZE[pick]
    run_part(results, f"PairedHALOLoss (tiled) vs ClipLoss, B={b}, D={dim}",
             lambda: paired(device, b, dim, chunk, repeats))
    n, d, k, rows = CHUNKED_SIZE[pick]
    run_part(results, f"chunked HALO vs torch linear_cross_entropy, N,D,K={n},{d},{k}",
             lambda: chunked(device, n, d, k, rows, repeats))
    pairs, batch = (256, 64) if dry else (8192, 512)
    run_part(results, f"scoring throughput, {pairs} pairs, batch {batch}", lambda: scoring(device, pairs, batch, repeats))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = unused_path(RESULTS_DIR / "device-check.json")
    atomic_write_json(out, {"dry_run": dry, "results": results})
    text = summary(results, dry)
    atomic_write_text(out.with_suffix(".md"), text)
    print(text + f"\nwritten {out} and {out.with_suffix('.md')}")
    return 0 if all(part.get("ok", True) for name, part in results.items() if name != "environment") else 3


if __name__ == "__main__":
    sys.exit(main())
