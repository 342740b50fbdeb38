"""Image-text HALO: CLIP backbones (open_clip, transformers), the feature adapter, HALOCLIP,
prototype (zero-shot) classification, checkpoints, the alignment scorer, and the contrastive baselines.

open_clip / transformers are imported when a backbone is built.
"""

from .adapter import FeatureAdapter
from .backbones import CLIPBackbone, HFCLIPBackbone, OpenCLIPBackbone, load_backbone, rebuild_backbone
from .checkpoint import load_checkpoint, load_model, save_checkpoint
from .contrastive import ContrastiveCLIP, parameter_groups
from .interpolation import interpolate_weights
from .model import HALOCLIP
from .prototype import DEFAULT_TEMPLATES, PrototypeClassifier
from .scorer import AlignmentScorer, PairScores, Ranking

__all__ = [
    "AlignmentScorer",
    "CLIPBackbone",
    "ContrastiveCLIP",
    "DEFAULT_TEMPLATES",
    "FeatureAdapter",
    "HALOCLIP",
    "HFCLIPBackbone",
    "OpenCLIPBackbone",
    "PairScores",
    "PrototypeClassifier",
    "Ranking",
    "interpolate_weights",
    "load_backbone",
    "load_checkpoint",
    "load_model",
    "parameter_groups",
    "rebuild_backbone",
    "save_checkpoint",
]
