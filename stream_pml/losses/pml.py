"""The paper's loss (eq. 12) with pseudo labels, with the readings of docs/method.md#pml."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..distributed import all_reduce_sum
from .common import log_probs, sample_unknown

D_SCHEDULES = ("text", "printed")
AB_SCOPES = ("known", "all")
REDUCTIONS = ("parts", "entries")
NORMALIZE = ("ab", "weights", "none")


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


@dataclass(frozen=True)
class PmlOptions:
    """Hyper-parameters of :func:`pml_loss` (both forms take them as keywords).

    The paper's parts: ``gamma`` (floor of beta), ``m`` (of the d schedule), ``q`` (share of
    unknown entries sampled per step), the ablation switches ``alpha_beta``, ``d``, ``p``, and
    the readings ``d_schedule`` ("text" ours, "printed") and ``ab_scope`` ("known": alpha/beta
    weight the known part only; "all": the printed eq. 11). Ours, for the unknown part:
    ``pseudo_scale`` (targets s * ytilde; "auto" = the observed positive share),
    ``unknown_weight`` ("auto" = (1 - r) + r/(C - 1)), ``reject`` (LL-R scaled by 1 - r),
    ``unknown_gamma_pos/neg`` and ``unknown_clip`` (ASL on the unknown part), ``reduction``
    ("parts" the paper, "entries"), ``normalize`` ("ab": divide by alpha/beta's mean entry
    weight; "weights"; "none") and ``beta_counts_pseudo``.

    Formulas: docs/method.md#pml. Why the defaults are what they are (chosen on validation,
    issue 9; normalised, issue 18): docs/decisions.md#how-the-default-was-chosen.
    :data:`PAPER_OPTIONS` is the paper's form (``pml-paper``).
    """

    epoch: int = 1
    num_epochs: int = 1
    gamma: float = 0.05
    m: float = 3.0
    q: float = 1.0
    alpha_beta: bool = True
    d: bool = False
    p: bool = False
    d_schedule: str = "text"
    ab_scope: str = "all"
    beta_counts_pseudo: bool = False
    pseudo_scale: float | str = 0.0
    unknown_gamma_pos: float = 0.0
    unknown_gamma_neg: float = 0.0
    unknown_clip: float = 0.0
    reject: float = 0.002
    reduction: str = "entries"
    unknown_weight: float | str = "auto"
    normalize: str = "ab"

    def __post_init__(self) -> None:
        if self.ab_scope not in AB_SCOPES:
            raise ValueError(f"ab_scope: {self.ab_scope!r} is not one of {AB_SCOPES}")
        if self.d_schedule not in D_SCHEDULES:
            raise ValueError(f"d_schedule: {self.d_schedule!r} is not one of {D_SCHEDULES}")
        for name in ("pseudo_scale", "unknown_weight"):
            if isinstance(getattr(self, name), str) and getattr(self, name) != "auto":
                raise ValueError(f"{name}: {getattr(self, name)!r} is neither a number nor 'auto'")
        ranged = ("unknown_clip", "reject") + tuple(
            name for name in ("pseudo_scale", "unknown_weight") if getattr(self, name) != "auto")
        for name in ranged:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"normalize: {self.normalize!r} is not one of {NORMALIZE}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction: {self.reduction!r} is not one of {REDUCTIONS}")
        if self.unknown_gamma_pos < 0 or self.unknown_gamma_neg < 0:
            raise ValueError("unknown_gamma_pos and unknown_gamma_neg must be >= 0")


# The paper's loss with our readings of its open points (docs/method.md#pml), pml's
# defaults before issue 9 changed them.
PAPER_OPTIONS = {"q": 0.5, "alpha_beta": True, "d": True, "p": True, "pseudo_scale": 1.0, "reject": 0.0,
                 "reduction": "parts", "unknown_weight": 1.0, "ab_scope": "known", "normalize": "none"}


def pml_loss(
    logits_BC: torch.Tensor,
    targets_BC: torch.Tensor,
    known_BC: torch.Tensor,
    *,
    pseudo_BC: torch.Tensor | None = None,
    sampled_BC: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    stats: dict | None = None,
    **options: object,
) -> torch.Tensor:
    """Partial multi-label loss with pseudo labels (paper eq. 12; docs/method.md#pml).

    The paper's form (``reduction="parts"``, targets ytilde, w = 1); the general form the
    options select, and the default it reduces to, are written out in docs/method.md#pml.
    Per image i, with E_i its known entries, S_i a uniform subset of ceil(q |U_i|) unknown
    entries, ytilde the (detached) pseudo labels::

        pos_i = (1/|E_i|) sum_E y log s(x)      + (d/|S_i|) sum_S ytilde log s(x)
        neg_i = (1/|E_i|) sum_E (1-y) log(1-s(x)) + (d/|S_i|) sum_S (1-ytilde) log(1-s(x))
        ab_scope="all"   (printed eq., our default):   L_i = -p_i (alpha pos_i + beta neg_i)
        ab_scope="known" (the stabilised form):       alpha/beta weight only the known
                          part, the pseudo part is weighted by d alone

    beta = max(P/T, gamma), alpha = 1 - beta, with P = observed positives in the batch (plus
    the pseudo-label mass of S when ``beta_counts_pseudo``) and T = entries entering the loss
    (sum |E_i| + w sum |S_i|, w the ``unknown_weight``), summed over DDP ranks.
    p_i = 2 if every sigmoid(x_ij) < 0.1 else 1.
    Switches ``alpha_beta``, ``d``, ``p`` off set those factors to 1; ``q=1`` keeps all of U_i.
    ``options`` are the fields of :class:`PmlOptions`, which also lists our options for the
    unknown part. Reduction: mean over the images of the batch. Empty E_i or S_i contribute 0.
    Source: the research paper, with the readings of docs/method.md#pml.
    """
    opts = PmlOptions(**options)
    logp, logn = log_probs(logits_BC)
    known = known_BC.bool()
    y = targets_BC.float()
    if sampled_BC is None:
        sampled_BC = sample_unknown(~known, opts.q, generator)
    known_terms = dict(pos_known=(y * logp * known).sum(1), neg_known=((1 - y) * logn * known).sum(1),
                       num_known=known.sum(1).float(), pos_count=(y * known).sum(1))
    return _finish(known_terms, logits_BC.float(), sampled_BC & ~known, pseudo_BC, opts, stats)


def pml_loss_sparse(
    logits_BC: torch.Tensor,
    pos_BP: torch.Tensor,
    neg_BN: torch.Tensor,
    *,
    pseudo_BC: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    stats: dict | None = None,
    **options: object,
) -> torch.Tensor:
    """:func:`pml_loss` from padded class-id lists (-1 = padding), as batches carry them.

    The known part is gathered at the listed ids; log-sigmoids are computed only there and
    at the sampled unknown entries: O(entries), not O(B x C). Same formula, same sampling
    draw as the dense form for the same generator state (tested).
    """
    opts = PmlOptions(**options)
    x = logits_BC.float()
    batch, num_classes = x.shape
    pos_valid, neg_valid = pos_BP >= 0, neg_BN >= 0
    pos_ids, neg_ids = pos_BP.clamp(min=0).long(), neg_BN.clamp(min=0).long()
    known = torch.zeros(batch, num_classes + 1, dtype=torch.bool, device=x.device)
    known.scatter_(1, torch.where(pos_valid, pos_ids, num_classes), True)
    known.scatter_(1, torch.where(neg_valid, neg_ids, num_classes), True)
    sampled = sample_unknown(~known[:, :num_classes], opts.q, generator)
    known_terms = dict(pos_known=(F.logsigmoid(x.gather(1, pos_ids)) * pos_valid).sum(1),
                       neg_known=(F.logsigmoid(-x.gather(1, neg_ids)) * neg_valid).sum(1),
                       num_known=(pos_valid.sum(1) + neg_valid.sum(1)).float(),
                       pos_count=pos_valid.sum(1).float())
    return _finish(known_terms, x, sampled, pseudo_BC, opts, stats)


def _finish(known_terms: dict, x: torch.Tensor, sampled_BC: torch.Tensor, pseudo_BC: torch.Tensor | None,
            opts: PmlOptions, stats: dict | None) -> torch.Tensor:
    """The unknown part from the sampled entries as an (image, class) list, then eq. 12."""
    batch = x.shape[0]
    rows_E, cols_E = sampled_BC.nonzero(as_tuple=True)
    x_E = x[rows_E, cols_E]
    yt_E = (torch.full_like(x_E, 0.5) if pseudo_BC is None  # targets: never a gradient path
            else pseudo_BC.detach().float()[rows_E, cols_E])
    observed_share = float(known_terms["pos_count"].sum() / known_terms["num_known"].sum().clamp(min=1.0))
    scale = observed_share if opts.pseudo_scale == "auto" else float(opts.pseudo_scale)
    weight = (float(opts.unknown_weight) if opts.unknown_weight != "auto"
              else (1.0 - observed_share) + observed_share / max(x.shape[1] - 1, 1))
    if stats is not None:
        stats.update(pseudo_scale=scale, unknown_weight=weight)
    pos_E, neg_E, target_E, kept_E = _unknown_entry_terms(x_E, yt_E, scale, observed_share, opts)
    zeros_B = torch.zeros(batch, device=x.device, dtype=x.dtype)
    # Only normalize="weights" needs the kept entries' targets and counts: not on every step.
    kept = ({} if opts.normalize != "weights" else
            dict(target_kept=zeros_B.index_add(0, rows_E, (target_E * kept_E).detach()),
                 num_kept=zeros_B.index_add(0, rows_E, kept_E)))
    terms = _Terms(**known_terms,
                   pos_unk=zeros_B.index_add(0, rows_E, pos_E), neg_unk=zeros_B.index_add(0, rows_E, neg_E),
                   num_sampled=torch.bincount(rows_E, minlength=batch).float(), pseudo_mass=yt_E.sum(),
                   unknown_weight=weight, **kept)
    return _combine(terms, x, opts, stats)


def _unknown_entry_terms(x_E: torch.Tensor, yt_E: torch.Tensor, scale: float, observed_share: float,
                         o: PmlOptions) -> tuple[torch.Tensor, ...]:
    """Per sampled unknown entry: t log s(x) and (1 - t) log(1 - s(x)) for targets t,
    with ASL focusing / clipping and LL-R rejection when those options are on; also the
    targets t and which entries LL-R kept (1.0) or rejected (0.0)."""
    t_E = scale * yt_E
    logp_E, logn_E = F.logsigmoid(x_E), F.logsigmoid(-x_E)
    if o.unknown_clip > 0:
        one_minus_pm = (logn_E.exp() + o.unknown_clip).clamp(max=1.0)
        log_neg_E, pm_E = one_minus_pm.log(), 1.0 - one_minus_pm
    else:
        log_neg_E, pm_E = logn_E, logp_E.exp()
    pos_E = t_E * logp_E
    neg_E = (1 - t_E) * log_neg_E
    if o.unknown_gamma_pos:
        pos_E = pos_E * (1 - logp_E.exp()).pow(o.unknown_gamma_pos)
    if o.unknown_gamma_neg:
        neg_E = neg_E * pm_E.pow(o.unknown_gamma_neg)
    keep = torch.ones_like(x_E)
    k = math.ceil(o.reject * (o.epoch - 1) * (1.0 - observed_share) * x_E.numel() - 1e-9)
    if k > 0:
        # A stable sort: equal losses (saturated logits, targets 0) are rejected in entry
        # order, so which ones go is deterministic.
        keep[torch.sort((pos_E + neg_E).detach(), stable=True).indices[:k]] = 0.0
        pos_E, neg_E = pos_E * keep, neg_E * keep
    return pos_E, neg_E, t_E, keep


@dataclass
class _Terms:
    """Per-image sums (B,) of the four parts of eq. 12 (unknown parts unweighted), the counts
    for beta and for the loss's total weight, and the unknown entries' weight."""

    pos_known: torch.Tensor
    neg_known: torch.Tensor
    num_known: torch.Tensor
    pos_count: torch.Tensor  # observed positives per image
    pos_unk: torch.Tensor
    neg_unk: torch.Tensor
    num_sampled: torch.Tensor
    pseudo_mass: torch.Tensor
    unknown_weight: float
    # normalize="weights" only: per image, the sum of the targets t over the sampled entries
    # LL-R kept, and how many it kept
    target_kept: torch.Tensor | None = None
    num_kept: torch.Tensor | None = None


def _weight_masses(t: _Terms, known_f_B: torch.Tensor, unk_f_B: torch.Tensor,
                   o: PmlOptions) -> tuple[torch.Tensor, ...]:
    """The loss's total weight split by what alpha, beta or neither multiply (it is linear
    in alpha and beta, so the one all-reduce of beta's counts carries it), and the images."""
    pos_mass = known_f_B * t.pos_count
    neg_mass = known_f_B * (t.num_known - t.pos_count)
    unk_pos, unk_neg = unk_f_B * t.target_kept, unk_f_B * (t.num_kept - t.target_kept)
    if o.ab_scope == "all":
        pos_mass, neg_mass, free_mass = pos_mass + unk_pos, neg_mass + unk_neg, pos_mass.new_zeros(())
    else:
        free_mass = (unk_pos + unk_neg).sum()
    # On the batch's device: all_reduce_sum stacks its values (a CPU scalar beside CUDA ones fails).
    return pos_mass.sum(), neg_mass.sum(), free_mass, pos_mass.new_tensor(float(len(pos_mass)))


def _combine(t: _Terms, x: torch.Tensor, o: PmlOptions, stats: dict | None) -> torch.Tensor:
    batch, num_classes = x.shape
    d_val = d_weight(o.epoch, o.num_epochs, o.m, o.d_schedule) if o.d else 1.0
    unk_weight = d_val * t.unknown_weight  # both scale the whole unknown part
    ns = t.num_sampled.clamp(min=1.0)
    # Each known / sampled unknown entry's factor in its image's sum under the reduction.
    if o.reduction == "parts":
        known_f_B, unk_f_B = 1.0 / t.num_known.clamp(min=1.0), unk_weight / ns
    else:
        known_f_B = torch.full_like(ns, 1.0 / num_classes)
        unk_f_B = unk_weight * (num_classes - t.num_known) / (ns * num_classes)
    with torch.no_grad():
        # Batch statistics count each entry by its weight in the loss: an unknown entry at
        # WAN's weight is 1/(C-1) of an entry, so beta balances the same mass it weighs.
        w = t.unknown_weight
        num_pos = t.pos_count.sum() + (w * t.pseudo_mass if o.beta_counts_pseudo else 0.0)
        masses = _weight_masses(t, known_f_B, unk_f_B, o) if o.normalize == "weights" else ()
        num_pos, num_entries, *masses = all_reduce_sum(num_pos, t.num_known.sum() + w * t.num_sampled.sum(),
                                                       *masses)
        share = float(num_pos / num_entries.clamp(min=1.0))
        beta = max(share, o.gamma) if o.alpha_beta else 1.0
        alpha = 1.0 - beta if o.alpha_beta else 1.0
        if o.normalize == "weights":
            pos_mass, neg_mass, free_mass, num_images = masses
            norm = float((alpha * pos_mass + beta * neg_mass + free_mass) / num_images)
        elif o.normalize == "ab" and o.alpha_beta:
            norm = alpha * share + beta * (1.0 - share)
        else:
            norm = 1.0
        # Every sigmoid(x_ij) < 0.1  <=>  max_j x_ij < logit(0.1): one reduction, no exp.
        all_low = x.max(dim=1).values < math.log(0.1 / 0.9)
        p_B = torch.where(all_low & o.p, 2.0, 1.0).to(x.dtype)
    pos_known, neg_known = known_f_B * t.pos_known, known_f_B * t.neg_known
    pos_unk, neg_unk = unk_f_B * t.pos_unk, unk_f_B * t.neg_unk
    if o.ab_scope == "all":
        per_image = alpha * (pos_known + pos_unk) + beta * (neg_known + neg_unk)
    else:
        per_image = alpha * pos_known + beta * neg_known + pos_unk + neg_unk
    loss = -(p_B * per_image).mean() / max(norm, 1e-12)
    if stats is not None:
        with torch.no_grad():
            stats.update(alpha=alpha, beta=beta, d=d_val, p2_share=float((p_B > 1).float().mean()), norm=norm,
                         loss_known=float(-(p_B * (alpha * pos_known + beta * neg_known)).mean()),
                         loss_pseudo=float(-(p_B * (pos_unk + neg_unk)).mean()))
    return loss
