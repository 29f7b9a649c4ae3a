"""Baseline losses the research compares with. Each: logits in, fp32 log-sigmoid math.

Unknown entries are ignored unless the method says how to treat them (AN-family: as negative).
"""

from __future__ import annotations

import torch

from .common import log_probs, masked_mean


def bce_loss(logits_BC: torch.Tensor, targets_BC: torch.Tensor, known_BC: torch.Tensor, *,
             label_smoothing: float = 0.0, **_: object) -> torch.Tensor:
    """Binary cross-entropy over the known entries (BCE; BCE-LS with ``label_smoothing``).

    L = -mean_{(i,j) known} [ y' log s(x) + (1-y') log(1-s(x)) ], y' = y(1-eps) + eps/2.
    With full labels (FAL) this is plain BCE. Reduction: mean over known entries.
    Source: standard; label smoothing as in Cole et al. 2021 (eps = 0.1 for BCE-LS).
    """
    logp, logn = log_probs(logits_BC)
    y = targets_BC.float() * (1 - label_smoothing) + label_smoothing / 2
    return -masked_mean(y * logp + (1 - y) * logn, known_BC.bool())


def an_loss(logits_BC: torch.Tensor, targets_BC: torch.Tensor, known_BC: torch.Tensor, *,
            label_smoothing: float = 0.0, **_: object) -> torch.Tensor:
    """Assume Negative (AN; AN-LS with ``label_smoothing``): unknown entries count as negatives.

    L = -mean_{all (i,j)} [ z' log s(x) + (1-z') log(1-s(x)) ], z = y where known, 0 elsewhere,
    z' = z(1-eps) + eps/2. Reduction: mean over all B x C entries. Source: Cole et al. 2021.
    """
    logp, logn = log_probs(logits_BC)
    z = torch.where(known_BC.bool(), targets_BC.float(), torch.zeros_like(logp))
    z = z * (1 - label_smoothing) + label_smoothing / 2
    return -(z * logp + (1 - z) * logn).mean()
