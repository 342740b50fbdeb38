#!/usr/bin/env bash
# halo vs clip on CIFAR-10 with class-name captions ("a photo of a dog."), same init/data/steps/seed.
# OOD images for the rejection report: the partial CIFAR-100 and SVHN copies.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared/datasets}
DATA=${DATA:-runs/data/cifar10}
if [ ! -d "$DATA/train" ]; then mkdir -p "$DATA" && tar -xzf "$SHARED/cifar10-jpg.tar.gz" -C "$DATA"; fi
set -x
.venv/bin/halo-embed finetune --loss halo clip --train-data "$DATA/train" --val-data "$DATA/test" \
  --dataset-type imagefolder --caption-template "a photo of a {}." \
  --ood-data "$SHARED/cifar100-partial.npz" "$SHARED/svhn-partial.npz" \
  --max-steps 400 --batch-size 64 --name cifar10-captions --output runs "$@"
