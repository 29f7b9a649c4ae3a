"""Pseudo-label store at Open Images scale: 5,600,000 x 600, measured on this machine.

    python -m bench.store_bench [--out bench/results] [--shards 40]

Reports creation time and bytes, read / write / journal+apply throughput (one checkpoint per
round, medians over rounds) for training-shaped
batches (256 rows from one or two shards), the share of a small model's training step spent
in store calls, and peak memory. Medians of repeats; all in one process.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stream_pml.pseudo_store import PseudoConfig, PseudoLabelStore

SHARD = 1000  # rows per shard and per chunk; set from --shard-size

ROWS, CLASSES = 5_600_000, 600


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def predictions(n: int, rng: np.random.Generator, kind: str) -> torch.Tensor:
    """``realistic``: sigmoid of N(-4, 2) logits (most classes absent from most images, as a
    trained multi-label model outputs); ``uniform``: U(0, 1), the incompressible worst case."""
    if kind == "uniform":
        return torch.from_numpy(rng.random((n, CLASSES), dtype=np.float32))
    return torch.sigmoid(torch.from_numpy(rng.normal(-4.0, 2.0, (n, CLASSES)).astype(np.float32)))


def batches_over(shards: list[int], batch: int, rng: np.random.Generator):
    """Rows as a rank reads them: its shards in order, shuffled within a 2-shard window."""
    rows = np.concatenate([rng.permutation(np.arange(s * SHARD, (s + 1) * SHARD)) for s in shards])
    for i in range(0, len(rows) - batch + 1, batch):
        yield torch.from_numpy(rows[i:i + batch])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--shards", type=int, default=40, help="shards touched by the rank")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--shard-size", type=int, default=1000, help="rows per shard = per Zarr chunk")
    ap.add_argument("--rounds", type=int, default=3, help="epochs over the shards, one checkpoint each")
    ap.add_argument("--values", choices=["realistic", "uniform"], default="realistic")
    args = ap.parse_args(argv)
    global SHARD
    SHARD = args.shard_size
    rng = np.random.default_rng(0)
    report: dict = {"rows": ROWS, "classes": CLASSES, "chunk_rows": SHARD, "dtype": "uint8",
                    "values": args.values}
    rss0 = maxrss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pl.zarr"
        t0 = time.perf_counter()
        store = PseudoLabelStore(path, ROWS, CLASSES, SHARD, {"bench": 1}, PseudoConfig())
        report["create_s"] = time.perf_counter() - t0
        report["create_bytes"] = dir_bytes(path)

        shards = rng.choice(ROWS // SHARD, size=args.shards, replace=False).tolist()
        store.set_owned_chunks(shards)
        read_s, write_s, journal_s, apply_s, n_rows = [], [], [], [], 0
        # Each round is an epoch over the rank's shards followed by a checkpoint; the first
        # round's base chunks are the fill value, later rounds replace written chunks.
        for round_ in range(args.rounds):
            n_rows = 0
            for rows in batches_over(shards, args.batch, rng):
                t = time.perf_counter()
                old = store.read(rows)
                read_s.append(time.perf_counter() - t)
                probs = predictions(len(rows), rng, args.values)
                t = time.perf_counter()
                store.write(rows, probs, old)
                write_s.append(time.perf_counter() - t)
                n_rows += len(rows)
            report["pending_mb_at_checkpoint"] = store.pending_bytes / 2**20
            # Checkpoint: journal into the checkpoint directory, then the apply to Zarr.
            ckpt = Path(tmp) / f"ckpt{round_}"
            ckpt.mkdir()
            t = time.perf_counter()
            store.save_journal(ckpt, 0)
            journal_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            store.apply_journal_async(ckpt, 0).result()
            apply_s.append(time.perf_counter() - t)
        report["read_ms_per_batch_median"] = 1e3 * statistics.median(read_s)
        report["read_rows_per_s"] = args.batch / statistics.median(read_s)
        report["write_ms_per_batch_median"] = 1e3 * statistics.median(write_s)
        report["write_rows_per_s"] = args.batch / statistics.median(write_s)
        report["rows_per_checkpoint"] = n_rows
        report["journal_s_median"] = statistics.median(journal_s)
        report["apply_s_median"] = statistics.median(apply_s)
        durable_s = [j + a for j, a in zip(journal_s, apply_s)]
        report["sustained_write_rows_per_s_median"] = n_rows / statistics.median(durable_s)
        report["sustained_write_rows_per_s_worst"] = n_rows / max(durable_s)
        report["journal_bytes"] = (Path(tmp) / "ckpt0" / "pseudo-rank0.journal.npz").stat().st_size
        report["store_bytes_after"] = dir_bytes(path)

        # A small model's step with and without the store calls.
        report.update(step_overhead(store, shards, rng, args.batch))
    report["peak_rss_mb"] = maxrss_mb()
    report["peak_rss_growth_mb"] = report["peak_rss_mb"] - rss0
    write_report(report, Path(args.out), f"{args.values}_{SHARD}")
    return report


def step_overhead(store: PseudoLabelStore, shards: list[int], rng, batch: int) -> dict:
    import torchvision

    model = torchvision.models.mobilenet_v3_small(num_classes=CLASSES)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    images = torch.randn(64, 3, 64, 64)
    step_s, store_s = [], []
    for i, rows in enumerate(batches_over(shards[:4], 64, rng)):
        t0 = time.perf_counter()
        logits = model(images)
        t1 = time.perf_counter()
        pseudo = store.read(rows)
        t2 = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, pseudo)
        opt.zero_grad()
        loss.backward()
        opt.step()
        t3 = time.perf_counter()
        store.write(rows, torch.sigmoid(logits.detach()), pseudo)
        t4 = time.perf_counter()
        if i >= 3:  # warm-up
            step_s.append(t4 - t0)
            store_s.append((t2 - t1) + (t4 - t3))
        if i >= 40:
            break
    return {"small_model": "mobilenet_v3_small 64x64, batch 64, C=600, CPU",
            "step_ms_median": 1e3 * statistics.median(step_s),
            "store_ms_per_step_median": 1e3 * statistics.median(store_s),
            "store_share_of_step": sum(store_s) / sum(step_s)}


def write_report(report: dict, out: Path, tag: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"store_bench_{tag}.json").write_text(json.dumps(report, indent=1))
    lines = ["| measure | value |", "|---|---|"]
    for k, v in report.items():
        lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    (out / f"store_bench_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
