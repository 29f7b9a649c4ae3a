"""Shared pieces of the losses: fp32 log-sigmoid terms, reductions, sampling, DDP sums."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


def log_probs(logits_BC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log sigmoid(x), log(1 - sigmoid(x))) in float32, stable for any logit."""
    x = logits_BC.float()
    return F.logsigmoid(x), F.logsigmoid(-x)


def masked_row_mean(values_BC: torch.Tensor, mask_BC: torch.Tensor) -> torch.Tensor:
    """Mean of each row over ``mask``; a row with an empty mask gives 0 (not NaN)."""
    m = mask_BC.to(values_BC.dtype)
    return (values_BC * m).sum(1) / m.sum(1).clamp(min=1.0)


def masked_mean(values_BC: torch.Tensor, mask_BC: torch.Tensor) -> torch.Tensor:
    """Mean over all entries in ``mask``; 0 when it is empty."""
    m = mask_BC.to(values_BC.dtype)
    return (values_BC * m).sum() / m.sum().clamp(min=1.0)


def sample_unknown(unknown_BC: torch.Tensor, q: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniform subset of each row's unknown entries of size exactly ceil(q * |U_i|).

    Random keys with known entries pushed to the end, then each entry's rank in its row; the
    ``k_i`` lowest ranks are taken. Vectorised, O(B x C log C), no loop over rows.
    """
    if q >= 1.0:
        return unknown_BC.clone()
    if q <= 0.0:
        return torch.zeros_like(unknown_BC)
    keys = torch.rand(unknown_BC.shape, generator=generator, device=unknown_BC.device)
    keys = torch.where(unknown_BC, keys, torch.full_like(keys, 2.0))
    order = keys.argsort(dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    # ceil(q * n) in float can land one above an exact integer (0.3 * 10 = 3.0000000000000004).
    k = torch.ceil(unknown_BC.sum(1).double() * q - 1e-9).long()
    return ranks < k[:, None]


def num_sampled(num_unknown: int, q: float) -> int:
    return int(math.ceil(num_unknown * q - 1e-9)) if q < 1.0 else num_unknown


def all_reduce_sum(*values: torch.Tensor) -> list[torch.Tensor]:
    """Sum scalars over ranks when a process group is up; no-op otherwise."""
    stacked = torch.stack([v.detach().double() for v in values])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked)
    return list(stacked.unbind())
