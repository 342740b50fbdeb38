# Sourced by the shell experiments (from the repository root). Sets SHARED (the dataset copies: $SHARED,
# $HALO_EMBED_DATA or ../shared/datasets), RUNS (where results go; default runs), PYTHON and HALO_EMBED (the
# project's interpreter and command) and, with SMOKE=1, points SHARED at a generated miniature of the datasets
# and sets SMOKE_OPTIONS, the recipe options that make every run take seconds (the numbers then mean nothing;
# this is what the test suite runs).
RUNS=${RUNS:-runs}
PYTHON=${PYTHON:-.venv/bin/python}
HALO_EMBED=${HALO_EMBED:-.venv/bin/halo-embed}
SHARED=${SHARED:-${HALO_EMBED_DATA:-../shared/datasets}}
SMOKE_OPTIONS=()          # the CIFAR recipe's
FINETUNE_SMOKE_OPTIONS=() # the fine-tuning recipe's
if [ -n "${SMOKE:-}" ]; then
  SHARED=$("$PYTHON" experiments/_shared.py fake "$RUNS/smoke-data")
  read -ra SMOKE_OPTIONS <<< "$("$PYTHON" experiments/_shared.py cifar-smoke-options)"
  read -ra FINETUNE_SMOKE_OPTIONS <<< "$("$PYTHON" experiments/_shared.py finetune-smoke-options)"
fi
if [ ! -d "$SHARED" ]; then
  echo "SHARED=$SHARED: no such folder (a copy laid out like ../shared/datasets)" >&2
  exit 2
fi
