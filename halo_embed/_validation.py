"""Argument checks shared by every public function.

Each check raises ``TypeError`` (wrong kind of object) or ``ValueError`` (right
kind, wrong value) with a message that names the argument and what it got, so a
user never has to read a traceback from deep inside torch to find the mistake.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_tensor",
    "raise_if_any",
    "raise_if_not_finite",
]


def _kind(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """Return ``value`` as an ``int``; reject bools, floats and values below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_kind(value)}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_float(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    include_maximum: bool = True,
) -> float:
    """Return ``value`` as a finite ``float`` inside ``[minimum, maximum]`` (or ``[minimum, maximum)``).

    A one-element floating tensor counts as its value (temperatures and biases are often parameters).
    """
    if isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point():
        value = float(value.detach())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_kind(value)}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None:
        if include_maximum and value > maximum:
            raise ValueError(f"{name} must be <= {maximum}, got {value}")
        if not include_maximum and value >= maximum:
            raise ValueError(f"{name} must be < {maximum}, got {value}")
    return value


def check_temperature(name: str, value: object) -> float:
    """The effective temperature ``softplus(gamma)`` as a float: finite and > 0."""
    value = check_float(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be the effective (positive) temperature, got {value}")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_kind(value)}")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | None = None,
    floating: bool | None = None,
    integer: bool = False,
    min_rows: int | None = None,
) -> Tensor:
    """Check that ``value`` is a tensor of the given rank and dtype family.

    ``floating=True`` asks for a floating-point dtype, ``integer=True`` for an
    integer dtype (``bool`` is not an integer here). Shape relations between
    several tensors are checked by the caller, which knows their names.
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_kind(value)}")
    if ndim is not None and value.dim() != ndim:
        shape = {1: "(N,)", 2: "(N, D)"}.get(ndim, f"{ndim} dimensions")
        raise ValueError(
            f"{name} must have {ndim} dimension(s) {shape}, got shape {tuple(value.shape)}"
        )
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor (e.g. torch.long), got dtype {value.dtype}")
    if min_rows is not None and value.dim() > 0 and value.shape[0] < min_rows:
        raise ValueError(f"{name} must not be empty, got shape {tuple(value.shape)}")
    return value


def check_device(name: str, value: object) -> torch.device:
    """``value`` as a ``torch.device`` that exists on this machine (``cuda`` needs a CUDA GPU, ``mps`` Apple's)."""
    if isinstance(value, torch.device):
        device = value
    elif isinstance(value, str):
        try:
            device = torch.device(value)
        except RuntimeError:
            raise ValueError(f"{name} must be a device such as cpu, cuda or cuda:1, got {value!r}") from None
    else:
        raise TypeError(f"{name} must be a device name or torch.device, got {_kind(value)}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{name} is {value!s}, but no CUDA GPU is available here; use cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{name} is {value!s}, but this machine has {count} CUDA GPU(s)")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{name} is {value!s}, but MPS is not available here; use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{name} must be cpu, cuda[:N] or mps, got {value!r}")
    return device


Message = Union[str, Callable[[], str]]


def raise_if_any(checks: Sequence[tuple[Tensor, Message]]) -> None:
    """Evaluate several data-dependent checks with a single host sync.

    ``checks`` holds ``(bad, message)`` pairs where ``bad`` is a 0-d bool
    tensor that is ``True`` when the check fails, and ``message`` a string or a
    callable that builds one (so the values quoted in it are only read from
    the device when the check has failed). Reading the flags one by one would
    stall a CUDA stream once per check; stacking them costs one transfer.
    """
    if not checks:
        return
    flags = torch.stack([bad.reshape(()) for bad, _ in checks]).tolist()
    for failed, (_, message) in zip(flags, checks):
        if failed:
            raise ValueError(message() if callable(message) else message)


def raise_if_not_finite(result: Tensor, inputs: Sequence[tuple[str, Tensor]]) -> None:
    """Raise a ``ValueError`` naming the culprit when ``result`` has NaN or inf values.

    Checking a (usually scalar) result costs one host sync instead of a pass
    over every input: NaN and inf inputs always reach the loss, so the inputs
    are only inspected once the result is known to be bad.
    """
    # a scalar through item(): one op instead of isfinite's four and all's one (both sync the device)
    if math.isfinite(result.item()) if result.numel() == 1 else bool(torch.isfinite(result).all()):
        return
    for name, value in inputs:
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} contains NaN or inf values")
    largest = ", ".join(f"{name} {value.detach().abs().max().item():.3g}" for name, value in inputs)
    raise ValueError(f"the loss is not finite although its inputs are (largest magnitudes: {largest}); "
                     "rescale the features")

