#!/usr/bin/env bash
# The wheels the lent GPU machine lacks, for its Python 3.12, into .whl/ (git-ignored); run here, where the
# package index is reachable. That machine cannot reach any index; its image already has torch, torchvision,
# transformers, accelerate, safetensors, timm, scikit-learn, matplotlib, tensorboard, tqdm and pytest
# (/work/.library/device/KINDS.md). `make device-check WHEELS=.whl` installs these next to them.
#
# FAISS there is faiss-cpu: the faiss-gpu wheel (135 MB) and the CUDA 12 libraries it needs do not fit in
# what a device call carries (64 MiB), so the GPU-FAISS test skips on that machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
version() { "$python" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
packages=("open-clip-torch==$(version open-clip-torch)" ftfy wcwidth "faiss-cpu==1.15.1" datasets dill multiprocess)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "${packages[@]}"
du -sh .whl
