#!/usr/bin/env bash
# GPU checks, prepared for the device tool (one H100/H200, ~5 minutes of an 8-minute budget).
# Run from the repository root with the sample data copied into ./shared_data (the device
# tool carries only the repository): cp -r ../shared/data shared_data  (git-ignored).
# Expected output: one JSON object with resnet50_448_bf16_images_per_s (target >= 1,000 on
# an H100), dali_mixed_decode_resize_images_per_s, trainer_images_per_s and
# trainer_data_wait_share (target < 5%), and the pml loss times.
set -euo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps -e . >/dev/null 2>&1 || true
python3 -m bench.gpu_check 2>&1 | tee "${OUT:-/tmp}/gpu_check.log"
