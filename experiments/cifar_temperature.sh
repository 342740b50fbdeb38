#!/usr/bin/env bash
# Issue 28, item 4: what HALO's learnt temperature does with the low start (2), and whether a larger rate for it
# (--temperature-lr 10) or a rate that does not decay (--temperature-schedule constant) changes accuracy, ECE,
# the uncalibrated sink (does it ever win with the loss's constant bias?) or the calibrated decision.
# CIFAR-10 `small` preset (width 16, 10k training images, 4 epochs; ~1.5 min per run on 2 CPU cores), 3 seeds;
# the baseline pair (CCE and HALO with the defaults) comes from `compare`, the variants train HALO only.
# Each run's log.jsonl holds the temperature per epoch; each report.md the decision table.
# SHARED, RUNS, SMOKE=1: see experiments/_common.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/_common.sh
DATA=${DATA:-$RUNS/data/cifar10}
SEEDS=${SEEDS:-3}
if [ -n "${SMOKE:-}" ]; then DATA=$RUNS/smoke-data/cifar10; SEEDS=1; fi
if [ ! -d "$DATA/train" ]; then mkdir -p "$DATA" && tar -xzf "$SHARED/cifar10-jpg.tar.gz" -C "$DATA"; fi
common=(--preset small --seeds "$SEEDS" --data-dir "$DATA" --near-ood "$SHARED/cifar100-partial.npz"
        --far-ood "$SHARED/svhn-partial.npz" "$SHARED/mnist-test" --no-progress --output "$RUNS" "$@"
        "${SMOKE_OPTIONS[@]}")
set -x
"$HALO_EMBED" cifar compare "${common[@]}" --name cifar-small-decision
"$HALO_EMBED" cifar --loss halo "${common[@]}" --name cifar-small-tlr10 --temperature-lr 10
"$HALO_EMBED" cifar --loss halo "${common[@]}" --name cifar-small-tconst --temperature-schedule constant
"$HALO_EMBED" cifar --loss halo "${common[@]}" --name cifar-small-tlr10-const --temperature-lr 10 \
  --temperature-schedule constant
