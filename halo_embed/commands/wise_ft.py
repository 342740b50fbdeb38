"""``halo-embed wise-ft``: weight-space ensembling of a fine-tuning run's initial and fine-tuned models.

    halo-embed wise-ft runs/finetune-halo --alphas 0 0.25 0.5 0.75 1

For each alpha the model with weights ``(1 - alpha) * initial + alpha *
fine-tuned`` (Wortsman et al., 2022) is evaluated on the run's validation data
(retrieval, rejection) and its ``--zeroshot-data`` (zero-shot accuracy), and
saved as a checkpoint (HALO's load in ``halo-embed score``). The run must have
been started with ``--wise-ft`` (which keeps ``checkpoint-initial/``).
"""

from __future__ import annotations

import argparse

HELP = "WiSE-FT: interpolate a run's initial and fine-tuned weights, evaluate and save each alpha"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..recipes.wise_ft import add_arguments as add

    add(parser)


def run(args: argparse.Namespace) -> int:
    from ..recipes.wise_ft import run as run_recipe

    return run_recipe(args)
