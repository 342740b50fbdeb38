#!/usr/bin/env bash
# The paired geometry during training: HALO with the feature adapter's statistics fixed at the start
# (the default), with running statistics (--normalization running), and running statistics plus the
# absent-positive and norm terms, against CLIP's loss; same init, data, steps and seed for all.
# Then where each HALO run put images and captions (experiments/pair_diagnostics.py).
#   SET=cifar10 experiments/pair_normalization.sh    # CIFAR-10 class captions, ~5 minutes per run on 2 CPU cores
#   SET=flickr experiments/pair_normalization.sh     # Flickr8k-1000 with MiniLM, ~8 minutes per run
# RUNS, SMOKE=1: see experiments/_common.sh (passed on to the two scripts it runs).
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/_common.sh
SET=${SET:-cifar10}
case "$SET" in
  cifar10) run=(experiments/cifar10_captions.sh); base=cifar10-captions-norm ;;
  flickr) run=(experiments/flickr_minilm.sh --epochs 3); base=flickr-minilm-norm ;;
  *) echo "SET must be cifar10 or flickr, got $SET" >&2; exit 2 ;;
esac
set -x
"${run[@]}" --name "$base" --no-progress "$@"       # halo (fixed statistics) and clip, in runs/$base/{halo,clip}
"${run[@]}" --loss halo --normalization running --name "$base-running" --no-progress "$@"
"${run[@]}" --loss halo --normalization running --rejection-weight 1 --norm-weight 1 \
  --name "$base-running-terms" --no-progress "$@"
"$PYTHON" experiments/pair_diagnostics.py "$RUNS/$base/halo" "$RUNS/$base-running" "$RUNS/$base-running-terms"
