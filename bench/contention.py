"""The demo's training epoch on a quiet machine and with cores taken by other work.

    python -m bench.contention [--code PATH] [--epochs 1]

A training node always runs other work (logging, evaluation, other ranks' pipelines). This
runs one demo epoch (configs/demo.yaml, no evaluation) in a fresh process, with no thread
setting in its environment (as a user would start it), three times: quiet, with one busy
core (a single-threaded loop of ours) and with two. The epoch time is the sum of the step
intervals in the run's ``train_log.csv`` (start-up excluded). ``--code PATH`` measures
another checkout the same way, in the same invocation (a "before"). Needs the demo shards:
``shard-tools build digits --out data/digits``.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def _spin() -> None:
    while True:
        pass


def epoch_seconds(code: Path, shards: Path, busy: int, epochs: int, overrides: tuple = ()) -> float:
    hogs = [mp.get_context("spawn").Process(target=_spin, daemon=True) for _ in range(busy)]
    for h in hogs:
        h.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
            env["PYTHONPATH"] = str(code)
            cmd = [sys.executable, "-m", "stream_pml.train", "--config", str(REPO / "configs/demo.yaml"),
                   f"data.shards={shards}", "data.val_split=''", "data.test_split=''",
                   f"train.epochs={epochs}", f"train.run_dir={run}", "train.log_every=1", *overrides]
            proc = subprocess.run(cmd, env=env, cwd=code, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr.strip().splitlines()[-1])
            with open(run / "train_log.csv") as f:
                rows = [r for r in csv.DictReader(f) if r.get("images_per_s")]
            batch = 32  # configs/demo.yaml
            return sum(batch / float(r["images_per_s"]) for r in rows) / epochs
    finally:
        for h in hogs:
            h.kill()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--code", default=None, help="another checkout to measure as well (before)")
    ap.add_argument("--shards", default=str(REPO / "data/digits"))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    codes = {"this checkout": REPO}
    if args.code:
        codes[f"--code {args.code}"] = Path(args.code).resolve()
    report: dict = {"cores": len(os.sched_getaffinity(0))}
    for label, code in codes.items():
        times = {}
        for busy in (0, 1, 2):
            t0 = time.perf_counter()
            times[busy] = epoch_seconds(code, Path(args.shards).resolve(), busy, args.epochs)
            print(f"{label}, {busy} busy core(s): epoch {times[busy]:.1f} s "
                  f"(run {time.perf_counter() - t0:.0f} s)", flush=True)
        report[label] = times
    lines = ["| demo epoch (s) | quiet | 1 core busy | 2 cores busy | 1 busy / quiet |", "|---|---|---|---|---|"]
    for label in codes:
        t = report[label]
        lines.append(f"| {label} | {t[0]:.1f} | {t[1]:.1f} | {t[2]:.1f} | {t[1] / t[0]:.2f}x |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "contention.json").write_text(json.dumps(report, indent=1))
    (out / "contention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
