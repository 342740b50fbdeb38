#!/usr/bin/env bash
# The CIFAR reference recipe (ResNet-18, HALO vs cross-entropy) on the CIFAR-10 copy in ../shared/datasets:
# ID = CIFAR-10 test, near-OOD = the partial CIFAR-100, far-OOD = the partial SVHN and MNIST test.
# SCALE=small: the `small` preset (width 16, 10k training images, 4 epochs; ~1.5 min per run on 2 CPU cores)
# SCALE=medium: the `medium` preset (the same network on 20k training images for 8 epochs; ~5.5 min per run)
# SCALE=large: the `large` preset (all 50k training images for 6 epochs; ~10 min per run)
# SEEDS=3: that many seeds per loss, reported as mean ± std (default 3). Extra arguments go to the recipe,
# e.g. `--init-gamma reference --name cifar-medium-reference`; an interrupted run continues with `--resume latest`.
# SHARED, RUNS, SMOKE=1: see experiments/_common.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/_common.sh
DATA=${DATA:-$RUNS/data/cifar10}
SCALE=${SCALE:-small}
SEEDS=${SEEDS:-3}
if [ -n "${SMOKE:-}" ]; then DATA=$RUNS/smoke-data/cifar10; SEEDS=2; fi
if [ ! -d "$DATA/train" ]; then mkdir -p "$DATA" && tar -xzf "$SHARED/cifar10-jpg.tar.gz" -C "$DATA"; fi
case "$SCALE" in
  small|medium|large) ;;
  *) echo "SCALE must be small, medium or large, got $SCALE" >&2; exit 2 ;;
esac
set -x
"$HALO_EMBED" cifar compare --preset "$SCALE" --seeds "$SEEDS" --data-dir "$DATA" \
  --near-ood "$SHARED/cifar100-partial.npz" --far-ood "$SHARED/svhn-partial.npz" "$SHARED/mnist-test" \
  --name "cifar-$SCALE" --output "$RUNS" "$@" "${SMOKE_OPTIONS[@]}"
