"""The per-class evaluation table: one row per class with its id, name, verified positives,
verified negatives and AP, and the summary over the classes that can be scored.

The same files come from the trainer's final test and from ``stream-pml evaluate``:
``per_class_ap_<tag>.csv`` (every class, in class order), ``evaluation_<tag>.md`` (the
summary, then classes by frequency) and ``per_class_ap_<tag>.png``. The mAP is the mean AP
over classes with at least one verified positive and one verified negative among the scored
images, unknown entries left out class by class: the rule of the official Open Images
evaluation, and of :func:`~stream_pml.metrics.mean_average_precision_detail`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .metrics import MapResult

THRESHOLD_KEYS = ("CP", "CR", "CF1", "OP", "OR", "OF1")


@dataclass(frozen=True)
class ClassCounts:
    """Per class (C,): verified positives and negatives among the scored images, and AP
    (NaN where a class has no positive or no negative)."""

    positives: np.ndarray
    negatives: np.ndarray
    ap: np.ndarray

    @classmethod
    def of(cls, detail: MapResult, targets_NC: np.ndarray, known_NC: np.ndarray) -> "ClassCounts":
        y = np.asarray(targets_NC) > 0.5
        known = np.asarray(known_NC, dtype=bool)
        return cls((y & known).sum(0), (~y & known).sum(0), np.asarray(detail.per_class_ap, dtype=np.float64))

    def as_dict(self) -> dict:
        return {"positives": self.positives.tolist(), "negatives": self.negatives.tolist(),
                "ap": [None if np.isnan(a) else float(a) for a in self.ap]}

    @classmethod
    def from_dict(cls, d: dict) -> "ClassCounts":
        return cls(np.asarray(d["positives"], dtype=np.int64), np.asarray(d["negatives"], dtype=np.int64),
                   np.asarray([np.nan if a is None else a for a in d["ap"]], dtype=np.float64))


def table_tag(dataset: str, fingerprint: str, split: str) -> str:
    """``<dataset>-<manifest fingerprint>_<split>``: tables of other datasets' splits of the
    same name do not overwrite each other."""
    return f"{dataset}-{fingerprint[:8]}_{split}"


def write_class_table(out_dir: Path, tag: str, title: str, counts: ClassCounts, class_ids: list[str],
                      names: list[str], metrics: dict) -> list[Path]:
    """Write the CSV, markdown and bar chart; ``metrics`` holds the split's ``map`` and
    ``num_eval`` (images) and, when present, the threshold metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    scored = ~np.isnan(counts.ap)
    csv_path = out_dir / f"per_class_ap_{tag}.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class_id", "name", "verified_positives", "verified_negatives", "ap"])
        for c in range(len(names)):
            w.writerow([class_ids[c], names[c], int(counts.positives[c]), int(counts.negatives[c]),
                        f"{counts.ap[c]:.6f}" if scored[c] else ""])
    order = np.argsort(-counts.positives, kind="stable")
    lines = [f"# {title}", "",
             f"mAP **{100 * metrics['map']:.2f} %** over the {int(scored.sum())} of {len(names)} classes with at "
             f"least one verified positive and one verified negative, on {metrics['num_eval']} images; "
             f"{int((~scored).sum())} classes not scored. Unknown entries are left out class by class.", ""]
    if all(k in metrics for k in THRESHOLD_KEYS):
        lines += ["At threshold 0.5: " + ", ".join(f"{k} {100 * metrics[k]:.1f}" for k in THRESHOLD_KEYS), ""]
    lines += ["| class id | name | verified positives | verified negatives | AP (%) |", "|---|---|---|---|---|"]
    lines += [f"| {class_ids[c]} | {names[c]} | {counts.positives[c]} | {counts.negatives[c]} | "
              f"{f'{100 * counts.ap[c]:.1f}' if scored[c] else 'not scored'} |" for c in order]
    md_path = out_dir / f"evaluation_{tag}.md"
    md_path.write_text("\n".join(lines) + "\n")
    png_path = out_dir / f"per_class_ap_{tag}.png"
    _bar_chart(names, counts.ap, order, png_path)
    return [csv_path, md_path, png_path]


def _bar_chart(names: list[str], aps: np.ndarray, order: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [c for c in order if not np.isnan(aps[c])][:60]
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(shown)), 3.5), dpi=110)
    ax.bar(range(len(shown)), [100 * aps[c] for c in shown])
    ax.set_xticks(range(len(shown)), [names[c] for c in shown], rotation=90, fontsize=6)
    ax.set_ylabel("AP (%)")
    ax.set_title("per-class AP, the 60 most frequent scored classes")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
