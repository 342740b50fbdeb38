#!/usr/bin/env bash
# halo vs clip on the built-in shapes data, default settings (2 CPU cores: about 20 minutes for both).
# RUNS, SMOKE=1: see experiments/_common.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/_common.sh
set -x
"$HALO_EMBED" finetune --loss halo clip --name shapes --output "$RUNS" "$@" "${FINETUNE_SMOKE_OPTIONS[@]}"
