#!/usr/bin/env bash
# halo vs clip on the built-in shapes data, default settings (CPU: about 17 minutes for both).
set -euo pipefail
cd "$(dirname "$0")/.."
set -x
.venv/bin/halo-embed finetune --loss halo clip --name shapes --output runs "$@"
