"""Shared pieces of the losses: fp32 log-sigmoid terms, reductions, sampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def log_probs(logits_BC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log sigmoid(x), log(1 - sigmoid(x))) in float32, stable for any logit."""
    x = logits_BC.float()
    return F.logsigmoid(x), F.logsigmoid(-x)


def masked_mean(values_BC: torch.Tensor, mask_BC: torch.Tensor) -> torch.Tensor:
    """Mean over all entries in ``mask``; 0 when it is empty."""
    m = mask_BC.to(values_BC.dtype)
    return (values_BC * m).sum() / m.sum().clamp(min=1.0)


def sample_unknown(unknown_BC: torch.Tensor, q: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniform subset of each row's unknown entries of size exactly ceil(q * |U_i|).

    Each entry gets an i.i.d. uniform key (known entries get 2, above every key); the k_i
    smallest keys of row i are a uniform k_i-subset of U_i. ``topk`` with k = max_i k_i does
    this for all rows at once: no loop over rows, no full sort (measured 122 ms vs 341 ms for
    an argsort at B = 256, C = 20,000, q = 0.1 on 2 CPU cores).
    """
    if q >= 1.0:
        return unknown_BC.clone()
    out = torch.zeros_like(unknown_BC)
    # ceil(q * n) in float can land one above an exact integer (0.3 * 10 = 3.0000000000000004).
    k = torch.ceil(unknown_BC.sum(1).double() * q - 1e-9).long()
    k_max = int(k.max()) if k.numel() else 0
    if q <= 0.0 or k_max == 0:
        return out
    keys = torch.rand(unknown_BC.shape, generator=generator, device=unknown_BC.device)
    keys = torch.where(unknown_BC, keys, torch.full_like(keys, 2.0))
    idx = torch.topk(keys, k_max, dim=1, largest=False, sorted=True).indices
    take = torch.arange(k_max, device=idx.device)[None, :] < k[:, None]
    # topk's indices are distinct within a row, so the False scatters never hit a taken entry.
    out.scatter_(1, idx, take)
    return out

