"""Losses. ``halo_embed.losses`` needs only torch."""

from .halo import REDUCTIONS, HALOLoss
from .paired import PairedHALOLoss

__all__ = ["HALOLoss", "PairedHALOLoss", "REDUCTIONS"]
