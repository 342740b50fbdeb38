"""Each recipe option declared once: a dataclass field with its help, from which the parser is built.

    @dataclass
    class Config:
        epochs: int = option(5, "passes over the training data")
        lr: float = option(5e-4, "peak learning rate", flags=("--lr", "--learning-rate"))
        progress: bool = option(True, "progress bar", flags=("--no-progress",))

    add_dataclass_arguments(parser, Config)
    config = dataclass_from_args(Config, parser.parse_args())

The flag is the field's name with dashes (or ``flags``); the type comes from
the annotation (``int | None`` parses an int); a ``bool`` defaulting to False
is a switch that sets it, one defaulting to True a ``--no-...`` switch that
clears it; a ``list`` takes any number of values. Every option records that it
was given (``given_options(args)``), however it was spelt (``--epochs 7``,
``--epochs=7``, an unambiguous abbreviation), so that a preset never overrides
an explicit choice. (The same idea as transformers' ``HfArgumentParser``,
without its dependency on the training stack's argument conventions.)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from typing import Any, Callable, Sequence

__all__ = ["add_dataclass_arguments", "dataclass_from_args", "given_options", "option", "resume_help"]

_GIVEN = "given_options"


def option(default: Any, help: str = "", *, flags: Sequence[str] | None = None, choices: Sequence[Any] | None = None,
           type: Callable[[str], Any] | None = None, nargs: str | None = None) -> Any:
    """A dataclass field that is also a command-line option."""
    metadata = {"help": help, "flags": tuple(flags) if flags else None, "choices": tuple(choices) if choices else None,
                "type": type, "nargs": nargs}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: copy.copy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _recording(base: type[argparse.Action]) -> type[argparse.Action]:
    class Recording(base):
        def __call__(self, parser, namespace, values, option_string=None):
            super().__call__(parser, namespace, values, option_string)
            setattr(namespace, _GIVEN, getattr(namespace, _GIVEN, frozenset()) | {self.dest})

    Recording.__name__ = f"Recording{base.__name__}"
    return Recording


_STORE = _recording(argparse._StoreAction)
_STORE_TRUE = _recording(argparse._StoreTrueAction)
_STORE_FALSE = _recording(argparse._StoreFalseAction)


def _parse_type(hint: Any) -> tuple[Any, bool]:
    """``(type of one value, is a list)`` of a resolved annotation: ``int | None`` -> ``(int, False)``,
    ``list[str]`` -> ``(str, True)``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _parse_type(args[0]) if len(args) == 1 else (str, False)
    if typing.get_origin(hint) is list:
        return (typing.get_args(hint) or (str,))[0], True
    return hint, False


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per field of the dataclass ``cls``."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"cls must be a dataclass, got {cls!r}")
    hints = typing.get_type_hints(cls)  # resolves ``from __future__ import annotations`` strings
    for f in dataclasses.fields(cls):
        meta = f.metadata
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kind, is_list = _parse_type(hints[f.name])
        dashed = f"--{f.name.replace('_', '-')}"
        help_text = meta.get("help", "")
        if kind is bool:  # a switch: sets a False default, clears a True one (--no-...)
            flags = meta.get("flags") or ((f"--no-{dashed[2:]}",) if default else (dashed,))
            parser.add_argument(*flags, dest=f.name, action=_STORE_FALSE if default else _STORE_TRUE, help=help_text)
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "action": _STORE, "type": meta.get("type") or kind,
                                  "help": help_text}
        if is_list or meta.get("nargs"):
            kwargs["nargs"] = meta.get("nargs") or "*"
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if default is not None and help_text and "default" not in help_text:  # some helps say it themselves
            kwargs["help"] = f"{help_text} (default: {default})"
        parser.add_argument(*(meta.get("flags") or (dashed,)), **kwargs)


def resume_help(what: str, resumable: Sequence[str]) -> str:
    """``--resume``'s help: what it takes and the options a resume may change (the rest define the run)."""
    flags = ", ".join("--no-progress" if name == "progress" else f"--{name.replace('_', '-')}" for name in resumable)
    return f"{what}, or 'latest' (this run's); a resume continues the run as it was started and may change only {flags}"


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    """An instance of ``cls`` from the parsed options that are its fields (``overrides`` win)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return cls(**values)


def given_options(args: argparse.Namespace) -> frozenset[str]:
    """The destinations of the options given on the command line."""
    return frozenset(getattr(args, _GIVEN, frozenset()))
