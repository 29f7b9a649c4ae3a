"""ROLE's learnable N x C label estimator (Cole et al. 2021), kept in memory by row id.

Under DDP every rank holds the whole estimator and its Adam state, kept identical by
averaging the gradient over ranks like the model's. Rank-owned rows (as the pseudo-label
store does) cannot reproduce the optimizer: Adam moves every row at every step through its
moments, not only the rows of the batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .. import distributed

DEFAULT_MAX_BYTES = 4 * 2**30


class EstimatorTooLarge(MemoryError):
    """ROLE's estimator would not fit: said before anything is allocated, in one line."""


class LabelEstimator(nn.Module):
    """Logits of estimated labels for every (row, class) of the training split.

    Initialisation (ours; Cole et al. leave it to code): observed positives at logit(0.995),
    observed negatives at logit(0.005), unknown entries at logit(u), u ~ U(0.4, 0.6) seeded.
    """

    @staticmethod
    def check_size(num_rows: int, num_classes: int, max_bytes: int | None = None) -> None:
        """Refuse, before anything is allocated, an estimator that does not fit: it is
        replicated on every rank (its Adam moves every row, so rows cannot be rank-owned)."""
        max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
        need = num_rows * num_classes * 4 * 3  # weights + Adam's two moments
        if need > max_bytes:
            raise EstimatorTooLarge(
                f"loss.name=role keeps a {num_rows} x {num_classes} label estimator with Adam state on "
                f"every rank ({need / 2**30:.1f} GiB > the {max_bytes / 2**30:.1f} GiB limit); for a split "
                "this large use a loss without one (pml, the default, keeps its pseudo labels in a "
                "rank-owned store; or ll_r, an, wan)")

    def __init__(self, partial_NC: np.ndarray, seed: int = 0, max_bytes: int | None = None):
        super().__init__()
        num_rows, num_classes = partial_NC.shape
        self.check_size(num_rows, num_classes, max_bytes)
        rng = np.random.default_rng(seed)
        init = rng.uniform(0.4, 0.6, size=partial_NC.shape)
        init[partial_NC == 1] = 0.995
        init[partial_NC == 0] = 0.005
        self.logits_NC = nn.Parameter(torch.from_numpy(np.log(init / (1 - init))).float())

    def forward(self, rows_B: torch.Tensor) -> torch.Tensor:
        return self.logits_NC[rows_B.to(self.logits_NC.device)]

    def average_grad_over_ranks(self, rows_B: torch.Tensor) -> None:
        """After ``backward``: give every rank the gradient DDP gives the model, the mean of
        the ranks' gradients, so the replicated estimators stay identical.

        A rank's gradient is zero outside its batch's rows, so gathering each rank's rows and
        their gradient rows is exact, at O(world x B x C) traffic instead of N x C. Rows of
        one step are distinct across ranks (each rank reads its own shards); the
        accumulating put would still sum a repeated row, deterministically on CUDA too.
        """
        num_ranks = distributed.world_size()
        grad = self.logits_NC.grad
        if num_ranks == 1 or grad is None:
            return
        rows = rows_B.to(grad.device)
        all_rows = distributed.all_gather_cat(rows)
        all_grads = distributed.all_gather_cat(grad[rows])
        grad.zero_()
        grad.index_put_((all_rows,), all_grads / num_ranks, accumulate=True)


def logit(p: float) -> float:
    return math.log(p / (1 - p))
