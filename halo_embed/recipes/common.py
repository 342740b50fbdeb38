"""Pieces every recipe uses: the learning-rate schedule, the report pointer and ``python -m`` entry points.

Seeds come from accelerate (``accelerate.utils.set_seed``: python, numpy,
torch and every accelerator); run folders, checkpoints and logs from
:mod:`halo_embed.recipes.runs`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["print_reports", "recipe_main", "warmup_cosine"]


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                  constant_groups: Sequence[int] = ()) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base LR over ``warmup`` steps, then cosine decay to 0 at ``total``
    (the parameter groups in ``constant_groups`` stay at their base LR after the warm-up).

    transformers' ``get_cosine_schedule_with_warmup`` differs in one step: its
    first step has learning rate 0 (a step wasted); this one reaches the base
    rate at step ``warmup - 1``. Every measured table in README was made with
    this schedule, so it stays.
    """

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def constant(step: int) -> float:
        return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0

    if not constant_groups:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    factors = [constant if i in constant_groups else factor for i in range(len(optimizer.param_groups))]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


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

    from ..exit_status import run_handler

    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_handler(prog.rsplit(".", 1)[-1], run, parser.parse_args(argv))
