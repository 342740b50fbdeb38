"""The baselines HALO is compared with: CLIP's and SigLIP's losses, and the optimizer groups every model uses.

:class:`ContrastiveCLIP` reuses open_clip's ``ClipLoss`` / ``SigLipLoss`` (not
rewritten) on L2-normalised features with the backbone's own logit scale (and
bias), with the same ``forward`` as :class:`~halo_embed.clip.HALOCLIP`, so one
training loop drives all three losses.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .._validation import check_choice, check_int

__all__ = ["ContrastiveCLIP", "parameter_groups"]

#: parameter names that get no weight decay besides every parameter with fewer than 2 dimensions: open_clip
#: trainer's rule (open_clip_train/main.py), plus HALO's temperature
NO_DECAY_WORDS = ("bn", "ln", "bias", "logit_scale", "gamma")


class ContrastiveCLIP(nn.Module):
    """CLIP's (``loss="clip"``) or SigLIP's (``"siglip"``) loss over a :class:`~halo_embed.clip.CLIPBackbone`.

    Args:
        backbone: the two towers (their ``model.logit_scale`` is the temperature).
        loss: ``"clip"`` or ``"siglip"``; SigLIP starts from its paper's
            ``t = 10, b = -10`` when the model has no ``logit_bias`` of its own.
        rank, world_size: this process among the data-parallel ones; CLIP's
            loss gathers the features of every process with gradients.

    Raises:
        ValueError: on an unknown ``loss`` or invalid ``rank`` / ``world_size``.
    """

    def __init__(self, backbone, loss: str = "clip", rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        from open_clip.loss import ClipLoss, SigLipLoss

        self.loss_name = check_choice("loss", loss, ("clip", "siglip"))
        world_size = check_int("world_size", world_size, minimum=1)
        rank = check_int("rank", rank, minimum=0)
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
        self.backbone = backbone
        inner = backbone.model
        self.logit_bias = getattr(inner, "logit_bias", None)
        if loss == "siglip":
            self.loss = SigLipLoss(rank=rank, world_size=world_size)
            if self.logit_bias is None:  # SigLIP's initialisation (Zhai et al. 2023): t = 10, b = -10
                self.logit_bias = nn.Parameter(torch.tensor(-10.0))
                with torch.no_grad():
                    inner.logit_scale.fill_(math.log(10.0))
        else:
            self.loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)

    @property
    def logit_scale(self) -> Tensor:
        """The log temperature (``exp`` is the scale applied to cosines, capped at 100)."""
        return self.backbone.model.logit_scale

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep the scale in ``[1, 100]`` after an optimizer step (open_clip_train clamps the parameter to
        ``[0, ln 100]``; a clamp in the forward pass instead would stop the gradient of a pretrained CLIP whose
        scale sits at 100, freezing its temperature)."""
        self.logit_scale.clamp_(0, math.log(100))

    def forward(self, pixel_values: Tensor, tokens: Any, image_ids: Tensor | None = None,
                return_parts: bool = False):
        """The loss of ``B`` pairs (``image_ids`` is accepted for HALOCLIP's signature and unused)."""
        images = nn.functional.normalize(self.backbone.encode_image(pixel_values).float(), dim=-1)
        texts = nn.functional.normalize(self.backbone.encode_text(tokens).float(), dim=-1)
        scale = self.logit_scale.float().exp()  # bounded by clamp_logit_scale after each step, as open_clip does
        if self.loss_name == "siglip":
            loss = self.loss(images, texts, scale, self.logit_bias)
        else:
            loss = self.loss(images, texts, scale)
        if return_parts:
            return loss, {"logit_scale": scale.detach().reshape(())}
        return loss


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: ``weight_decay`` on every parameter with 2 or more dimensions, none on the others (gains,
    biases, norms, the class embedding) nor on names with ``bn``, ``ln``, ``bias``, ``logit_scale`` (open_clip
    trainer's rule) or ``gamma`` (HALO's temperature). Frozen parameters are left out."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or any(word in name for word in NO_DECAY_WORDS):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
