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

__all__ = ["add_dataclass_arguments", "dataclass_from_args", "given_options", "option"]

_GIVEN = "given_options"


def option(default: Any, help: str = "", *, flags: Sequence[str] | None = None, choices: Sequence[Any] | None = None,
           type: Callable[[str], Any] | None = None, nargs: str | None = None, metavar: str | None = None,
           cli: bool = True) -> Any:
    """A dataclass field that is also a command-line option (``cli=False``: a field only)."""
    metadata = {"help": help, "flags": tuple(flags) if flags else None, "choices": tuple(choices) if choices else None,
                "type": type, "nargs": nargs, "metavar": metavar, "cli": cli}
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


def _value_type(annotation: Any) -> Any:
    """``int`` of ``int``, ``int | None``, ``Optional[int]``; ``list`` of ``list[str]``."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"typing": typing}, {})  # noqa: S307 (our own annotations)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _value_type(args[0]) if len(args) == 1 else str
    if origin is list:
        return list
    return annotation


def _element_type(annotation: Any) -> Any:
    if isinstance(annotation, str):
        annotation = eval(annotation, {"typing": typing}, {})  # noqa: S307
    args = typing.get_args(annotation)
    return args[0] if args else str


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, exclude: Sequence[str] = ()) -> None:
    """One option per field of the dataclass ``cls`` (fields with ``cli=False`` or in ``exclude`` left out)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"cls must be a dataclass, got {cls!r}")
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in exclude or not meta.get("cli", True):
            continue
        default = _default(f)
        kind = _value_type(f.type)
        help_text = meta.get("help", "")
        if kind is bool:
            flags = meta.get("flags") or ((f"--no-{f.name.replace('_', '-')}",) if default
                                          else (f"--{f.name.replace('_', '-')}",))
            parser.add_argument(*flags, dest=f.name, action=_STORE_FALSE if default else _STORE_TRUE, help=help_text)
            continue
        flags = meta.get("flags") or (f"--{f.name.replace('_', '-')}",)
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "action": _STORE, "help": help_text}
        if kind is list:
            kwargs["nargs"] = meta.get("nargs") or "*"
            kwargs["type"] = meta.get("type") or _element_type(f.type)
        else:
            kwargs["type"] = meta.get("type") or kind
            if meta.get("nargs"):
                kwargs["nargs"] = meta["nargs"]
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if default is not None and help_text and "default" not in help_text:
            kwargs["help"] = f"{help_text} (default: {default})"
        parser.add_argument(*flags, **kwargs)


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    """An instance of ``cls`` from the parsed options that are its fields (``overrides`` win)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return cls(**values)


def given_options(args: argparse.Namespace) -> frozenset[str]:
    """The destinations of the options given on the command line."""
    return frozenset(getattr(args, _GIVEN, frozenset()))
