"""The paper's loss (eq. 12) with pseudo labels, as pinned down in shared/METHOD.md."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .common import all_reduce_sum, log_probs, sample_unknown

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
    logp, logn = log_probs(logits_BC)
    known = known_BC.bool()
    y = targets_BC.float()
    yt = _pseudo(pseudo_BC, logp)
    if sampled_BC is None:
        sampled_BC = sample_unknown(~known, q, generator)
    sampled = sampled_BC & ~known
    terms = _Terms(
        pos_known=(y * logp * known).sum(1), neg_known=((1 - y) * logn * known).sum(1),
        num_known=known.sum(1).float(), num_pos=(y * known).sum(),
        pos_unk=(yt * logp * sampled).sum(1), neg_unk=((1 - yt) * logn * sampled).sum(1),
        num_sampled=sampled.sum(1).float(), pseudo_mass=(yt * sampled).sum())
    return _combine(terms, logits_BC.float(), epoch=epoch, num_epochs=num_epochs, gamma=gamma, m=m,
                    alpha_beta=alpha_beta, d=d, p=p, d_schedule=d_schedule, ab_scope=ab_scope,
                    beta_counts_pseudo=beta_counts_pseudo, stats=stats)


def pml_loss_sparse(
    logits_BC: torch.Tensor,
    pos_BP: torch.Tensor,
    neg_BN: torch.Tensor,
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
    generator: torch.Generator | None = None,
    stats: dict | None = None,
) -> torch.Tensor:
    """:func:`pml_loss` from padded class-id lists (-1 = padding), as batches carry them.

    The known part is gathered at the listed ids; the sampled unknown entries become an entry
    list (row, class) whose terms are summed per image with ``index_add``. Same formula, same
    sampling draw as the dense form for the same generator state (tested).
    """
    # Log-sigmoids only at the gathered entries: O(entries), not O(B x C).
    x = logits_BC.float()
    batch, num_classes = x.shape
    pos_valid, neg_valid = pos_BP >= 0, neg_BN >= 0
    pos_ids, neg_ids = pos_BP.clamp(min=0).long(), neg_BN.clamp(min=0).long()
    known = torch.zeros(batch, num_classes + 1, dtype=torch.bool, device=x.device)
    known.scatter_(1, torch.where(pos_valid, pos_ids, num_classes), True)
    known.scatter_(1, torch.where(neg_valid, neg_ids, num_classes), True)
    sampled = sample_unknown(~known[:, :num_classes], q, generator)
    rows_E, cols_E = sampled.nonzero(as_tuple=True)
    x_E = x[rows_E, cols_E]
    yt_E = (torch.full_like(x_E, 0.5) if pseudo_BC is None
            else pseudo_BC.detach().float()[rows_E, cols_E])
    zeros_B = torch.zeros(batch, device=x.device, dtype=x.dtype)
    terms = _Terms(
        pos_known=(F.logsigmoid(x.gather(1, pos_ids)) * pos_valid).sum(1),
        neg_known=(F.logsigmoid(-x.gather(1, neg_ids)) * neg_valid).sum(1),
        num_known=(pos_valid.sum(1) + neg_valid.sum(1)).float(), num_pos=pos_valid.sum().float(),
        pos_unk=zeros_B.index_add(0, rows_E, yt_E * F.logsigmoid(x_E)),
        neg_unk=zeros_B.index_add(0, rows_E, (1 - yt_E) * F.logsigmoid(-x_E)),
        num_sampled=torch.bincount(rows_E, minlength=batch).float(), pseudo_mass=yt_E.sum())
    return _combine(terms, x, epoch=epoch, num_epochs=num_epochs, gamma=gamma, m=m,
                    alpha_beta=alpha_beta, d=d, p=p, d_schedule=d_schedule, ab_scope=ab_scope,
                    beta_counts_pseudo=beta_counts_pseudo, stats=stats)


def _pseudo(pseudo_BC: torch.Tensor | None, logp: torch.Tensor) -> torch.Tensor:
    # Pseudo labels are targets: never a path for gradients.
    return torch.full_like(logp, 0.5) if pseudo_BC is None else pseudo_BC.detach().float()


@dataclass
class _Terms:
    """Per-image sums (B,) of the four parts of eq. 12 and the batch counts for beta."""

    pos_known: torch.Tensor
    neg_known: torch.Tensor
    num_known: torch.Tensor
    num_pos: torch.Tensor
    pos_unk: torch.Tensor
    neg_unk: torch.Tensor
    num_sampled: torch.Tensor
    pseudo_mass: torch.Tensor


def _combine(t: _Terms, x: torch.Tensor, *, epoch: int, num_epochs: int, gamma: float, m: float,
             alpha_beta: bool, d: bool, p: bool, d_schedule: str, ab_scope: str,
             beta_counts_pseudo: bool, stats: dict | None) -> torch.Tensor:
    if ab_scope not in AB_SCOPES:
        raise ValueError(f"ab_scope: {ab_scope!r} is not one of {AB_SCOPES}")
    with torch.no_grad():
        num_pos = t.num_pos + (t.pseudo_mass if beta_counts_pseudo else 0.0)
        num_pos, num_entries = all_reduce_sum(num_pos, t.num_known.sum() + t.num_sampled.sum())
        beta = max(float(num_pos / num_entries.clamp(min=1.0)), gamma) if alpha_beta else 1.0
        alpha = 1.0 - beta if alpha_beta else 1.0
        d_val = d_weight(epoch, num_epochs, m, d_schedule) if d else 1.0
        # Every sigmoid(x_ij) < 0.1  <=>  max_j x_ij < logit(0.1): one reduction, no exp.
        all_low = x.max(dim=1).values < math.log(0.1 / 0.9)
        p_B = torch.where(all_low & p, 2.0, 1.0).to(x.dtype)
    ne, ns = t.num_known.clamp(min=1.0), t.num_sampled.clamp(min=1.0)
    pos_known, neg_known = t.pos_known / ne, t.neg_known / ne
    pos_unk, neg_unk = d_val * t.pos_unk / ns, d_val * t.neg_unk / ns
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
