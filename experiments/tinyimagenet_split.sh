#!/usr/bin/env bash
# A second labelled set for the CIFAR recipe: Tiny-ImageNet-200 at 32x32 (../shared/datasets) split into
# 100 known classes (450 training + 50 test images each) and 100 held-out classes (10 images each, near-OOD).
# Writes symlink folders runs/data/tinyimagenet100/{train,test}/<wnid>/ and runs/data/tinyimagenet100/heldout/,
# then runs the recipe on them (`--dataset imagefolder`, D = K = 100; `compare`, or ACTION=train for one loss)
# with the arguments given, e.g.
#   experiments/tinyimagenet_split.sh --preset medium --seeds 3
#   ACTION=train experiments/tinyimagenet_split.sh --preset medium --seeds 3 --loss halo --init-gamma reference \
#     --name tinyimagenet100-reference
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared/datasets}
RAW=runs/data/tinyimagenet32
OUT=runs/data/tinyimagenet100
if [ ! -d "$RAW/train" ]; then mkdir -p runs/data && tar -xzf "$SHARED/tinyimagenet32-train.tar.gz" -C runs/data; fi
if [ ! -d "$OUT/heldout" ]; then
  .venv/bin/python - "$RAW" "$OUT" <<'PY'
import os, random, sys
from pathlib import Path
raw, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
wnids = sorted(p.name for p in (raw / "train").iterdir() if p.is_dir())
random.Random(0).shuffle(wnids)          # a fixed, documented choice of known and held-out classes
known, held_out = wnids[:100], wnids[100:200]
for wnid in known:
    files = sorted((raw / "train" / wnid).iterdir())
    for split, chosen in (("train", files[:450]), ("test", files[450:500])):
        (out / split / wnid).mkdir(parents=True, exist_ok=True)
        for f in chosen:
            os.symlink(f, out / split / wnid / f.name)
(out / "heldout").mkdir(parents=True, exist_ok=True)
for wnid in held_out:
    for f in sorted((raw / "train" / wnid).iterdir())[:10]:
        os.symlink(f, out / "heldout" / f.name)
print(f"{out}: 100 known classes (450 train / 50 test each), 100 held-out classes x 10 images")
PY
fi
set -x
.venv/bin/halo-embed cifar "${ACTION:-compare}" --dataset imagefolder --data-dir "$OUT" --near-ood "$OUT/heldout" \
  --far-ood "$SHARED/svhn-partial.npz" "$SHARED/mnist-test" --name tinyimagenet100 "$@"
