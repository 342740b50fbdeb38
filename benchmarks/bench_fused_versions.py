"""The fused HALO loss of an earlier commit against the current one, in one process.

Usage: python benchmarks/bench_fused_versions.py [--commit 8c41247] [--repeats 41] [--block 10] [--control]

The development machines are shared VMs whose speed drifts between sessions,
so a change to the fused loss is judged here: the file
``halo_embed/losses/fused.py`` of ``--commit`` (read with ``git show``) is loaded
beside the current one, and both run inside the same ``HALOLoss`` against
``F.linear`` + ``F.cross_entropy(label_smoothing=0.1)``, interleaved, forward +
backward, at the sizes of ``bench_halo_loss.py`` and on "wide" data (embeddings
scaled by 12, so most logits lie far below their row's maximum, as after
training with a large temperature). ``--block`` times runs of consecutive steps
(steady state, as in a training loop) instead of alternating single steps, and
``--control`` adds an A/A row that shows the comparison's own noise.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from _common import LossSteps, interleaved_times, print_table, save

from halo_embed import geometry
from halo_embed.losses import fused as current
from halo_embed.losses import halo as halo_module

ROOT = Path(__file__).resolve().parents[1]
CASES = {"1024x512x1000": (1024, 512, 1000, 1.0), "4096x128x100": (4096, 128, 100, 1.0),
         "4096x128x100 wide": (4096, 128, 100, 12.0)}


def setattr_many(target, **values) -> None:
    for name, value in values.items():
        setattr(target, name, value)


def load_fused_at(commit: str):
    source = subprocess.run(["git", "show", f"{commit}:halo_embed/losses/fused.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    if not hasattr(geometry, "radial_nll_grad"):   # merged into radial_nll_and_grad since 8c41247
        geometry.radial_nll_grad = lambda r_sq, d: geometry.radial_nll_and_grad(r_sq, d)[1]
    path = Path(tempfile.mkdtemp()) / "fused_old.py"
    path.write_text(source)
    # a submodule of halo_embed.losses, so that its relative imports resolve as in the package
    spec = importlib.util.spec_from_file_location("halo_embed.losses._fused_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", default="8c41247")
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--block", type=int, default=1,
                        help="timed calls in a row per turn of a variant, after an untimed one (see interleaved_times)")
    parser.add_argument("--control", action="store_true",
                        help="time the current version twice (an A/A row: the noise of the comparison)")
    args = parser.parse_args()
    old = load_fused_at(args.commit)
    rows, payload = [], {"commit": args.commit, "block": args.block}
    for name, (n, d, k, scale) in CASES.items():
        data = LossSteps(n, d, k, scale)

        def use(module):   # run HALOLoss through this version of the fused function
            return lambda: setattr_many(halo_module, fused_halo_cross_entropy=module.fused_halo_cross_entropy,
                                        Positives=module.Positives)

        try:
            variants = {"linear+cross_entropy": data.cross_entropy, f"fused at {args.commit}": data.halo(use(old)),
                        "fused now": data.halo(use(current))}
            if args.control:
                variants["fused now (again)"] = data.halo(use(current))
            times = interleaved_times(variants, repeats=args.repeats, warmup=3, block=args.block)
        finally:
            use(current)()
        base = times["linear+cross_entropy"]
        rows += [[name, variant, f"{1000 * t:.2f}", f"{t / base:.2f}"] for variant, t in times.items()]
        payload[name] = times
    print(f"forward+backward on cpu, {torch.get_num_threads()} threads, same process, block {args.block}")
    print_table(["N x D x K", "variant", "ms", "time ratio"], rows)
    save("fused_versions", payload)


if __name__ == "__main__":
    sys.exit(main())
