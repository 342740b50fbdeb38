"""halo-embed: train and evaluate embedding models with the HALO loss.

The core (``HALOLoss``, ``HALOModel``, ``HALOHead`` and :mod:`halo_embed.geometry`)
needs only torch; the CLIP, evaluation and recipe modules import their heavy
dependencies when they are used.
"""

from .inference import ABSTAIN, HALOHead, HALOPrediction
from .losses import HALOLoss
from .classifier import HALOModel

__version__ = "0.1.0"

__all__ = [
    "ABSTAIN",
    "AlignmentScorer",
    "HALOHead",
    "HALOLoss",
    "HALOModel",
    "HALOPrediction",
    "PairedHALOLoss",
    "__version__",
]

_LAZY = {"AlignmentScorer": "halo_embed.clip", "PairedHALOLoss": "halo_embed.losses"}


def __getattr__(name: str):
    # The CLIP side pulls in PIL/torchvision on use only: `import halo_embed` stays light.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'halo_embed' has no attribute {name!r}")
