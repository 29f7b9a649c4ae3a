#!/usr/bin/env bash
# GPU checks, prepared for the device tool (one H100/H200, ~6 minutes of a 15-minute budget).
# Run from the repository root. The device machine reaches no network and its image lacks
# some of our packages (zarr, numcodecs, omegaconf, webdataset, simplejpeg; and DALI, whose
# 199 MB wheel is too large to carry there: the DALI checks then skip, named). Prepare here:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d wheelhouse zarr numcodecs omegaconf webdataset simplejpeg   # (git-ignored)
# and carry wheelhouse/ (the sample images come with the repository, tests/data/coco128).
# 1. `pytest -m gpu`: an NCCL-only process group, DALI mixed decode, bf16, channels_last,
#    a kill mid-epoch and a resume that must end bitwise equal (train.deterministic).
# 2. bench.gpu_check prints one JSON object with resnet50_448_bf16_images_per_s (target
#    >= 1,000 on an H100), dali_mixed_decode_resize_images_per_s, trainer_images_per_s and
#    trainer_data_wait_share (target < 5%), and the pml loss times.
# Any failure ends the script with a non-zero status: nothing here passes by accident.
set -euo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # no install: no build step, no network
out="${OUT:-/tmp}"
if [ -d wheelhouse ]; then
    python3 -m pip install -q --no-index --find-links wheelhouse zarr numcodecs omegaconf webdataset simplejpeg
fi
python3 - <<'PY'
import importlib, sys
missing = [m for m in ("torch", "torchvision", "zarr", "numcodecs", "omegaconf", "webdataset", "simplejpeg", "tqdm")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing packages {missing}: carry them as wheels (see the top of bench/gpu_check.sh)")
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible")
print("dali:", "installed" if importlib.util.find_spec("nvidia.dali") else "not installed (DALI checks skip)")
PY
python3 -m pytest -q -m gpu -rs -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log"
python3 -m bench.gpu_check 2>&1 | tee "$out/gpu_check.log"
