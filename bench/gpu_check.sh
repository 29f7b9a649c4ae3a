#!/usr/bin/env bash
# GPU checks, prepared for the device tool (one H100/H200, ~6 minutes of a 15-minute budget).
# Run from the repository root with the sample data copied into ./shared_data (the device
# tool carries only the repository): cp -r ../shared/data shared_data  (git-ignored).
# 1. `pytest -m gpu`: an NCCL-only process group, DALI mixed decode, bf16, channels_last,
#    a kill mid-epoch and a resume that must end bitwise equal (train.deterministic).
# 2. bench.gpu_check prints one JSON object with resnet50_448_bf16_images_per_s (target
#    >= 1,000 on an H100), dali_mixed_decode_resize_images_per_s, trainer_images_per_s and
#    trainer_data_wait_share (target < 5%), and the pml loss times.
# Any failure ends the script with a non-zero status: nothing here passes by accident.
set -euo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp}"
python3 -m pip install -q --no-deps -e . >/dev/null
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log"
python3 -m bench.gpu_check 2>&1 | tee "$out/gpu_check.log"
