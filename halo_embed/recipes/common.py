"""Pieces every recipe uses: seeding, the learning-rate schedule, atomic training checkpoints."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..io import atomic_path

__all__ = [
    "load_training_state",
    "print_reports",
    "recipe_main",
    "rng_state",
    "save_training_state",
    "seed_everything",
    "set_rng_state",
    "warmup_cosine",
]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base LR over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """``torch.save`` through a temporary file: a crash leaves the previous checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or foreign file
        raise ValueError(f"{path} is damaged or not a halo-embed training checkpoint: {error}") from error


def refuse_to_overwrite(run_dir: Path, resume: object, saved: Sequence[str]) -> None:
    """A run never overwrites another: a folder holding any of ``saved`` is only continued, with --resume.

    (A folder without them holds a run that stopped before its first save; it may start again.)
    """
    if resume is None and any((Path(run_dir) / name).exists() for name in saved):
        raise FileExistsError(f"run folder {run_dir} already holds a run: continue it with --resume latest, "
                              "or choose another --name or --output")


def print_reports(configs, results, write_comparison) -> int:
    """Say where the report is: one run's ``report.md``, or the comparison of several (written here)."""
    if len(configs) > 1:
        print(f"comparison: {write_comparison(configs, results)}")
    else:
        print(f"report: {configs[0].run_dir() / 'report.md'}")
    return 0


def recipe_main(prog: str, description: str, add_arguments, run, argv=None) -> int:
    """``python -m halo_embed.recipes.<name>``: the same arguments and error handling as ``halo-embed <name>``."""
    import argparse

    from ..cli import run_handler

    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_handler(prog.rsplit(".", 1)[-1], run, parser.parse_args(argv))
