"""How much the demo's test mAP depends on the seed and on the thread count.

    python -m bench.demo_spread [--seeds 0 1 2] [--threads 1 2] [overrides ...]

Runs README command (1)'s training (configs/demo.yaml) once per (seed, torch compute
threads), each in a fresh process with ``OMP_NUM_THREADS`` set to the thread count, and
writes the test mAP of each run, their mean and range to ``bench/results/demo_spread.md``
(and ``.json``). Float summation order changes with the thread count, so a run at the edge of
stability shows it here. Needs the demo shards: ``shard-tools build digits --out data/digits``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_run(seed: int, threads: int, shards: Path, overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "stream_pml.train", "--config", str(REPO / "configs/demo.yaml"),
               f"data.shards={shards}", f"train.seed={seed}", f"train.run_dir={tmp}/run", *overrides]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1])
        return json.loads((Path(tmp) / "run" / "metrics.json").read_text())["test"]["map"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--shards", type=Path, default=REPO / "data/digits")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/demo_spread")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every run")
    args = ap.parse_args(argv)
    rows = []
    for seed in args.seeds:
        for threads in args.threads:
            m = one_run(seed, threads, args.shards, args.overrides)
            rows.append({"seed": seed, "threads": threads, "test_map": m})
            print(f"seed {seed}, {threads} threads: test mAP {100 * m:.2f}%", flush=True)
    maps = [r["test_map"] for r in rows]
    summary = {"runs": rows, "mean": sum(maps) / len(maps), "min": min(maps), "max": max(maps),
               "overrides": args.overrides}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    lines = [f"demo test mAP over seeds {args.seeds} x threads {args.threads}"
             + (f" ({' '.join(args.overrides)})" if args.overrides else ""), "",
             "| seed | threads | test mAP (%) |", "|---|---|---|"]
    lines += [f"| {r['seed']} | {r['threads']} | {100 * r['test_map']:.2f} |" for r in rows]
    lines += ["", f"mean {100 * summary['mean']:.2f} %, range {100 * summary['min']:.2f} - "
              f"{100 * summary['max']:.2f} % ({100 * (summary['max'] - summary['min']):.2f} points)"]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(lines[-1])
    return summary


if __name__ == "__main__":
    main()
