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
                      sync: bool = False) -> dict[str, float]:
    """Median seconds per call of each variant, the variants alternating so machine noise hits all alike."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(median_time(fn, repeats=1, warmup=0, sync=sync))
    return {name: statistics.median(values) for name, values in times.items()}


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def extra_peak_in_subprocess(script: str, variant: str, size: str) -> float:
    """Peak memory (MiB) one forward+backward adds on top of its inputs, measured in a fresh process.

    The script is run as ``script --memory-worker VARIANT SIZE`` and must print
    ``{"extra_mb": ...}`` as its last line (see :func:`memory_worker`).
    """
    out = subprocess.run([sys.executable, script, "--memory-worker", variant, size],
                         capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"])


def memory_worker(setup: Callable[[], Any], step: Callable[[Any], object]) -> None:
    """Build the inputs, note the peak RSS, run one step, print the peak it added (JSON)."""
    state = setup()
    before = peak_rss_mb()
    step(state)
    print(json.dumps({"extra_mb": peak_rss_mb() - before}))
