#!/usr/bin/env bash
# halo vs clip on the built-in shapes data, default settings (2 CPU cores: about 20 minutes for both).
set -euo pipefail
cd "$(dirname "$0")/.."
set -x
.venv/bin/halo-embed finetune --loss halo clip --name shapes --output runs "$@"
