"""How much of CIFAR-10 the origin sink takes at initialisation in the CIFAR recipe's HALO model.

Builds the recipe's ResNet-18 (width 16, as in the `small`/`medium` runs) with HALOModel + HALOLoss from
the recipe's own `build`, and reports the embeddings' mean square, the mean p(abstain) and the share of
images that abstain, on every 200th training image of the extracted CIFAR-10 copy.

Usage: .venv/bin/python experiments/cifar_init_sink.py [runs/data/cifar10]   (extracted by cifar_recipe.sh)
"""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from halo_embed.inference import HALOHead
from halo_embed.recipes.cifar import CIFAR_MEAN, CIFAR_STD, CifarConfig, build

root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/data/cifar10")
files = sorted(root.glob("train/*/*"))[::200]
if not files:
    sys.exit(f"no images under {root}/train: run experiments/cifar_recipe.sh first (it extracts the copy)")
config = CifarConfig(loss="halo", width=16)
model, criterion = build(config, 10)
images = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255 for f in files])
x = (torch.from_numpy(images).permute(0, 3, 1, 2) - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) \
    / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
model.train()  # batch statistics, as in the first training steps
with torch.no_grad():
    embeddings, _ = model(x)
    out = HALOHead.from_trained(model, criterion)(embeddings)
print(f"{len(files)} images: embedding mean square {embeddings.pow(2).mean():.3f}, "
      f"mean p(abstain) {out.probs[:, -1].mean():.3f}, abstained {100 * out.abstained.float().mean():.1f}%")
