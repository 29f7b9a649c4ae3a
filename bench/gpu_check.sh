#!/usr/bin/env bash
# The GPU check: one command on a machine with an NVIDIA GPU, at most 8 minutes, no network.
#
#   bash bench/gpu_check.sh                 # on the GPU machine, from the repository root
#   bash bench/gpu_check.sh --dry-run       # here, on CPU: the same plumbing, tiny sizes
#   bash bench/gpu_check.sh --fetch-wheels  # here, with a package registry: fills wheelhouse/
#
# The GPU machine we check on (Python 3.12, torch 2.11, torchvision 0.26, timm) lacks zarr,
# numcodecs, webdataset, simplejpeg and omegaconf and reaches no network: the pinned wheels
# of bench/gpu_wheels.txt go with the repository in wheelhouse/ (about 10 MB, git-ignored;
# carry it). DALI (199 MB) cannot go, so there the loader is `data.backend=device` (nvJPEG
# through torchvision), the path a GPU without a matching DALI takes anyway.
#
# Steps, each with its own time bound: install the wheels, `pytest -m gpu` (NCCL group,
# GPU decode, kill + bitwise resume under train.deterministic, pml loss GPU = CPU), then
# `python -m bench.gpu_check`, which measures and prints ONE JSON object (its schema is
# bench/gpu_check.py's SCHEMA). The script always ends with that JSON, failures included
# (as {"failed": ...} entries); its exit status is non-zero if any step failed.
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # no install: no build step, no network
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
mode="gpu"
case "${1:-}" in
    --dry-run) mode="dry" ;;
    --fetch-wheels)
        exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
            -d wheelhouse -r bench/gpu_wheels.txt ;;
    "") ;;
    *) echo "gpu_check: unknown argument $1 (--dry-run, --fetch-wheels or nothing)" >&2; exit 2 ;;
esac
[ -f bench/gpu_wheels.txt ] && [ -f tests/test_gpu.py ] && [ -d tests/data/coco128 ] \
    || { echo "gpu_check: run from the repository root (bench/, tests/data/ missing)" >&2; exit 2; }
status=0
steps="{}"
step() {  # step NAME SECONDS CMD...: run with a time bound, record {"rc", "seconds"}
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    [ $rc -eq 0 ] || status=1
    steps=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d[sys.argv[2]]={"rc":int(sys.argv[3]),"seconds":int(sys.argv[4]),"log":sys.argv[5]}; print(json.dumps(d))' \
            "$steps" "$name" "$rc" "$((SECONDS - t0))" "$out/$name.log")
    tail -n 3 "$out/$name.log" >&2
}
if [ "$mode" = gpu ]; then
    if [ -d wheelhouse ]; then
        step install 120 python3 -m pip install -q --no-index --no-deps --find-links wheelhouse -r bench/gpu_wheels.txt
    fi
    step pytest_gpu 240 python3 -m pytest -q -m gpu -rs -p no:cacheprovider tests/test_gpu.py
    step measure 300 python3 -m bench.gpu_check --json "$out/report.json"
else
    # The wheel list must name every wheel of wheelhouse/ when there is one, and parse.
    step wheel_list 30 python3 -m bench.gpu_check --check-wheels bench/gpu_wheels.txt --wheelhouse wheelhouse
    step pytest_gpu_collect 120 python3 -m pytest -q --collect-only -m gpu -p no:cacheprovider tests/test_gpu.py
    step measure 300 python3 -m bench.gpu_check --dry-run --json "$out/report.json"
fi
# The JSON, always: the measurement's own, or what is known when it did not finish.
python3 - "$out/report.json" "$steps" "$status" <<'PY'
import json, sys
path, steps, status = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
try:
    report = json.load(open(path))
except (OSError, ValueError) as exc:
    report = {"failed": {"measure": f"no report: {exc}"}}
report["steps"] = steps
report["ok"] = status == 0 and not report.get("failed")
print(json.dumps(report, indent=1, sort_keys=True))
PY
[ $status -eq 0 ] || exit 1
python3 -c 'import json,sys; sys.exit(0 if not json.load(open(sys.argv[1])).get("failed") else 1)' "$out/report.json"
