"""Shard build throughput on real COCO images, with and without re-encoding.

    python -m bench.build_bench [--copies 4] [--workers 1 2]

Builds ``--copies`` x the coco128 train JPEGs (``--images``; real 640x480-class photos) from a list
file, timing the whole ``shard-tools build`` (check pass + write pass), and projects the
5.6M-image Open Images build on 32 cores from the measured per-worker rate.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from shard_tools.cli import main as shard_main

# The repository's 32 sample JPEGs; BENCHMARKS.md used the full coco128 train half (--images).
IMAGES = Path(__file__).resolve().parents[1] / "tests" / "data" / "coco128" / "images" / "train2017"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--images", type=Path, default=IMAGES, help="a folder of JPEGs")
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = tmp / "images"
        images.mkdir()
        lines = ["path,labels"]
        for k in range(args.copies):
            for p in sorted(args.images.glob("*.jpg")):
                name = f"{k}_{p.name}"
                shutil.copy(p, images / name)
                lines.append(f"{name},x")
        (tmp / "list.csv").write_text("\n".join(lines) + "\n")
        n = len(lines) - 1
        for reencode in (False, True):
            for workers in args.workers:
                out = tmp / f"out_{reencode}_{workers}"
                extra = ["--max-side", "512", "--quality", "90"] if reencode else []
                t0 = time.perf_counter()
                rc = shard_main(["build", "csv", "--list", str(tmp / "list.csv"), "--images", str(images),
                                 "--out", str(out), "--shard-size", "256", "--workers", str(workers), *extra])
                elapsed = time.perf_counter() - t0
                assert rc == 0
                rate = n / elapsed
                results.append({"reencode": reencode, "workers": workers, "images": n,
                                "seconds": elapsed, "images_per_s": rate,
                                "per_worker_images_per_s": rate / workers,
                                "projected_hours_5p6M_32_cores": 5_600_000 / (rate / workers * 32) / 3600})
                shutil.rmtree(out)
    lines = ["| re-encode | workers | images | s | images/s | per worker | 5.6M on 32 cores (h) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {'max-side 512, q90' if r['reencode'] else 'no (bytes pass through)'} | {r['workers']} | "
                     f"{r['images']} | {r['seconds']:.1f} | {r['images_per_s']:.0f} | "
                     f"{r['per_worker_images_per_s']:.0f} | {r['projected_hours_5p6M_32_cores']:.2f} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "build_bench.json").write_text(json.dumps(results, indent=1))
    (Path(args.out) / "build_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"results": results}


if __name__ == "__main__":
    main()
