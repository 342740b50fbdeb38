#!/usr/bin/env bash
# A second labelled set for the CIFAR recipe: Tiny-ImageNet-200 at 32x32 (../shared/datasets) split into
# 100 known classes (450 training + 50 test images each) and 100 held-out classes (10 images each, near-OOD).
# Writes symlink folders $RUNS/data/tinyimagenet100/{train,test}/<wnid>/ and $RUNS/data/tinyimagenet100/heldout/,
# then runs the recipe on them (`--dataset imagefolder`, D = K = 100; `compare`, or ACTION=train for one loss)
# with the arguments given, e.g.
#   experiments/tinyimagenet_split.sh --preset medium --seeds 3
#   ACTION=train experiments/tinyimagenet_split.sh --preset medium --seeds 3 --loss halo --init-gamma reference \
#     --name tinyimagenet100-reference
# SHARED, RUNS, SMOKE=1: see experiments/_common.sh (the miniature has 16 classes: 8 known, 8 held out).
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/_common.sh
RAW=$RUNS/data/tinyimagenet32
OUT=$RUNS/data/tinyimagenet100
SPLIT="100 450 50 10"                 # known classes, training and test images per class, held-out images per class
if [ -n "${SMOKE:-}" ]; then RAW=$RUNS/smoke-data/tinyimagenet32; OUT=$RUNS/smoke-data/tinyimagenet-split; SPLIT="8 8 4 4"; fi
if [ ! -d "$RAW/train" ]; then mkdir -p "$(dirname "$RAW")" && tar -xzf "$SHARED/tinyimagenet32-train.tar.gz" -C "$(dirname "$RAW")"; fi
if [ ! -d "$OUT/heldout" ]; then
  "$PYTHON" - "$RAW" "$OUT" $SPLIT <<'PY'
import os, random, sys
from pathlib import Path
raw, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
known_count, train_per, test_per, held_per = map(int, sys.argv[3:7])
wnids = sorted(p.name for p in (raw / "train").iterdir() if p.is_dir())
random.Random(0).shuffle(wnids)          # a fixed, documented choice of known and held-out classes
known, held_out = wnids[:known_count], wnids[known_count:2 * known_count]
for wnid in known:
    files = sorted((raw / "train" / wnid).iterdir())
    for split, chosen in (("train", files[:train_per]), ("test", files[train_per:train_per + test_per])):
        (out / split / wnid).mkdir(parents=True, exist_ok=True)
        for f in chosen:
            os.symlink(f, out / split / wnid / f.name)
(out / "heldout").mkdir(parents=True, exist_ok=True)
for wnid in held_out:
    for f in sorted((raw / "train" / wnid).iterdir())[:held_per]:
        os.symlink(f, out / "heldout" / f.name)
print(f"{out}: {len(known)} known classes ({train_per} train / {test_per} test each), "
      f"{len(held_out)} held-out classes x {held_per} images")
PY
fi
set -x
"$HALO_EMBED" cifar "${ACTION:-compare}" --dataset imagefolder --data-dir "$OUT" --near-ood "$OUT/heldout" \
  --far-ood "$SHARED/svhn-partial.npz" "$SHARED/mnist-test" --name tinyimagenet100 --output "$RUNS" "$@" \
  "${SMOKE_OPTIONS[@]}"
