#!/usr/bin/env bash
# halo vs clip on CIFAR-10 with class-name captions ("a photo of a dog."), same init/data/steps/seed.
# OOD images for the rejection report: the partial CIFAR-100 and SVHN copies.
# SHARED, RUNS, SMOKE=1: see experiments/_common.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/_common.sh
DATA=${DATA:-$RUNS/data/cifar10}
if [ -n "${SMOKE:-}" ]; then DATA=$RUNS/smoke-data/cifar10; fi
if [ ! -d "$DATA/train" ]; then mkdir -p "$DATA" && tar -xzf "$SHARED/cifar10-jpg.tar.gz" -C "$DATA"; fi
set -x
"$HALO_EMBED" finetune --loss halo clip --train-data "$DATA/train" --val-data "$DATA/test" \
  --dataset-type imagefolder --caption-template "a photo of a {}." \
  --ood-data "$SHARED/cifar100-partial.npz" "$SHARED/svhn-partial.npz" \
  --max-steps 400 --batch-size 64 --name cifar10-captions --output "$RUNS" "$@" "${FINETUNE_SMOKE_OPTIONS[@]}"
