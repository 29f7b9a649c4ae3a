"""Scoring a split during training: every rank scores its shards, rank 0 gathers the
predictions (each sample counted once), scores them and hands the metrics to every rank."""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch

from .data.batch import Batch, dense_labels
from .distributed import broadcast_from_main, gather_to_main
from .class_table import ClassCounts
from .metrics import mean_average_precision_detail, threshold_metrics


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[Batch], *, num_classes: int,
             device: torch.device, normalize: Callable[[torch.Tensor], torch.Tensor],
             use_amp: bool, calibrate: bool = False, per_class: bool = False) -> tuple[dict, list[float] | None]:
    """(metrics of the whole split, per-class thresholds of best F1 when ``calibrate``).

    The thresholds are what ``predict --threshold calibrated`` uses (from the validation split).
    With ``per_class`` the metrics hold ``per_class``: :class:`ClassCounts` as a dict.
    """
    was_training = model.training
    model.eval()
    rows, scores, targets, known = [], [], [], []
    for batch in batches:
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(normalize(batch.images_BCHW))
        t, k = dense_labels(batch.pos_BP, batch.neg_BN, num_classes)
        rows.append(batch.rows_B.cpu().numpy())
        scores.append(torch.sigmoid(logits.float()).cpu().numpy())
        targets.append(t.cpu().numpy().astype(np.int8))
        known.append(k.cpu().numpy())
    model.train(was_training)
    parts = gather_to_main((rows, scores, targets, known))
    return broadcast_from_main(_score(parts, calibrate, per_class) if parts is not None else None)


def _score(parts: list, calibrate: bool, per_class: bool) -> tuple[dict, list[float] | None]:
    rows_N, scores_NC, targets_NC, known_NC = (
        np.concatenate([a for p in parts for a in p[j]]) for j in range(4))
    # pad_last_batch may repeat a sample at a shard list's end; keep each row once.
    _, first = np.unique(rows_N, return_index=True)
    scores_NC, targets_NC, known_NC = scores_NC[first], targets_NC[first], known_NC[first]
    detail = mean_average_precision_detail(scores_NC, targets_NC, known_NC)
    thresholds = None
    if calibrate:
        from .inference import calibrate_thresholds

        thresholds = calibrate_thresholds(scores_NC, targets_NC, known_NC).tolist()
    result = {"map": detail.map, "chance_map": detail.chance_map, "num_eval": int(len(first)),
              "skipped_classes": detail.num_skipped, **threshold_metrics(scores_NC, targets_NC, known_NC)}
    if per_class:
        result["per_class"] = ClassCounts.of(detail, targets_NC, known_NC).as_dict()
    return result, thresholds
