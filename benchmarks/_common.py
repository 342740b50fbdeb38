"""Helpers shared by the benchmarks: timing, hardware description, table and JSON output."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from halo_embed.io import atomic_write_json  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def hardware() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "logical_cpus": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, sync: bool = False) -> float:
    """Median wall time of ``fn`` in seconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def print_table(header: list[str], rows: list[list[object]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header] + rows:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))


def save(name: str, payload: dict) -> Path:
    path = RESULTS_DIR / f"{name}.json"
    atomic_write_json(path, {"hardware": hardware(), **payload})
    print(f"wrote {path}")
    return path


def interleaved_times(variants: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
                      sync: bool = False, block: int = 1) -> dict[str, float]:
    """Median seconds per call of each variant, the variants alternating so machine noise hits all alike.

    ``block > 1``: each turn of a variant is one untimed call and then ``block`` timed ones, so
    ``repeats * block`` calls are timed per variant. A training loop repeats one loss, and the
    allocator settles into that loss's pattern; alternating single calls of variants that allocate
    differently keeps glibc mapping fresh memory, whose page faults land on whichever variant
    follows (on the development VM ~1.3 us per 4 KiB page, a third of a (4096, 128, 100) step).
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            if block > 1:
                fn()
            times[name] += [median_time(fn, repeats=1, warmup=0, sync=sync) for _ in range(block)]
    return {name: statistics.median(values) for name, values in times.items()}


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def extra_peak_in_subprocess(script: str, variant: str, size: str) -> float:
    """Peak memory (MiB) one forward+backward adds on top of what exists before it, in a fresh process.

    The script is run as ``script --memory-worker VARIANT SIZE`` and must print
    ``{"extra_mb": ...}`` as its last line (see :func:`memory_worker`). glibc is
    told to serve every allocation above 64 KiB with its own mapping, so freed
    buffers leave the resident set at once and the peak RSS follows the peak
    of live tensors instead of the allocator's caching.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, script, "--memory-worker", variant, size],
                         capture_output=True, text=True, check=True, env=env)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"])


def memory_worker(setup: Callable[[], Any], step: Callable[[Any], object]) -> None:
    """Build the inputs, run one warm-up step, then print the peak RSS the next step adds (JSON).

    Inputs (and whatever the step keeps between calls) are not counted; the
    gradients a step produces are, unless the step keeps them from the warm-up.
    """
    state = setup()
    step(state)
    if _reset_peak_rss():
        before = _status_mb("VmRSS")
        step(state)
        extra = _status_mb("VmHWM") - before
    else:  # no resettable peak: the lifetime peak, which may hide a step smaller than start-up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        step(state)
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    print(json.dumps({"extra_mb": extra}))


class LossSteps:
    """One forward + backward of HALOLoss (fused) and of F.linear + F.cross_entropy(ls=0.1) on the same tensors.

    ``x`` (N, D) standard normal times ``scale``, class weights / centroids ``w`` (K, D), labels ``y``;
    seeded, so every script that uses the same sizes times the same data. :meth:`halo` takes an
    optional ``prepare`` callable run at the start of each HALO step (to switch an implementation
    detail between interleaved variants).
    """

    def __init__(self, n: int, d: int, k: int, scale: float = 1.0, seed: int = 0) -> None:
        from halo_embed import HALOLoss

        g = torch.Generator().manual_seed(seed)
        self.x = (scale * torch.randn(n, d, generator=g)).requires_grad_(True)
        self.w = torch.randn(k, d, generator=g).requires_grad_(True)
        self.y = torch.randint(0, k, (n,), generator=g)
        self.loss_fn = HALOLoss(d, k)

    def cross_entropy(self) -> None:
        torch.nn.functional.cross_entropy(torch.nn.functional.linear(self.x, self.w), self.y,
                                          label_smoothing=0.1).backward()
        self.x.grad = self.w.grad = None

    def halo(self, prepare: Callable[[], object] | None = None) -> Callable[[], None]:
        def step() -> None:
            if prepare is not None:
                prepare()
            loss, _ = self.loss_fn(self.x, self.y, self.w)
            loss.backward()
            self.x.grad = self.w.grad = self.loss_fn.gamma.grad = None
        return step
