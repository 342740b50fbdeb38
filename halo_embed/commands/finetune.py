"""``halo-embed finetune``: fine-tune a CLIP model with HALO (or compare losses), driven by Accelerate.

Runs on the built-in shapes data with a small built-in architecture when no
arguments are given. Under ``accelerate launch halo-embed finetune ...`` the
same command trains on several GPUs or machines. See
``python -m halo_embed.recipes.clip_finetune --help`` for the method.
"""

from __future__ import annotations

import argparse

HELP = "fine-tune CLIP with HALO (or clip / siglip for comparison) using Accelerate"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..recipes.finetune_config import add_arguments as add

    add(parser)


def run(args: argparse.Namespace) -> int:
    from ..recipes.clip_finetune import run as run_recipe

    return run_recipe(args)
