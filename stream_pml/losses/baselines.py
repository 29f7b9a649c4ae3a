"""Baseline losses the research compares with. Each: logits in, fp32 log-sigmoid math.

Unknown entries are ignored unless the method says how to treat them (AN-family: as negative).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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


def _assume_negative(targets_BC: torch.Tensor, known_BC: torch.Tensor) -> torch.Tensor:
    return torch.where(known_BC.bool(), targets_BC.float(), torch.zeros_like(targets_BC, dtype=torch.float32))


def wan_loss(logits_BC: torch.Tensor, targets_BC: torch.Tensor, known_BC: torch.Tensor, *,
             neg_weight: float | None = None, **_: object) -> torch.Tensor:
    """Weak Assume Negative: unknown entries are negatives weighted by w = 1/(C-1).

    L = -mean_{all (i,j)} [ z log s(x) + w_ij (1-z) log(1-s(x)) ], w_ij = w for unknown
    entries and 1 for observed negatives (ours: an observed negative is certain).
    Reduction: mean over all B x C entries. Source: Cole et al. 2021.
    """
    logp, logn = log_probs(logits_BC)
    z = _assume_negative(targets_BC, known_BC)
    w = 1.0 / max(logits_BC.shape[1] - 1, 1) if neg_weight is None else neg_weight
    weight = torch.where(known_BC.bool(), torch.ones_like(logp), torch.full_like(logp, w))
    return -(z * logp + weight * (1 - z) * logn).mean()


def focal_loss(logits_BC: torch.Tensor, targets_BC: torch.Tensor, known_BC: torch.Tensor, *,
               gamma: float = 2.0, **_: object) -> torch.Tensor:
    """Focal loss, unknown entries as negatives (gamma 2).

    L = -mean [ z (1-p)^g log p + (1-z) p^g log(1-p) ], p = s(x). Reduction: mean over all
    B x C entries. Source: Lin et al. 2017; used as a partial-label baseline in the research.
    """
    return asl_loss(logits_BC, targets_BC, known_BC, gamma_pos=gamma, gamma_neg=gamma, clip=0.0)


def asl_loss(logits_BC: torch.Tensor, targets_BC: torch.Tensor, known_BC: torch.Tensor, *,
             gamma_pos: float = 0.0, gamma_neg: float = 4.0, clip: float = 0.05,
             **_: object) -> torch.Tensor:
    """Asymmetric loss, unknown entries as negatives (gamma- 4, gamma+ 0, clip 0.05).

    L = -mean [ z (1-p)^{g+} log p + (1-z) p_m^{g-} log(1-p_m) ], p_m = max(p - m, 0), so
    1 - p_m = min(s(-x) + m, 1). Reduction: mean over all B x C entries (the reference code
    sums). Source: Ridnik et al. 2021, "Asymmetric Loss For Multi-Label Classification".
    """
    logp, logn = log_probs(logits_BC)
    z = _assume_negative(targets_BC, known_BC)
    p = logp.exp()
    if clip > 0:
        one_minus_pm = (logn.exp() + clip).clamp(max=1.0)
        log_one_minus_pm = one_minus_pm.log()
        pm = 1.0 - one_minus_pm
    else:
        log_one_minus_pm, pm = logn, p
    pos = z * (1 - p).pow(gamma_pos) * logp if gamma_pos else z * logp
    neg = (1 - z) * pm.pow(gamma_neg) * log_one_minus_pm if gamma_neg else (1 - z) * log_one_minus_pm
    return -(pos + neg).mean()


def epr_loss(logits_BC: torch.Tensor, targets_BC: torch.Tensor, known_BC: torch.Tensor, *,
             expected_positives: float | None = None, **_: object) -> torch.Tensor:
    """Expected Positive Regularization: BCE on observed entries + a count regularizer.

    L = (1/(B C)) sum_{observed} -[y log p + (1-y) log(1-p)] + ((1/B) sum_i sum_j p_ij - k)^2 / C^2,
    k = expected positives per image (from full-label statistics; the trainer takes it from
    the manifest). Cole et al. use observed positives only; observed negatives, where a
    setting has them, enter the same sum (ours). Source: Cole et al. 2021.
    """
    if expected_positives is None:
        raise ValueError("loss.params.expected_positives: EPR needs the expected positives per image")
    logp, logn = log_probs(logits_BC)
    known = known_BC.bool()
    y = targets_BC.float()
    observed = torch.where(known, y * logp + (1 - y) * logn, torch.zeros_like(logp))
    num_classes = logits_BC.shape[1]
    reg = (logp.exp().sum(1).mean() - expected_positives) ** 2 / num_classes**2
    return -observed.mean() + reg


def role_loss(logits_BC: torch.Tensor, targets_BC: torch.Tensor, known_BC: torch.Tensor, *,
              estimates_BC: torch.Tensor | None = None, expected_positives: float | None = None,
              **_: object) -> torch.Tensor:
    """Regularized Online Label Estimation: classifier and a learnable label estimator teach
    each other; ``estimates_BC`` are the estimator's logits for these rows (with grad).

    With f = s(x), g = s(estimates), each half detaching the other's output:
    L = 1/2 [ Lobs(f) + Lobs(g) ] + 1/2 [ BCE(f; sg(g)) + BCE(g; sg(f)) ]  (mean over B x C)
        + 1/2 [ R(f) + R(g) ],  R(.) = ((1/B) sum_ij . - k)^2 / C^2
    Lobs is the EPR observed-entry term. Source: Cole et al. 2021.
    """
    if estimates_BC is None:
        raise ValueError("ROLE needs the label estimator's logits for the batch (estimates_BC)")
    logp_f, logn_f = log_probs(logits_BC)
    logp_g, logn_g = log_probs(estimates_BC)
    f, g = logp_f.exp(), logp_g.exp()
    epr_f = epr_loss(logits_BC, targets_BC, known_BC, expected_positives=expected_positives)
    epr_g = epr_loss(estimates_BC, targets_BC, known_BC, expected_positives=expected_positives)
    cross_f = -(g.detach() * logp_f + (1 - g.detach()) * logn_f).mean()
    cross_g = -(f.detach() * logp_g + (1 - f.detach()) * logn_g).mean()
    return 0.5 * (epr_f + epr_g) + 0.5 * (cross_f + cross_g)


def hill_loss(logits_BC: torch.Tensor, targets_BC: torch.Tensor, known_BC: torch.Tensor, *,
              lamb: float = 1.5, margin: float = 1.0, gamma: float = 2.0, **_: object) -> torch.Tensor:
    """Hill loss, unknown entries as negatives (lambda 1.5, margin 1, gamma 2).

    Positives: focal margin, -(1 - s(x - m))^g log s(x - m); negatives: the Hill term
    (lambda - p) p^2 with p = s(x). Reduction: mean over all B x C entries (reference sums).
    Source: Zhang et al. 2021, "Simple and Robust Loss Design for Multi-Label Learning with
    Missing Labels".
    """
    x = logits_BC.float()
    z = _assume_negative(targets_BC, known_BC)
    logp_m = F.logsigmoid(x - margin)
    pos = -((1 - logp_m.exp()) ** gamma) * logp_m
    p = torch.sigmoid(x)
    neg = (lamb - p) * p**2
    return (z * pos + (1 - z) * neg).mean()


def splc_loss(logits_BC: torch.Tensor, targets_BC: torch.Tensor, known_BC: torch.Tensor, *,
              epoch: int = 1, tau: float = 0.6, change_epoch: int = 1, margin: float = 1.0,
              gamma: float = 2.0, **_: object) -> torch.Tensor:
    """Self-Paced Loss Correction (tau 0.6, margin 1, gamma 2), unknown as negative.

    After epoch ``change_epoch`` (1-based: from the 2nd epoch on, as the reference's 0-based
    ``epoch >= 1``) an unknown entry with s(x) > tau is taken as positive; observed negatives
    are never flipped (ours). Focal margin loss: x' = x - m on observed positives,
    L = -mean [ (1-p)^g z log s(x') + p^g (1-z) log(1-s(x')) ], p = s(x'). Reduction: mean
    over all B x C entries (reference sums). Source: Zhang et al. 2021.
    """
    x = logits_BC.float()
    known = known_BC.bool()
    z = _assume_negative(targets_BC, known_BC)
    x = torch.where(z > 0.5, x - margin, x)
    p = torch.sigmoid(x)
    if epoch > change_epoch:
        z = torch.where(~known & (p.detach() > tau), torch.ones_like(z), z)
    pt = (1 - p) * z + p * (1 - z)
    loss = -(z * F.logsigmoid(x) + (1 - z) * F.logsigmoid(-x)) * pt.pow(gamma)
    return loss.mean()


def large_loss(logits_BC: torch.Tensor, targets_BC: torch.Tensor, known_BC: torch.Tensor, *,
               epoch: int = 1, delta_rel: float = 0.002, mode: str = "reject", **_: object) -> torch.Tensor:
    """Large Loss Matters: AN, but the largest-loss unknown entries are rejected (LL-R) or
    their target flipped to positive for this step (LL-Ct).

    In epoch e (1-based) the k = ceil(B C delta_rel (e - 1)) unknown entries of largest
    AN loss are modified. Defaults: delta_rel 0.2% for LL-R, 0.1% for LL-Ct (the paper's
    Delta_rel in percent). Reduction: mean over all B x C entries.
    Source: Kim et al. 2022, "Large Loss Matters in Weakly Supervised Multi-Label Classification".
    """
    if mode not in ("reject", "correct"):
        raise ValueError(f"mode: {mode!r} is not reject or correct")
    logp, logn = log_probs(logits_BC)
    z = _assume_negative(targets_BC, known_BC)
    loss = -(z * logp + (1 - z) * logn)
    k = math.ceil(loss.numel() * delta_rel * (epoch - 1))
    if k > 0:
        unknown = ~known_BC.bool()
        unk_loss = torch.where(unknown, loss.detach(), torch.full_like(loss, -1.0)).flatten()
        k = min(k, int(unknown.sum()))
        chosen = torch.zeros_like(unk_loss, dtype=torch.bool)
        chosen[torch.topk(unk_loss, k).indices] = True
        chosen = chosen.view_as(loss)
        replacement = torch.zeros_like(loss) if mode == "reject" else -logp
        loss = torch.where(chosen, replacement, loss)
    return loss.mean()
