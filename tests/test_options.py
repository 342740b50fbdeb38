"""Options declared once as dataclass fields: the parser built from them, and explicit flags recorded."""

import argparse
from dataclasses import dataclass

import pytest

from halo_embed.recipes.finetune_config import FinetuneConfig, add_arguments, configs_from_args
from halo_embed.recipes.options import add_dataclass_arguments, dataclass_from_args, given_options, option


@dataclass
class Toy:
    epochs: int = option(5, "passes over the data")
    limit: int | None = option(None, "at most this many")
    rate: float = option(0.5, "a rate", flags=("--rate", "--learning-rate"))
    sets: list[str] = option([], "names")
    fast: bool = option(False, "go fast")
    progress: bool = option(True, "no bar", flags=("--no-progress",))
    kind: str = option("a", "which", choices=("a", "b"))


def parse(argv):
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Toy)
    return parser.parse_args(argv)


def test_parser_from_the_dataclass():
    args = parse([])
    assert dataclass_from_args(Toy, args) == Toy()
    assert given_options(args) == frozenset()
    args = parse(["--epochs=7", "--limit", "3", "--learning-rate", "0.1", "--sets", "x", "y", "--fast",
                  "--no-progress", "--kind", "b"])
    assert dataclass_from_args(Toy, args) == Toy(epochs=7, limit=3, rate=0.1, sets=["x", "y"], fast=True,
                                                 progress=False, kind="b")
    assert given_options(args) == {"epochs", "limit", "rate", "sets", "fast", "progress", "kind"}
    assert Toy().sets is not Toy().sets  # a fresh list per instance
    with pytest.raises(SystemExit):
        parse(["--kind", "c"])
    with pytest.raises(SystemExit):
        parse(["--epochs", "many"])


def test_help_comes_from_the_field():
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Toy)
    text = parser.format_help()
    assert "passes over the data (default: 5)" in text and "--learning-rate" in text and "--no-progress" in text
    with pytest.raises(TypeError, match="cls must be a dataclass"):
        add_dataclass_arguments(parser, int)


def test_every_finetune_field_is_an_option_and_back():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    (config,) = configs_from_args(args)
    assert config == FinetuneConfig()
    args = parser.parse_args(["--output", "elsewhere", "--no-distill", "--loss", "halo", "clip", "--ood-data", "a",
                              "--max-steps=3", "--grad-clip-norm", "0.5", "--lock-text"])
    halo, clip = configs_from_args(args)
    assert (halo.loss, clip.loss) == ("halo", "clip") and halo.logs.startswith("elsewhere")
    assert not halo.distill and halo.ood_data == ["a"] and halo.max_steps == 3 and halo.grad_clip_norm == 0.5
    assert halo.lock_text and not halo.lock_image


def test_resume_help_lists_what_a_resume_may_change():
    """Both recipes' --help name every option a resume may change, as the user spells it."""
    import argparse

    from halo_embed.recipes import cifar_config, finetune_config

    for module in (cifar_config, finetune_config):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        text = " ".join(next(a.help for a in parser._actions if a.dest == "resume").split())
        flags = {a.dest: a.option_strings for a in parser._actions if a.option_strings}
        assert all(any(f"{flag}," in f"{text}," for flag in flags[name]) for name in module.RESUMABLE_OPTIONS), text
        assert "--no-progress" in text and "--progress" not in text.replace("--no-progress", "")


def test_both_recipes_spell_shared_options_alike():
    """The run folder's parent and the weight decay take the same flags in both recipes."""
    import argparse

    from halo_embed.recipes import cifar_config, finetune_config

    for module, output, decay in ((cifar_config, "output", "weight_decay"), (finetune_config, "logs", "wd")):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        for flags in (["--output", "a", "--wd", "0.01"], ["--logs", "a", "--weight-decay", "0.01"]):
            args = parser.parse_known_args(flags)[0]
            assert getattr(args, output) == "a" and getattr(args, decay) == 0.01, (module.__name__, flags)

