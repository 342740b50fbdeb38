"""The fine-tuning recipe's model: the backbone built as its library's users build it, locked as asked,
wrapped in HALO's or the baseline's loss, its optimizer groups and its feature cache."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .finetune_config import FinetuneConfig

__all__ = ["apply_locks", "attach_feature_cache", "build_model", "initial_temperature", "optimizer_groups"]


def build_model(config: FinetuneConfig, rank: int = 0, world_size: int = 1):
    """The backbone as its library's users build it, wrapped in HALO's or the baseline's loss."""
    from ..clip import HALOCLIP, ContrastiveCLIP, load_backbone

    torch.manual_seed(config.seed)  # same initial weights for every loss of a comparison
    backbone = load_backbone(config.family, config.model, config.pretrained, precision=config.precision,
                             pretrained_image=config.pretrained_image, **config.preprocess_overrides())
    apply_locks(backbone, config)
    if config.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    if config.loss == "halo":
        return HALOCLIP(
            backbone, num_candidates=config.batch_size * world_size, symmetric=config.symmetric,
            distill=config.distill, label_smoothing=config.label_smoothing,
            rejection_weight=config.rejection_weight, norm_weight=config.norm_weight,
            normalization=config.adapter_normalization(), momentum=config.normalization_momentum,
            init_gamma=initial_temperature(backbone, config),
        )
    model = ContrastiveCLIP(backbone, config.loss, rank, world_size)
    if config.logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(config.logit_scale))
        model.logit_scale.requires_grad_(False)
    return model


def initial_temperature(backbone, config: FinetuneConfig) -> float | None:
    """HALO's starting temperature from ``--init-temperature`` (``None``: HALO's reference start)."""
    choice = config.init_temperature
    scale = getattr(backbone.model, "logit_scale", None)
    if choice == "auto":
        choice = "model" if config.adapter_normalization() == "sphere" and isinstance(scale, torch.Tensor) \
            else "reference"
    if choice == "reference":
        return None
    if choice == "model":
        if not isinstance(scale, torch.Tensor):
            raise ValueError("--init-temperature model: this model has no CLIP logit scale")
        # 2 g = CLIP's scale: on the sphere g (2 cos - 1) differs from scale * cos by a constant per row
        return 0.5 * math.exp(float(scale.detach().float().reshape(-1)[0]))
    return float(choice)


def optimizer_groups(model, config: FinetuneConfig) -> list[dict[str, Any]]:
    """AdamW groups (:func:`~halo_embed.clip.parameter_groups`); HALO's temperature in a group of its own at
    ``--temperature-lr`` (default ``--lr`` x the starting temperature: ``gamma`` is the temperature itself
    above 20, so this moves it by about ``--lr`` of its value per step, as AdamW moves CLIP's log scale)."""
    from ..clip import HALOCLIP, parameter_groups

    groups = parameter_groups(model, config.wd)
    if not isinstance(model, HALOCLIP) or not model.loss.gamma.requires_grad:
        return groups
    gamma = model.loss.gamma
    for group in groups:
        group["params"] = [p for p in group["params"] if p is not gamma]
    lr = config.temperature_lr if config.temperature_lr is not None else config.lr * float(model.temperature.detach())
    return [*groups, {"params": [gamma], "weight_decay": 0.0, "lr": lr}]


def apply_locks(backbone, config: FinetuneConfig) -> None:
    """``--lock-image`` / ``--lock-text`` on a backbone (the training one, or one rebuilt for evaluation)."""
    if config.lock_image:
        backbone.lock_image(config.lock_image_unlocked_groups, config.lock_image_freeze_bn_stats)
    if config.lock_text:
        backbone.lock_text(config.lock_text_unlocked_layers, config.lock_text_freeze_layer_norm)


def attach_feature_cache(model, config: FinetuneConfig, training: bool) -> None:
    """Serve the locked towers of ``model`` from the run's feature cache (``--feature-cache``); in training,
    the image tower only when its inputs are deterministic (``--train-augment none``)."""
    from ..clip.feature_cache import FeatureCache

    directory = config.feature_cache_dir()
    backbone = model.backbone
    if directory is None:
        backbone.attach_feature_cache(None)
        return
    towers = ["text"] if training and config.train_augment != "none" else ["image", "text"]
    if directory not in _FEATURE_CACHES:  # one per folder and process: the WiSE-FT models share it
        _FEATURE_CACHES[directory] = FeatureCache(directory)
    backbone.attach_feature_cache(_FEATURE_CACHES[directory], towers)


_FEATURE_CACHES: dict[Path, Any] = {}
