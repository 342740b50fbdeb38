"""Model checkpoints: a folder with ``model.safetensors`` + ``config.json``.

A :class:`~halo_embed.clip.HALOCLIP` checkpoint is what the scorer loads; a
:class:`~halo_embed.clip.ContrastiveCLIP` one (CLIP's or SigLIP's loss) holds
the baseline of a comparison and the end points of WiSE-FT. The folder
rebuilds the model without the training code and without downloading anything: ``config.json`` describes the backbone (for
open_clip the folder is also a valid ``local-dir:`` with its
``open_clip_config.json``; for transformers the tokenizer and image processor
are saved under ``processor/``), the adapter and the loss.

Saving is atomic: the new checkpoint is written into a hidden sibling folder
and moved into place with renames, so a crash mid-save leaves the previous
checkpoint intact (at worst renamed to ``.<name>.old-*`` for the instant
between the two renames, which :func:`load_checkpoint` reports).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..io import new_file_mode, to_jsonable
from .backbones import rebuild_backbone
from .contrastive import ContrastiveCLIP
from .decision import PairDecision
from .model import HALOCLIP

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_checkpoint", "load_model", "save_checkpoint"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "halo-embed/haloclip"
CONTRASTIVE_FORMAT = "halo-embed/contrastive"
FORMAT_VERSION = 1


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def save_checkpoint(model: HALOCLIP | ContrastiveCLIP, directory: str | os.PathLike,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``directory`` atomically (replacing an existing checkpoint there).

    Args:
        model: the model to save (a :class:`HALOCLIP` or a :class:`ContrastiveCLIP`).
        directory: the checkpoint folder.
        extra: JSON-able information stored under ``"extra"`` in ``config.json``
            (e.g. the training step and run arguments).
    """
    from safetensors.torch import save_model

    if not isinstance(model, (HALOCLIP, ContrastiveCLIP)):
        raise TypeError(f"model must be a HALOCLIP or a ContrastiveCLIP, got {type(model).__name__}")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # a save that was killed left its staging folder; one process writes a checkpoint, so any is stale
    for stale in directory.parent.glob(f".{directory.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging = directory.parent / f".{directory.name}.tmp-{tag}"
    staging.mkdir()
    try:
        kind = FORMAT if isinstance(model, HALOCLIP) else CONTRASTIVE_FORMAT
        save_model(model, str(staging / WEIGHTS_NAME), metadata={"format": kind})
        model.backbone.save_files(staging)
        config = {"format": kind, "format_version": FORMAT_VERSION, "halo_embed_version": __version__,
                  "backbone": model.backbone.spec(), "embed_dim": model.backbone.embed_dim}
        if isinstance(model, HALOCLIP):
            config.update(loss=model.loss_config(), adapter=model.adapter_config(), abstain_bias=model.abstain_bias,
                          temperature=float(model.temperature.detach()), decision=model.decision.to_dict())
        else:
            config.update(loss={"name": model.loss_name}, logit_scale=float(model.logit_scale.detach()))
        config["extra"] = to_jsonable(extra or {})
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        # safetensors writes through a private (0600) temporary file: give its file the mode of the others
        os.chmod(staging / WEIGHTS_NAME, new_file_mode())
        _fsync_tree(staging)
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        # a full disk (safetensors reports it in its own exception type) is the user's to fix: name the target
        if isinstance(error, OSError) or "No space left" in str(error):
            raise OSError(getattr(error, "errno", None) or errno.ENOSPC,
                          f"cannot write the checkpoint {directory}: {error}") from error
        raise
    try:
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{tag}"
            os.rename(directory, old)
            os.rename(staging, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's ``config.json``; clear errors for a missing or damaged folder."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if directory.is_file():
        raise NotADirectoryError(f"checkpoint {directory} is a file; give the checkpoint folder that holds "
                                 f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    if not directory.is_dir():
        leftovers = sorted(directory.parent.glob(f".{directory.name}.old-*")) if directory.parent.is_dir() else []
        hint = f"; an interrupted save left the previous checkpoint at {leftovers[-1]}" if leftovers else ""
        raise FileNotFoundError(f"checkpoint folder {directory} does not exist{hint}")
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: {directory} is not a halo-embed checkpoint")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is damaged (not valid JSON: {error})") from error
    if not isinstance(config, dict) or config.get("format") not in (FORMAT, CONTRASTIVE_FORMAT):
        raise ValueError(f"{config_path} is not a halo-embed checkpoint config (format {config.get('format')!r})"
                         if isinstance(config, dict) else f"{config_path} is not a JSON object")
    for key in ("backbone", "loss"):
        if key not in config:
            raise ValueError(f"{config_path} is damaged: it has no {key!r} entry")
    return config


def load_checkpoint(directory: str | os.PathLike, device: str | torch.device = "cpu") -> HALOCLIP:
    """Rebuild a :class:`HALOCLIP` from a checkpoint folder (no download, no training code).

    Raises:
        FileNotFoundError: the folder, ``config.json`` or ``model.safetensors`` is missing.
        ValueError: a damaged file (named in the message), or a CLIP / SigLIP checkpoint (see :func:`load_model`).
    """
    model = load_model(directory, device)
    if not isinstance(model, HALOCLIP):
        raise ValueError(f"{directory} holds a model trained with {model.loss_name}'s loss, not a HALO checkpoint: "
                         "the scorer needs HALO's temperature and abstain bias (load it with load_model)")
    return model


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu") -> HALOCLIP | ContrastiveCLIP:
    """Rebuild the :class:`HALOCLIP` or :class:`ContrastiveCLIP` of a checkpoint folder.

    Raises:
        FileNotFoundError: the folder, ``config.json`` or ``model.safetensors`` is missing.
        ValueError: a damaged file (named in the message).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model as load_weights

    directory = Path(directory)
    config = read_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing")
    try:
        backbone = rebuild_backbone(config["backbone"], directory)
    except (RuntimeError, TypeError, KeyError, OverflowError, MemoryError, AssertionError) as error:
        # e.g. a negative width or a vocabulary too large to allocate: the config, not halo-embed, is wrong
        raise ValueError(f"{directory / CONFIG_NAME} is damaged: the model it describes cannot be built "
                         f"({type(error).__name__}: {error})") from None
    if config["format"] == CONTRASTIVE_FORMAT:
        loss = config["loss"].get("name") if isinstance(config["loss"], dict) else None
        if loss not in ("clip", "siglip"):
            raise ValueError(f"{directory / CONFIG_NAME} is damaged: unknown loss {loss!r}")
        model = ContrastiveCLIP(backbone, loss)
    else:
        # checkpoints written before the adapter had options used fixed statistics
        adapter = config.get("adapter", {"normalization": "fixed"})
        if not isinstance(adapter, dict):
            raise ValueError(f"{directory / CONFIG_NAME} is damaged: its 'adapter' entry is not an object")
        model = HALOCLIP(backbone, **config["loss"], **adapter)
        decision = config.get("decision")  # absent in checkpoints written before decisions were fitted
        if isinstance(decision, dict) and decision.get("rule") == "fitted":
            try:
                model.fitted_decision = PairDecision.from_dict(decision)
            except (TypeError, ValueError) as error:
                raise ValueError(f"{directory / CONFIG_NAME} is damaged: its decision entry: {error}") from None
    try:
        load_weights(model, str(weights), strict=True, device=str(device))
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ValueError(f"{weights} is damaged or does not match {directory / CONFIG_NAME}: {error}") from error
    # a damaged data region with an intact header loads; its NaN would make every probability NaN
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{weights} is damaged: {name} contains NaN or inf values")
    return model.to(device).eval()
