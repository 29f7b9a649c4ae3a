"""Naive references written from each loss's formula: Python loops over entries, float64.

Deliberately independent of stream_pml.losses (no shared helpers), so a mistake in a
vectorised implementation cannot hide in its reference.
"""

from __future__ import annotations

import math


def ls(x: float) -> float:
    """log sigmoid(x), stable."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return math.exp(ls(x))


def _entries(logits, targets, known):
    B, C = len(logits), len(logits[0])
    for i in range(B):
        for j in range(C):
            yield i, j, float(logits[i][j]), float(targets[i][j]), bool(known[i][j])


def bce(logits, targets, known, label_smoothing=0.0):
    total, n = 0.0, 0
    for _, _, x, y, k in _entries(logits, targets, known):
        if k:
            y = y * (1 - label_smoothing) + label_smoothing / 2
            total += -(y * ls(x) + (1 - y) * ls(-x))
            n += 1
    return total / max(n, 1)


def an(logits, targets, known, label_smoothing=0.0):
    total, n = 0.0, 0
    for _, _, x, y, k in _entries(logits, targets, known):
        z = y if k else 0.0
        z = z * (1 - label_smoothing) + label_smoothing / 2
        total += -(z * ls(x) + (1 - z) * ls(-x))
        n += 1
    return total / n


def wan(logits, targets, known):
    C = len(logits[0])
    w = 1.0 / (C - 1)
    total, n = 0.0, 0
    for _, _, x, y, k in _entries(logits, targets, known):
        if k and y == 1:
            total += -ls(x)
        elif k:
            total += -ls(-x)
        else:
            total += -w * ls(-x)
        n += 1
    return total / n


def asl(logits, targets, known, gamma_pos=0.0, gamma_neg=4.0, clip=0.05):
    total, n = 0.0, 0
    for _, _, x, y, k in _entries(logits, targets, known):
        p = sig(x)
        if k and y == 1:
            total += -((1 - p) ** gamma_pos) * ls(x)
        else:
            pm = max(p - clip, 0.0)
            one_minus = min(sig(-x) + clip, 1.0)
            total += -(pm ** gamma_neg) * math.log(one_minus)
        n += 1
    return total / n


def focal(logits, targets, known, gamma=2.0):
    total, n = 0.0, 0
    for _, _, x, y, k in _entries(logits, targets, known):
        p = sig(x)
        if k and y == 1:
            total += -((1 - p) ** gamma) * ls(x)
        else:
            total += -(p ** gamma) * ls(-x)
        n += 1
    return total / n


def epr(logits, targets, known, k_exp):
    B, C = len(logits), len(logits[0])
    obs = 0.0
    for _, _, x, y, k in _entries(logits, targets, known):
        if k:
            obs += -(y * ls(x) + (1 - y) * ls(-x))
    mean_count = sum(sig(float(logits[i][j])) for i in range(B) for j in range(C)) / B
    return obs / (B * C) + (mean_count - k_exp) ** 2 / C**2


def role(logits, targets, known, estimates, k_exp):
    B, C = len(logits), len(logits[0])
    cross = 0.0
    for i in range(B):
        for j in range(C):
            f, g = sig(float(logits[i][j])), sig(float(estimates[i][j]))
            x, e = float(logits[i][j]), float(estimates[i][j])
            cross += -(g * ls(x) + (1 - g) * ls(-x)) - (f * ls(e) + (1 - f) * ls(-e))
    return 0.5 * (epr(logits, targets, known, k_exp) + epr(estimates, targets, known, k_exp)) + 0.5 * cross / (B * C)


def hill(logits, targets, known, lamb=1.5, margin=1.0, gamma=2.0):
    total, n = 0.0, 0
    for _, _, x, y, k in _entries(logits, targets, known):
        if k and y == 1:
            pm = sig(x - margin)
            total += -((1 - pm) ** gamma) * ls(x - margin)
        else:
            p = sig(x)
            total += (lamb - p) * p * p
        n += 1
    return total / n


def splc(logits, targets, known, epoch, tau=0.6, change_epoch=1, margin=1.0, gamma=2.0):
    total, n = 0.0, 0
    for _, _, x, y, k in _entries(logits, targets, known):
        z = y if k else 0.0
        if z == 1:
            x = x - margin
        p = sig(x)
        if epoch > change_epoch and not k and p > tau:
            z = 1.0
        pt = (1 - p) if z == 1 else p
        total += -(z * ls(x) + (1 - z) * ls(-x)) * pt**gamma
        n += 1
    return total / n


def large_loss(logits, targets, known, epoch, delta_rel, mode):
    B, C = len(logits), len(logits[0])
    entries = list(_entries(logits, targets, known))
    losses = {}
    for i, j, x, y, k in entries:
        z = y if k else 0.0
        losses[(i, j)] = -(z * ls(x) + (1 - z) * ls(-x))
    num = math.ceil(B * C * delta_rel * (epoch - 1))
    unknown = sorted(((losses[(i, j)], (i, j)) for i, j, _, _, k in entries if not k), reverse=True)
    for _, ij in unknown[:num]:
        x = float(logits[ij[0]][ij[1]])
        losses[ij] = 0.0 if mode == "reject" else -ls(x)
    return sum(losses.values()) / (B * C)


def pml(logits, targets, known, pseudo, sampled, *, epoch, num_epochs, gamma=0.05, m=3.0,
        alpha_beta=True, d=False, p=False, d_schedule="text", ab_scope="all",
        beta_counts_pseudo=False, pseudo_scale=0.0, unknown_gamma_pos=0.0, unknown_gamma_neg=0.0,
        unknown_clip=0.0, reject=0.002, reduction="entries", unknown_weight="auto", normalize="ab", q=None):
    """Eq. 12 with the decisions of docs/method.md#pml, entry by entry. ``sampled`` is S (given)."""
    B, C = len(logits), len(logits[0])
    P = sum(1 for i in range(B) for j in range(C) if known[i][j] and targets[i][j] == 1)
    observed_pos = P
    observed_share = observed_pos / max(1, sum(1 for i in range(B) for j in range(C) if known[i][j]))
    if pseudo_scale == "auto":  # observed positives / observed entries of the batch
        pseudo_scale = observed_share
    if unknown_weight == "auto":  # 1 where negatives are observed, WAN's 1/(C-1) where none are
        unknown_weight = (1 - observed_share) + observed_share / (C - 1)
    # T: known entries count 1, sampled unknown entries count their weight in the loss
    T = sum(1 if known[i][j] else unknown_weight for i in range(B) for j in range(C) if known[i][j] or sampled[i][j])
    if beta_counts_pseudo:
        P += unknown_weight * sum(float(pseudo[i][j]) for i in range(B) for j in range(C)
                                  if sampled[i][j] and not known[i][j])
    beta = max(P / T, gamma) if alpha_beta else 1.0
    alpha = 1 - beta if alpha_beta else 1.0
    # normalize="ab": divide by the mean weight alpha/beta give an entry (P/T positives)
    norm = alpha * (P / T) + beta * (1 - P / T) if alpha_beta and normalize == "ab" else 1.0
    if not d:
        dv = 1.0
    elif d_schedule == "text":
        dv = math.exp((epoch + m - num_epochs) / num_epochs)
    else:
        dv = math.exp((epoch + m) / num_epochs)

    def unknown_terms(x, yt):  # (positive, negative) term of one sampled unknown entry
        t, s = pseudo_scale * float(yt), sig(x)
        s_m = max(s - unknown_clip, 0.0)
        neg = (1 - t) * (math.log(1 - s_m) if unknown_clip > 0 else ls(-x)) * s_m ** unknown_gamma_neg
        return unknown_weight * t * ls(x) * (1 - s) ** unknown_gamma_pos, unknown_weight * neg

    entries = [(i, j) for i in range(B) for j in range(C) if sampled[i][j] and not known[i][j]]
    losses = {e: -sum(unknown_terms(float(logits[e[0]][e[1]]), pseudo[e[0]][e[1]])) for e in entries}
    num_rejected = math.ceil(reject * (epoch - 1) * (1 - observed_share) * len(entries) - 1e-9)
    rejected = set(sorted(entries, key=lambda e: -losses[e])[:num_rejected])
    total, weight_total = 0.0, 0.0
    for i in range(B):
        xs = [float(v) for v in logits[i]]
        E = [j for j in range(C) if known[i][j]]
        S = [j for j in range(C) if sampled[i][j] and not known[i][j]]
        U = [unknown_terms(xs[j], pseudo[i][j]) if (i, j) not in rejected else (0.0, 0.0) for j in S]
        pi = 2.0 if (p and all(sig(x) < 0.1 for x in xs)) else 1.0
        # "parts": the two means of eq. 12; "entries": one mean over the C entries, the
        # sampled sum standing for all C - |E| unknown entries.
        known_div = (len(E) or 1) if reduction == "parts" else C
        unk_div = (len(S) or 1) if reduction == "parts" or not S else len(S) * C / (C - len(E))
        pk = sum(float(targets[i][j]) * ls(xs[j]) for j in E) / known_div
        nk = sum((1 - float(targets[i][j])) * ls(-xs[j]) for j in E) / known_div
        pu = dv * sum(u[0] for u in U) / unk_div if S else 0.0
        nu = dv * sum(u[1] for u in U) / unk_div if S else 0.0
        if ab_scope == "all":
            total += -pi * (alpha * (pk + pu) + beta * (nk + nu))
        else:
            total += -pi * (alpha * pk + beta * nk + pu + nu)
        # normalize="weights": the weight each entry entering the loss gets, entry by entry
        # (a rejected entry enters with weight 0; p is left out)
        weight_total += sum((alpha if float(targets[i][j]) == 1 else beta) / known_div for j in E)
        for j in S:
            if (i, j) in rejected:
                continue
            t = pseudo_scale * float(pseudo[i][j])
            ab = alpha * t + beta * (1 - t) if ab_scope == "all" else 1.0
            weight_total += dv * unknown_weight * ab / unk_div
    if normalize == "weights":
        norm = weight_total / B
    return total / B / norm
