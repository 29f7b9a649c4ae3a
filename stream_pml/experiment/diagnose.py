"""Why a cell is won or lost: training curves and AP by class frequency, fixed features.

    python -m stream_pml.experiment.diagnose --data tests/data/features/bibtex/bibtex.npz \
        --methods pml an asl --settings pal0.6 spl --out docs/results/diagnosis/bibtex

Writes ``curves.csv`` (per epoch: validation mAP, mean pseudo label, pml's batch-mean alpha,
beta and share of p = 2 images), ``ap_by_frequency.csv`` / ``.md`` (test AP at the epoch
validation picks, averaged over thirds of the classes by training frequency) and
``curves.png``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch

from .features import from_npz
from ..losses import LOSSES
from .linear import resolve_method, train_cell

CURVE_FIELDS = ["method", "setting", "epoch", "val_map", "pseudo_mean", "alpha", "beta", "p2_share"]
BUCKETS = ("rare third", "middle third", "frequent third")


def frequency_buckets(train_freq_C: np.ndarray) -> list[np.ndarray]:
    """Class ids split into thirds by training frequency (rarest first)."""
    return np.array_split(np.argsort(train_freq_C, kind="stable"), 3)


def diagnose(data_path: Path, methods: list[str], settings: list[str], seed: int, out: Path,
             epochs: int = 20) -> tuple[list[dict], list[dict]]:
    torch.set_num_threads(1)
    data = from_npz(data_path, val_fraction=0.2)
    curves, by_freq = [], []
    for setting in settings:
        for method in methods:
            r = train_cell(data, method, setting, seed, epochs=epochs, detail=True)
            uses_pseudo = LOSSES[resolve_method(method)[0]].uses_pseudo
            curves += [{"method": method, "setting": setting,
                        **{k: v for k, v in h.items() if uses_pseudo or k != "pseudo_mean"}}
                       for h in r["history"]]
            row = {"method": method, "setting": setting, "test_map": r["test_map"], "best_epoch": r["best_epoch"]}
            for name, ids in zip(BUCKETS, frequency_buckets(r["class_train_freq"])):
                row[name] = float(np.nanmean(r["class_ap"][ids]))
            by_freq.append(row)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.DictWriter(f, CURVE_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(curves)
    fields = ["method", "setting", "test_map", "best_epoch", *BUCKETS]
    with open(out / "ap_by_frequency.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        w.writerows(by_freq)
    lines = ["| setting | method | test mAP | " + " | ".join(f"AP {b}" for b in BUCKETS) + " |",
             "|---|---|---|" + "---|" * len(BUCKETS)]
    for r in by_freq:
        lines.append(f"| {r['setting']} | {r['method']} | {100 * r['test_map']:.1f} | "
                     + " | ".join(f"{100 * r[b]:.1f}" for b in BUCKETS) + " |")
    (out / "ap_by_frequency.md").write_text("\n".join(lines) + "\n")
    _plot(curves, settings, methods, out / "curves.png")
    return curves, by_freq


def _plot(curves: list[dict], settings: list[str], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["val_map", "pseudo_mean", "p2_share"]
    fig, axes = plt.subplots(len(settings), len(panels), figsize=(4 * len(panels), 2.8 * len(settings)),
                             squeeze=False)
    for i, setting in enumerate(settings):
        for j, key in enumerate(panels):
            ax = axes[i][j]
            for method in methods:
                pts = [(c["epoch"], c[key]) for c in curves
                       if c["setting"] == setting and c["method"] == method and key in c]
                if pts:
                    ax.plot(*zip(*pts), label=method)
            ax.set_title(f"{setting}: {key}", fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a features .npz (X_train, Y_train, X_test, Y_test)")
    ap.add_argument("--methods", nargs="+", required=True, help="losses or variants (see the grid)")
    ap.add_argument("--settings", nargs="+", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    diagnose(Path(args.data), args.methods, args.settings, args.seed, Path(args.out), args.epochs)
    print(f"wrote {args.out}/curves.csv, ap_by_frequency.md, curves.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
