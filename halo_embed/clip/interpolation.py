"""Weight-space ensembling (WiSE-FT, Wortsman et al., CVPR 2022): interpolate the initial and the
fine-tuned weights to keep what a pretrained model knew while gaining what fine-tuning taught it.

    model = interpolate_weights(initial, finetuned, alpha=0.5)     # 0: initial, 1: fine-tuned

Every floating-point tensor of the state dict is interpolated linearly, with
two HALO-specific rules that keep the model's geometry consistent:

- the temperature is interpolated as the effective value
  ``(1 - alpha) * T0 + alpha * T1`` (the raw ``gamma`` is its inverse
  softplus), not as the raw parameter;
- the feature adapter's statistics are interpolated like the weights. With
  ``normalization="fixed"`` (the default) both end points hold the same
  statistics (measured once, before the first step), so every alpha uses them
  unchanged; with ``"running"`` the interpolated statistics are an
  approximation of the interpolated model's.

Integer buffers (counters) are taken from the fine-tuned model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .. import geometry
from .._validation import check_float
from .contrastive import ContrastiveCLIP
from .model import HALOCLIP

__all__ = ["interpolate_weights"]


def _architecture(model: nn.Module) -> dict:
    spec = model.backbone.spec()
    if isinstance(model, HALOCLIP):
        return {"backbone": spec, "loss": model.loss_config(), "adapter": model.adapter_config()}
    return {"backbone": spec, "loss": model.loss_name}


def interpolate_weights(initial: HALOCLIP | ContrastiveCLIP, finetuned: HALOCLIP | ContrastiveCLIP,
                        alpha: float) -> HALOCLIP | ContrastiveCLIP:
    """A new model with the weights ``(1 - alpha) * initial + alpha * finetuned`` (see the module docstring).

    Args:
        initial: the model before fine-tuning (for HALO: after the adapter's statistics are measured).
        finetuned: the same architecture after fine-tuning.
        alpha: in ``[0, 1]``; 0 gives the initial weights, 1 the fine-tuned ones.

    Returns:
        A copy of ``finetuned`` (same class, device and dtypes) holding the interpolated weights.

    Raises:
        TypeError: the models are not both HALOCLIP or both ContrastiveCLIP.
        ValueError: ``alpha`` outside ``[0, 1]``, or the two differ in architecture, loss or state-dict keys.
    """
    for name, model in (("initial", initial), ("finetuned", finetuned)):
        if not isinstance(model, (HALOCLIP, ContrastiveCLIP)):
            raise TypeError(f"{name} must be a HALOCLIP or a ContrastiveCLIP, got {type(model).__name__}")
    if type(initial) is not type(finetuned):
        raise TypeError(f"initial and finetuned must be the same kind of model, got {type(initial).__name__} and "
                        f"{type(finetuned).__name__}")
    alpha = check_float("alpha", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if _architecture(initial) != _architecture(finetuned):
        raise ValueError("initial and finetuned differ in architecture, loss or adapter settings: WiSE-FT "
                         "interpolates two checkpoints of one fine-tuning run")
    start, end = initial.state_dict(), finetuned.state_dict()
    if start.keys() != end.keys():
        missing = sorted(start.keys() ^ end.keys())
        raise ValueError(f"initial and finetuned have different weights, e.g. {missing[0]!r}")
    mixed = {}
    for key, value in end.items():
        first = start[key]
        if first.shape != value.shape:
            raise ValueError(f"{key} has shape {tuple(first.shape)} in initial and {tuple(value.shape)} in finetuned")
        if value.is_floating_point():
            lerp = torch.lerp(first.to(value.device, torch.float32), value.float(), alpha)
            mixed[key] = lerp.to(value.dtype)
        else:
            mixed[key] = value
    model = copy.deepcopy(finetuned)
    model.load_state_dict(mixed)
    if isinstance(model, HALOCLIP):
        temperature = (1 - alpha) * float(initial.temperature.detach()) + alpha * float(finetuned.temperature.detach())
        with torch.no_grad():
            model.loss.gamma.fill_(geometry.inverse_softplus(temperature))
    return model
