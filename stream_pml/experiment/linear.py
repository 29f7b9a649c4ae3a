"""One grid cell: a linear head on fixed features, one method, one label setting, one seed."""

from __future__ import annotations

import time

import numpy as np
import torch

from ..labels import make_partial, setting_hash
from ..losses import LOSSES, get_loss
from ..losses.pml import PAPER_OPTIONS
from ..metrics import mean_average_precision, mean_average_precision_detail
from .features import FeatureData

# Named forms of pml kept comparable across the project's history
# (docs/decisions.md#experiment-variants): the paper's, its Table VII ablations, the printed one.
VARIANTS = {
    "pml-paper": ("pml", dict(PAPER_OPTIONS)),
    "pml-paper-no_alpha_beta": ("pml", {**PAPER_OPTIONS, "alpha_beta": False}),
    "pml-paper-no_d": ("pml", {**PAPER_OPTIONS, "d": False}),
    "pml-paper-no_p": ("pml", {**PAPER_OPTIONS, "p": False}),
    "pml-paper-q1": ("pml", {**PAPER_OPTIONS, "q": 1.0}),
    "pml-printed": ("pml", {**PAPER_OPTIONS, "ab_scope": "all", "d_schedule": "printed"}),
    # The default with the pseudo labels at the observed positive share (issue 9's study).
    "pml-pseudo": ("pml", {"pseudo_scale": "auto"}),
    # The default before issue 18: the loss not divided by its total weight, so alpha/beta
    # and WAN's weight shrink it and coupled weight decay weighs more against it.
    "pml-unnormalised": ("pml", {"normalize": "none"}),
}


def resolve_method(method: str) -> tuple[str, dict]:
    if method in VARIANTS:
        return VARIANTS[method]
    if method not in LOSSES:
        raise ValueError(f"unknown method {method!r}; losses: {', '.join(LOSSES)}; variants: {', '.join(VARIANTS)}")
    return method, {}


def parse_setting(setting: str) -> tuple[str, float | None]:
    """'fal', 'spl', 'pal0.3', 'ppl0.6' -> (kind, ratio)."""
    for kind in ("pal", "ppl"):
        if setting.startswith(kind):
            return kind, float(setting[len(kind):])
    if setting in ("fal", "spl"):
        return setting, None
    raise ValueError(f"label setting {setting!r}: expected fal, spl, palX or pplX")


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer: {name!r} is not adam or adamw")


def _map(scores: np.ndarray, Y: np.ndarray) -> float:
    return mean_average_precision(scores, Y == 1, Y >= 0)


def train_cell(data: FeatureData, method: str, setting: str, seed: int, *, epochs: int = 20,
               lr: float = 1e-3, batch_size: int = 64, weight_decay: float = 1e-4,
               optimizer: str = "adam", detail: bool = False) -> dict:
    """Train, select the epoch on validation mAP, report that epoch's test mAP.

    ``detail``: also return ``history`` (per epoch: validation mAP, mean pseudo label, and
    for pml the batch means of alpha, beta and the share of p = 2 images) and, at the chosen
    epoch, ``class_ap`` (test AP per class) with ``class_train_freq`` (full-label positives
    per class in the training rows): what explains a cell being won or lost."""
    t0 = time.perf_counter()
    name, extra = resolve_method(method)
    kind, ratio = parse_setting(setting)
    full = data.Y["train"]
    if kind == "fal":
        partial = full.copy()
    else:
        if (full < 0).any():
            raise ValueError(f"setting {setting} needs full training labels; these are partial")
        partial = make_partial(full, kind, ratio)  # fixed seeds: one mask per setting, never redrawn
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    mean, std = data.X["train"].mean(0), data.X["train"].std(0) + 1e-6
    X = {k: torch.from_numpy((v - mean) / std) for k, v in data.X.items()}
    N, D = X["train"].shape
    C = full.shape[1]
    part = torch.from_numpy(partial)
    targets_all, known_all = (part == 1).float(), part >= 0
    hp = dict(extra)
    spec = LOSSES[name]
    if spec.uses_prior:
        hp["expected_positives"] = float((full == 1).sum() / N)
    loss_fn = get_loss(name, **hp)
    head = torch.nn.Linear(D, C)
    params = list(head.parameters())
    estimator = None
    if spec.uses_estimator:
        from ..losses.role_estimator import LabelEstimator

        estimator = LabelEstimator(partial, seed=seed)
        params += list(estimator.parameters())
    opt = make_optimizer(optimizer, params, lr, weight_decay)
    pseudo = torch.full((N, C), 0.5)
    best = {"val_map": -1.0}
    history = []
    for epoch in range(1, epochs + 1):
        head.train()
        order = torch.randperm(N, generator=gen)
        epoch_stats: dict[str, list] = {}
        for i in range(0, N, batch_size):
            rows = order[i:i + batch_size]
            logits = head(X["train"][rows])
            kw = {"generator": gen}
            if estimator is not None:
                kw["estimates_BC"] = estimator(rows)
            step_stats: dict = {}
            if detail and name == "pml":
                kw["stats"] = step_stats
            loss = loss_fn(logits, targets_all[rows], known_all[rows], pseudo=pseudo[rows],
                           epoch=epoch, num_epochs=epochs, **kw)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if loss_fn.uses_pseudo:
                pseudo[rows] = torch.sigmoid(logits.detach())
            for key in ("alpha", "beta", "p2_share"):
                if key in step_stats:
                    epoch_stats.setdefault(key, []).append(step_stats[key])
        head.eval()
        with torch.no_grad():
            val = _map(torch.sigmoid(head(X["val"])).numpy(), data.Y["val"])
            history.append({"epoch": epoch, "val_map": val, "pseudo_mean": float(pseudo.mean()),
                            **{k: float(np.mean(v)) for k, v in epoch_stats.items()}})
            if val > best["val_map"]:  # test is scored only for the epoch validation picks
                Y_test = data.Y["test"]
                result = mean_average_precision_detail(torch.sigmoid(head(X["test"])).numpy(),
                                                       Y_test == 1, Y_test >= 0)
                best = {"val_map": val, "test_map": result.map, "best_epoch": epoch}
                class_ap = result.per_class_ap
    out = {"method": method, "setting": setting, "seed": seed, **best,
           "setting_hash": setting_hash(partial), "seconds": time.perf_counter() - t0,
           "final_pseudo_mean": history[-1]["pseudo_mean"]}
    if detail:
        out.update(history=history, class_ap=class_ap, class_train_freq=(full == 1).sum(0))
    return out
