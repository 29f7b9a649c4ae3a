"""The paper's loss (eq. 12) with pseudo labels, as pinned down in shared/METHOD.md."""

from __future__ import annotations

import math

import torch

from .common import all_reduce_sum, log_probs, masked_row_mean, sample_unknown

D_SCHEDULES = ("text", "printed")
AB_SCOPES = ("known", "all")


def d_weight(epoch: int, num_epochs: int, m: float = 3.0, schedule: str = "text") -> float:
    """Weight d of the pseudo-label part (eq. 9), 1-based ``epoch``.

    ``text`` (our default): exp((e_c + m - e_T) / e_T), so d = 1 at epoch e_T - m as the
    paper's text says; ``printed``: exp((e_c + m) / e_T), the formula as printed.
    """
    if schedule == "text":
        return math.exp((epoch + m - num_epochs) / num_epochs)
    if schedule == "printed":
        return math.exp((epoch + m) / num_epochs)
    raise ValueError(f"d_schedule: {schedule!r} is not one of {D_SCHEDULES}")


def pml_loss(
    logits_BC: torch.Tensor,
    targets_BC: torch.Tensor,
    known_BC: torch.Tensor,
    *,
    pseudo_BC: torch.Tensor | None = None,
    epoch: int = 1,
    num_epochs: int = 1,
    gamma: float = 0.05,
    m: float = 3.0,
    q: float = 0.5,
    alpha_beta: bool = True,
    d: bool = True,
    p: bool = True,
    d_schedule: str = "text",
    ab_scope: str = "known",
    beta_counts_pseudo: bool = False,
    sampled_BC: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    stats: dict | None = None,
) -> torch.Tensor:
    """Partial multi-label loss with pseudo labels (paper eq. 12; METHOD.md decisions).

    Per image i, with E_i its known entries, S_i a uniform subset of ceil(q |U_i|) unknown
    entries, ytilde the (detached) pseudo labels::

        pos_i = (1/|E_i|) sum_E y log s(x)      + (d/|S_i|) sum_S ytilde log s(x)
        neg_i = (1/|E_i|) sum_E (1-y) log(1-s(x)) + (d/|S_i|) sum_S (1-ytilde) log(1-s(x))
        ab_scope="all"   (printed eq.):  L_i = -p_i (alpha pos_i + beta neg_i)
        ab_scope="known" (our default):  alpha/beta weight only the known part, the pseudo
                                          part is weighted by d alone

    beta = max(P/T, gamma), alpha = 1 - beta, with P = observed positives in the batch (plus
    the pseudo-label mass of S when ``beta_counts_pseudo``) and T = entries entering the loss
    (sum |E_i| + |S_i|), summed over DDP ranks. p_i = 2 if every sigmoid(x_ij) < 0.1 else 1.
    Switches ``alpha_beta``, ``d``, ``p`` off set those factors to 1; ``q=1`` keeps all of U_i.
    Reduction: mean over the images of the batch. Empty E_i or S_i contribute 0.
    Source: the research text (shared/PAPER.txt) with METHOD.md's decisions.
    """
    if ab_scope not in AB_SCOPES:
        raise ValueError(f"ab_scope: {ab_scope!r} is not one of {AB_SCOPES}")
    logp, logn = log_probs(logits_BC)
    known = known_BC.bool()
    y = targets_BC.float()
    if pseudo_BC is None:
        pseudo_BC = torch.full_like(logp, 0.5)
    yt = pseudo_BC.detach().float()
    if sampled_BC is None:
        sampled_BC = sample_unknown(~known, q, generator)
    sampled = sampled_BC & ~known
    with torch.no_grad():
        num_pos = (y * known).sum()
        num_entries = known.sum() + sampled.sum()
        if beta_counts_pseudo:
            num_pos = num_pos + (yt * sampled).sum()
        num_pos, num_entries = all_reduce_sum(num_pos, num_entries)
        beta = max(float(num_pos / num_entries.clamp(min=1.0)), gamma) if alpha_beta else 1.0
        alpha = 1.0 - beta if alpha_beta else 1.0
        d_val = d_weight(epoch, num_epochs, m, d_schedule) if d else 1.0
        all_low = (logp < math.log(0.1)).all(dim=1)
        p_B = torch.where(all_low & p, 2.0, 1.0).to(logp.dtype)
    pos_known = masked_row_mean(y * logp, known)
    neg_known = masked_row_mean((1 - y) * logn, known)
    pos_unk = d_val * masked_row_mean(yt * logp, sampled)
    neg_unk = d_val * masked_row_mean((1 - yt) * logn, sampled)
    if ab_scope == "all":
        per_image = alpha * (pos_known + pos_unk) + beta * (neg_known + neg_unk)
    else:
        per_image = alpha * pos_known + beta * neg_known + pos_unk + neg_unk
    loss = -(p_B * per_image).mean()
    if stats is not None:
        with torch.no_grad():
            stats.update(alpha=alpha, beta=beta, d=d_val, p2_share=float((p_B > 1).float().mean()),
                         loss_known=float(-(p_B * (alpha * pos_known + beta * neg_known)).mean()),
                         loss_pseudo=float(-(p_B * (pos_unk + neg_unk)).mean()))
    return loss
