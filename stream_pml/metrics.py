"""Multi-label metrics: mAP (unknown-aware) and CP/CR/CF1/OP/OR/OF1 at a threshold."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def average_precision(scores_N: np.ndarray, targets_N: np.ndarray) -> float:
    """AP of one class, equal to sklearn's ``average_precision_score``, ties included.

    AP = sum_k (R_k - R_{k-1}) P_k over distinct score thresholds, descending: tied scores
    enter together, as in sklearn's precision-recall curve.
    """
    order = np.argsort(-scores_N, kind="mergesort")
    s, y = scores_N[order], targets_N[order].astype(np.float64)
    tp = np.cumsum(y)
    fp = np.cumsum(1.0 - y)
    # Last index of each run of equal scores.
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp, fp = tp[last], fp[last]
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


@dataclass
class MapResult:
    map: float
    per_class_ap: np.ndarray  # NaN for skipped classes
    num_skipped: int
    skipped: list[int] = field(default_factory=list)
    # Expected mAP of random scores: each class's AP is then its positive rate on average.
    chance_map: float = float("nan")


def mean_average_precision_detail(scores: np.ndarray, targets: np.ndarray,
                                  known: np.ndarray | None = None) -> MapResult:
    """Mean over classes of AP, unknown entries masked out per class; classes with no
    positive or no negative left are skipped and counted."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets)
    known = np.ones_like(targets, dtype=bool) if known is None else np.asarray(known, dtype=bool)
    aps = np.full(scores.shape[1], np.nan)
    prevalence = np.full(scores.shape[1], np.nan)
    skipped = []
    for c in range(scores.shape[1]):
        k = known[:, c]
        y = targets[k, c] > 0.5
        if y.all() or not y.any():
            skipped.append(c)
            continue
        aps[c] = average_precision(scores[k, c], y)
        prevalence[c] = y.mean()
    valid = aps[~np.isnan(aps)]
    return MapResult(float(valid.mean()) if valid.size else float("nan"), aps, len(skipped), skipped,
                     float(np.nanmean(prevalence)) if valid.size else float("nan"))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray, known: np.ndarray | None = None) -> float:
    """mAP in [0, 1] (see :func:`mean_average_precision_detail`)."""
    return mean_average_precision_detail(scores, targets, known).map


def threshold_metrics(scores: np.ndarray, targets: np.ndarray, known: np.ndarray | None = None,
                      threshold: float = 0.5) -> dict[str, float]:
    """Per-class (C*) and overall (O*) precision, recall, F1 at ``threshold`` over known entries."""
    known = np.ones_like(targets, dtype=bool) if known is None else np.asarray(known, dtype=bool)
    pred = (np.asarray(scores) >= threshold) & known
    y = (np.asarray(targets) > 0.5) & known
    tp = (pred & y).sum(0).astype(np.float64)
    npred = pred.sum(0).astype(np.float64)
    npos = y.sum(0).astype(np.float64)
    cp = float(np.mean(np.divide(tp, npred, out=np.zeros_like(tp), where=npred > 0)))
    cr = float(np.mean(np.divide(tp, npos, out=np.zeros_like(tp), where=npos > 0)))
    op = float(tp.sum() / max(npred.sum(), 1.0))
    orr = float(tp.sum() / max(npos.sum(), 1.0))

    def f1(p: float, r: float) -> float:
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    return {"CP": cp, "CR": cr, "CF1": f1(cp, cr), "OP": op, "OR": orr, "OF1": f1(op, orr)}
