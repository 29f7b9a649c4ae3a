"""Open Images scale on one machine: per-rank start-up, memory and per-step look-ups.

    python -m bench.scale [--rows 5600000] [--ranks 8] [--code PATH]

Fabricates (once, cached under ``--data``) an Open Images-shaped training split without image
bytes: 5,600,000 rows x 600 classes in 5,600 shards of 1,000 with real ``.idx`` files, the
class-frequency shape of Open Images (a few classes in millions of images, hundreds in under
1,000), marked fully labelled so that a label setting (PAL 0.5) is applied to it, the case
that builds the largest label state. Then, for each of ``--ranks`` simulated ranks, in a fresh
process (its own peak RSS): start-up (manifest, label setting, shard deal, store open, the
rank's stream plan) and the per-step cost of label and pseudo-label look-ups for a
256-row batch. ``--code PATH`` runs the same measurement against another checkout (the
"before" of a change), in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLASSES, SHARD = 600, 1000
# (class rank, images): log-linear between anchors; Open Images' image-level labels have a
# head of classes in millions of images and hundreds of classes in under 1,000.
ANCHORS = [(0, 3_000_000), (3, 1_000_000), (100, 20_000), (300, 1_000), (599, 50)]


def class_counts(num_rows: int) -> np.ndarray:
    ranks, counts = zip(*ANCHORS)
    scale = num_rows / 5_600_000
    return np.maximum(1, np.exp(np.interp(np.arange(CLASSES), ranks, np.log(counts))) * scale).astype(np.int64)


def _complement_csr(indptr: np.ndarray, cols: np.ndarray, num_rows: int, block: int = 50_000):
    """Every class a row does not list, as CSR: the negatives a builder writes for a fully
    labelled split."""
    counts, parts = [], []
    for lo in range(0, num_rows, block):
        hi = min(lo + block, num_rows)
        dense = np.ones((hi - lo, CLASSES), dtype=bool)
        dense[np.repeat(np.arange(hi - lo), np.diff(indptr[lo:hi + 1])), cols[indptr[lo]:indptr[hi]]] = False
        r, c = np.nonzero(dense)
        counts.append(np.bincount(r, minlength=hi - lo))
        parts.append(c.astype(np.int32))
    return np.concatenate([[0], np.cumsum(np.concatenate(counts))]), np.concatenate(parts)


def fabricate(out: Path, num_rows: int, negatives: bool) -> Path:
    from shard_tools.manifest import Manifest, ShardInfo, SplitInfo

    if (out / "manifest.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    counts = class_counts(num_rows)
    rows_per_class = [rng.choice(num_rows, size=int(n), replace=False) if n > num_rows // 50
                      else np.unique(rng.integers(0, num_rows, int(n))) for n in counts]
    rows = np.concatenate(rows_per_class)
    cols = np.repeat(np.arange(CLASSES, dtype=np.int32), [len(r) for r in rows_per_class])
    order = np.lexsort((cols, rows))
    rows, cols = rows[order], cols[order]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=num_rows))])
    # Negatives are the complement of the positives in a fully labelled split. The label
    # setting reads positives only; code that reads the negatives (--negatives, for a
    # "before") needs them written, (rows x ~600) entries.
    neg_indptr, neg_indices = (_complement_csr(indptr, cols, num_rows) if negatives else
                               (np.zeros(num_rows + 1, np.int64), np.zeros(0, np.int32)))
    np.savez(out / "train.labels.npz", pos_indptr=indptr, pos_indices=cols.astype(np.int32),
             neg_indptr=neg_indptr, neg_indices=neg_indices)
    shards = []
    for s in range(-(-num_rows // SHARD)):
        n = min(SHARD, num_rows - s * SHARD)
        name = f"train-{s:06d}"
        (out / f"{name}.tar").touch()
        lines = [f"v1.2 {n}"] + [
            f"jpg {k * 4096} 1024 {k:010d}.jpg row {k * 4096 + 1536} 8 {k:010d}.row "
            f"pos {k * 4096 + 2560} 8 {k:010d}.pos neg {k * 4096 + 3584} 8 {k:010d}.neg" for k in range(n)]
        (out / f"{name}.idx").write_text("\n".join(lines) + "\n")
        shards.append(ShardInfo(name=f"{name}.tar", index=f"{name}.idx", num_samples=n, row_start=s * SHARD,
                                row_stop=s * SHARD + n, sha256=f"{s:064x}"))
    split = SplitInfo(num_samples=num_rows, shards=shards, fully_labelled=True, num_positives=len(cols))
    Manifest(dataset="openimages-shaped", classes=[f"/m/{c:05d}" for c in range(CLASSES)], shard_size=SHARD,
             splits={"train": split}).save(out)
    return out


def peak_rss_mb() -> float:
    """This process's peak resident memory. Not getrusage's ru_maxrss: Linux keeps that across
    execve, so a child would report its parent's peak (the fabrication's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rank_main(data: str, rank: int, world_size: int, run: str) -> dict:
    """One rank's start-up and look-ups, measured in this (fresh) process."""
    import torch

    from stream_pml import components
    from stream_pml.config import load_config
    from stream_pml.data.loader import ShardLoader
    from stream_pml.distributed import DistInfo

    cfg = load_config(None, [f"data.shards={data}", "data.val_split=''", "data.test_split=''",
                             "data.label_setting=pal", "data.label_ratio=0.5", "data.backend=torch",
                             f"train.run_dir={run}", "loss.name=pml", "data.batch_size=256"])
    out: dict = {"rank": rank}
    t0 = time.perf_counter()
    loader = ShardLoader(cfg.data, rank, world_size, cfg.train.seed)
    out["manifest_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    labels = components.label_table(cfg, loader)
    out["label_setting_s"] = time.perf_counter() - t
    out["label_state_mb"] = sum(v.nbytes if isinstance(v, np.ndarray) else v.numel() * v.element_size()
                                for v in vars(labels).values()
                                if isinstance(v, (np.ndarray, torch.Tensor))) / 2**20
    t = time.perf_counter()
    if hasattr(loader, "owned_pieces"):  # pieces of the deal (rows of this rank)
        owned, mine = loader.owned_pieces(1), loader.deal(1).rows(rank)
    else:  # whole shards (older checkouts measured with --code)
        owned = loader.owned_train_shards(1)
        mine = loader.train_split.shards[owned[0]].row_start + np.arange(SHARD)
    out["batches_per_epoch"] = loader.num_batches(1)
    out["deal_s"] = time.perf_counter() - t
    t = time.perf_counter()
    info = DistInfo(rank, world_size, 0, torch.device("cpu"))
    store = components.open_store(cfg, loader, labels, info) if rank == 0 or (Path(run) / "pseudo_labels.zarr").exists() \
        else None
    out["store_open_s"] = time.perf_counter() - t
    t = time.perf_counter()
    loader.train_stream(1)  # reads the rank's .idx files and plans the epoch
    out["stream_plan_s"] = time.perf_counter() - t
    out["startup_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = peak_rss_mb()
    rng = np.random.default_rng(rank)
    label_ms, store_ms = [], []
    if store is not None:
        store.set_owned_chunks(owned)
    for _ in range(20):
        # A batch drawn from a shard's worth of the rank's rows, as the shuffle window reads.
        rows = torch.from_numpy(mine[rng.integers(0, min(SHARD, len(mine)), 256)])
        t = time.perf_counter()
        labels.ids(rows, torch.device("cpu"))
        label_ms.append(1e3 * (time.perf_counter() - t))
        if store is not None:
            t = time.perf_counter()
            store.read(rows)
            store_ms.append(1e3 * (time.perf_counter() - t))
    out["labels_ms_per_batch"] = statistics.median(label_ms)
    out["store_read_ms_per_batch"] = statistics.median(store_ms) if store_ms else None
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=5_600_000)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--data", default="bench/results/scale-data")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--code", default=None, help="another checkout to measure as well (before)")
    ap.add_argument("--negatives", action="store_true",
                    help="write the negative lists too (code that reads them; rows x ~600 entries)")
    ap.add_argument("--rank-main", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rank_main:
        data, rank, world, run = args.rank_main
        print(json.dumps(rank_main(data, int(rank), int(world), run)))
        return {}
    data = fabricate(Path(args.data + (f"-{args.rows}" if args.rows != 5_600_000 else "")
                          + ("-neg" if args.negatives else "")), args.rows, args.negatives)
    report: dict = {"rows": args.rows, "classes": CLASSES, "shards": -(-args.rows // SHARD), "ranks": args.ranks}
    codes = {"this checkout": str(Path(__file__).resolve().parents[1])}
    if args.code:
        codes["--code " + args.code] = str(Path(args.code).resolve())
    for label, code in codes.items():
        run = Path(args.out) / f"scale-run-{abs(hash(code)) % 10**8}"
        per_rank = []
        for rank in range(args.ranks):
            env = {**os.environ, "PYTHONPATH": code, "OMP_NUM_THREADS": "1"}
            # This file's rank code, the package of ``code``.
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--rank-main", str(data.resolve()),
                                   str(rank), str(args.ranks), str(run.resolve())],
                                  env=env, cwd=code, capture_output=True, text=True)
            if proc.returncode != 0:
                per_rank.append({"rank": rank, "error": proc.stderr.strip().splitlines()[-1][:300]})
                print(f"{label} rank {rank}: {per_rank[-1]['error']}", flush=True)
                break
            per_rank.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{label} rank {rank}: {per_rank[-1]}", flush=True)
        report[label] = per_rank
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(report, indent=1))
    lines = [f"| measure ({args.rows:,} x {CLASSES}, {args.ranks} ranks, medians over ranks) | " +
             " | ".join(codes) + " |", "|---|" + "---|" * len(codes)]
    for key in ("startup_s", "manifest_s", "label_setting_s", "deal_s", "store_open_s", "stream_plan_s",
                "label_state_mb", "peak_rss_mb", "labels_ms_per_batch", "store_read_ms_per_batch", "batches_per_epoch"):
        cells = []
        for label in codes:
            vals = [r[key] for r in report[label] if r.get(key) is not None]
            cells.append(f"{statistics.median(vals):.3g}" if vals else
                         next((r["error"] for r in report[label] if "error" in r), "-"))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "scale.md").write_text(table + "\n")
    print(table)
    return report


if __name__ == "__main__":
    main()
