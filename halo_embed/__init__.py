"""halo-embed: train and evaluate embedding models with the HALO loss.

The core (``HALOLoss``, ``HALOModel``, ``HALOHead`` and :mod:`halo_embed.geometry`)
needs only torch; the CLIP, evaluation and recipe modules import their heavy
dependencies when they are used.
"""

from .inference import ABSTAIN, HALOHead, HALOPrediction
from .losses import HALOLoss
from .models import HALOModel

__version__ = "0.1.0"

__all__ = ["ABSTAIN", "HALOHead", "HALOLoss", "HALOModel", "HALOPrediction", "__version__"]
