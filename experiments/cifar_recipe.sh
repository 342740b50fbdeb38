#!/usr/bin/env bash
# The CIFAR reference recipe (ResNet-18, HALO vs cross-entropy) on the CIFAR-10 copy in ../shared/datasets:
# ID = CIFAR-10 test, near-OOD = the partial CIFAR-100, far-OOD = the partial SVHN and MNIST test.
# SCALE=small: the `small` preset (width 16, 10k training images, 4 epochs; ~5 min on 2 CPU cores)
# SCALE=medium: the same network on 20k training images for 8 epochs (~17 min on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared/datasets}
DATA=${DATA:-runs/data/cifar10}
SCALE=${SCALE:-small}
if [ ! -d "$DATA/train" ]; then mkdir -p "$DATA" && tar -xzf "$SHARED/cifar10-jpg.tar.gz" -C "$DATA"; fi
case "$SCALE" in
  small) extra=() ;;
  medium) extra=(--train-limit 20000 --epochs 8) ;;
  *) echo "SCALE must be small or medium, got $SCALE" >&2; exit 2 ;;
esac
set -x
.venv/bin/halo-embed cifar compare --preset small "${extra[@]}" --data-dir "$DATA" \
  --near-ood "$SHARED/cifar100-partial.npz" --far-ood "$SHARED/svhn-partial.npz" "$SHARED/mnist-test" \
  --name "cifar-$SCALE" "$@"
