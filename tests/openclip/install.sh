#!/usr/bin/env bash
# OpenCLIP's trainer for tests/test_training_clients.py, into .venv/openclip (on the PYTHONPATH of
# its subprocess only, never of capfilt's own process). Its own pins: webdataset 0.2.86, as its
# `training` extra requires (later webdataset ends each shard with a marker its reader fails on,
# open_clip issue 935), and the torchvision that matches torch 2.13 (a CUDA build: see
# tests/openclip/sitecustomize.py). The rest (torch, numpy, pillow, huggingface-hub, safetensors,
# tqdm, pandas, fsspec, braceexpand) comes from capfilt's environment.
set -euo pipefail
cd "$(dirname "$0")/../.."
target=.venv/openclip
rm -rf "$target"
pip install -q --no-deps --target "$target" \
    open_clip_torch==3.3.0 torchvision==0.28.0 "timm>=1.0.17" webdataset==0.2.86 ftfy wcwidth regex
