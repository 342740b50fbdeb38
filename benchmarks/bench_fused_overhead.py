"""What a step of the fused HALO loss costs beyond arithmetic: ops, fixed overhead, page faults.

Usage: python benchmarks/bench_fused_overhead.py [--repeats 301]

For HALOLoss (fused) and F.linear + F.cross_entropy(label_smoothing=0.1), forward +
backward: the number of aten ops one step dispatches, the median time of a step at
N, D, K = 8, 4, 3 (where the arithmetic is nothing and the time is Python and
dispatch), and the minor page faults per step at N, D, K = 4096, 128, 100 (fresh
memory the kernel has to map; glibc returns freed blocks to it, and on a VM each
first touch of a 4 KiB page is expensive).
"""

from __future__ import annotations

import argparse
import resource

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _common import LossSteps, interleaved_times, print_table, save


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def steps(n: int, d: int, k: int) -> dict:
    data = LossSteps(n, d, k)
    return {"linear+cross_entropy": data.cross_entropy, "halo fused": data.halo()}


def faults_per_step(step, repeats: int = 20) -> float:
    for _ in range(5):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=301)
    args = parser.parse_args()
    tiny = steps(8, 4, 3)
    ops = {}
    for name, step in tiny.items():
        step()
        with _CountOps() as counter:
            step()
        ops[name] = counter.count
    times = interleaved_times(tiny, repeats=args.repeats, warmup=20)
    faults = {name: faults_per_step(step) for name, step in steps(4096, 128, 100).items()}
    print(f"forward+backward on cpu, {torch.get_num_threads()} threads")
    print_table(["variant", "aten ops per step", "us per step at 8x4x3", "page faults per step at 4096x128x100"],
                [[name, ops[name], f"{1e6 * times[name]:.0f}", f"{faults[name]:.0f}"] for name in tiny])
    save("fused_overhead", {"ops_per_step": ops, "tiny_step_s": times, "page_faults_per_step": faults})


if __name__ == "__main__":
    main()
