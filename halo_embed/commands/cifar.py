"""``halo-embed cifar``: the CIFAR reference recipe (ResNet-18, HALO vs cross-entropy).

    halo-embed cifar compare --dataset cifar10 --data-dir data --download
    halo-embed cifar --loss halo --preset small --data-dir runs/data/cifar10 --near-ood ... --far-ood ...

See ``python -m halo_embed.recipes.cifar --help`` for the method and defaults.
"""

from __future__ import annotations

import argparse

HELP = "the CIFAR reference recipe: ResNet-18 with HALO vs cross-entropy, measured like the published table"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..recipes.cifar import add_arguments as add

    add(parser)


def run(args: argparse.Namespace) -> int:
    from ..recipes.cifar import run as run_recipe

    return run_recipe(args)
