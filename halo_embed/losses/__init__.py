"""Losses. ``halo_embed.losses`` needs only torch."""

from .halo import REDUCTIONS, HALOLoss

__all__ = ["HALOLoss", "REDUCTIONS"]
