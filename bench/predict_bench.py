"""``stream-pml predict`` throughput on CPU (images/s, decode + preprocess + model).

    python -m bench.predict_bench --checkpoint runs/demo [--images DIR]

Default images: the 32 real coco128 train2017 JPEGs in tests/data (BENCHMARKS.md used all 128), resized to the
model's input size by the same code as ``predict``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from stream_pml import inference

COCO = Path(__file__).resolve().parents[1] / "tests" / "data" / "coco128" / "images" / "train2017"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--images", type=Path, default=COCO)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    lm = inference.load_model(args.checkpoint)
    paths = inference._image_files([], args.images)
    rates = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        n = sum(1 for r in inference.predict_files(lm, paths, args.batch_size) if "error" not in r)
        rates.append(n / (time.perf_counter() - t0))
    print(f"predict: {lm.arch} at {lm.image_size}px, {len(paths)} images from {args.images}, "
          f"{torch.get_num_threads()} threads: median {statistics.median(rates):.0f} images/s "
          f"(runs: {', '.join(f'{r:.0f}' for r in rates)})")


if __name__ == "__main__":
    main()
