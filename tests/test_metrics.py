from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from stream_pml.metrics import (
    average_precision,
    mean_average_precision,
    mean_average_precision_detail,
    threshold_metrics,
)


@pytest.mark.parametrize("seed", range(5))
def test_ap_equals_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(200) < 0.2
    y[0] = True
    scores = np.round(rng.random(200), 1)  # heavy ties
    assert average_precision(scores, y) == pytest.approx(average_precision_score(y, scores), abs=1e-12)


def test_map_masks_unknown_and_skips_degenerate_classes():
    rng = np.random.default_rng(0)
    scores = rng.random((50, 4))
    targets = (rng.random((50, 4)) < 0.3).astype(int)
    targets[:, 3] = 0  # no positive: skipped
    known = rng.random((50, 4)) < 0.7
    detail = mean_average_precision_detail(scores, targets, known)
    ref = [average_precision_score(targets[known[:, c], c], scores[known[:, c], c]) for c in range(3)]
    assert detail.num_skipped == 1 and detail.skipped == [3]
    assert detail.map == pytest.approx(np.mean(ref))
    assert mean_average_precision(scores, targets, known) == pytest.approx(np.mean(ref))


def test_threshold_metrics_by_hand():
    scores = np.array([[0.9, 0.1], [0.6, 0.7], [0.2, 0.8]])
    targets = np.array([[1, 0], [0, 1], [1, 1]])
    m = threshold_metrics(scores, targets)
    # class 0: pred {0,1}, pos {0,2} -> P 1/2, R 1/2; class 1: pred {1,2}, pos {1,2} -> 1, 1
    assert m["CP"] == pytest.approx(0.75) and m["CR"] == pytest.approx(0.75)
    assert m["OP"] == pytest.approx(3 / 4) and m["OR"] == pytest.approx(3 / 4)
    assert m["CF1"] == pytest.approx(0.75) and m["OF1"] == pytest.approx(0.75)


def test_chance_map_is_what_random_scores_get():
    rng = np.random.default_rng(1)
    targets = (rng.random((4000, 5)) < np.array([0.05, 0.1, 0.2, 0.4, 0.6])).astype(int)
    detail = mean_average_precision_detail(rng.random((4000, 5)), targets)
    assert detail.chance_map == pytest.approx(targets.mean(0).mean())
    assert detail.map == pytest.approx(detail.chance_map, abs=0.03)
