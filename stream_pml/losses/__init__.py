"""Losses: the paper's ``pml`` and the baselines, behind one registry.

``get_loss(name, **hparams)`` returns ``fn(logits, targets, known, *, pseudo=None, epoch=1,
num_epochs=1) -> scalar``; unknown hyper-parameter names are refused with the known ones.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict

import torch

from .baselines import (
    an_loss,
    asl_loss,
    bce_loss,
    epr_loss,
    focal_loss,
    hill_loss,
    large_loss,
    role_loss,
    splc_loss,
    wan_loss,
)
from .pml import PmlOptions, pml_loss, pml_loss_sparse


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[..., torch.Tensor]
    defaults: dict
    uses_pseudo: bool = False
    # Same loss from padded id lists (docs/design.md#sparse-loss), where one exists.
    sparse_fn: Callable[..., torch.Tensor] | None = None
    # Needs the expected positives per image (from the manifest when not given).
    uses_prior: bool = False
    uses_estimator: bool = False
    uses_epoch: bool = False
    # Keyword options collected in a dataclass (fn takes **options): its fields are the names.
    options: type | None = None


LOSSES: dict[str, LossSpec] = {
    "pml": LossSpec(pml_loss, {}, uses_pseudo=True, sparse_fn=pml_loss_sparse, uses_epoch=True,
                    options=PmlOptions),
    "bce": LossSpec(bce_loss, {}),
    "bce_ls": LossSpec(bce_loss, {"label_smoothing": 0.1}),
    "focal": LossSpec(focal_loss, {}),
    "asl": LossSpec(asl_loss, {}),
    "an": LossSpec(an_loss, {}),
    "an_ls": LossSpec(an_loss, {"label_smoothing": 0.1}),
    "wan": LossSpec(wan_loss, {}),
    "epr": LossSpec(epr_loss, {}, uses_prior=True),
    "role": LossSpec(role_loss, {}, uses_prior=True, uses_estimator=True),
    # Ignore unknown: BCE over the observed entries only (identical to bce under FAL).
    "iun": LossSpec(bce_loss, {}),
    "hill": LossSpec(hill_loss, {}),
    "splc": LossSpec(splc_loss, {}, uses_epoch=True),
    "ll_r": LossSpec(large_loss, {"mode": "reject", "delta_rel": 0.002}, uses_epoch=True),
    "ll_ct": LossSpec(large_loss, {"mode": "correct", "delta_rel": 0.001}, uses_epoch=True),
}

_CALL_ARGS = {"logits_BC", "targets_BC", "known_BC", "pseudo_BC", "epoch", "num_epochs",
              "generator", "stats", "sampled_BC", "estimates_BC"}


def _keyword_hparams(fn: Callable[..., torch.Tensor]) -> dict[str, inspect.Parameter]:
    """A loss function's hyper-parameters: its keyword-only parameters a call does not fill."""
    return {p: v for p, v in inspect.signature(fn).parameters.items()
            if v.kind == v.KEYWORD_ONLY and p not in _CALL_ARGS}


def hparam_names(name: str) -> list[str]:
    spec = LOSSES[name]
    if spec.options is not None:
        return [f.name for f in dataclasses.fields(spec.options) if f.name not in _CALL_ARGS]
    return list(_keyword_hparams(spec.fn))


class BoundLoss:
    """A loss with its hyper-parameters bound; called as the public API describes."""

    def __init__(self, name: str, hparams: dict):
        self.name = name
        self.spec = LOSSES[name]
        self.hparams = {**self.spec.defaults, **hparams}

    @property
    def uses_pseudo(self) -> bool:
        return self.spec.uses_pseudo

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor, *,
                 pseudo: torch.Tensor | None = None, epoch: int = 1, num_epochs: int = 1,
                 **extra: Any) -> torch.Tensor:
        return self.spec.fn(logits, targets, known, **self._kwargs(pseudo, epoch, num_epochs, extra))

    @property
    def has_sparse(self) -> bool:
        return self.spec.sparse_fn is not None

    def sparse(self, logits: torch.Tensor, pos_ids: torch.Tensor, neg_ids: torch.Tensor, *,
               pseudo: torch.Tensor | None = None, epoch: int = 1, num_epochs: int = 1,
               **extra: Any) -> torch.Tensor:
        """The loss from padded (-1) positive / negative class-id lists of each image."""
        if self.spec.sparse_fn is None:
            raise TypeError(f"loss {self.name!r} has no sparse form")
        return self.spec.sparse_fn(logits, pos_ids, neg_ids, **self._kwargs(pseudo, epoch, num_epochs, extra))

    def _kwargs(self, pseudo, epoch: int, num_epochs: int, extra: dict) -> dict:
        kwargs = dict(self.hparams, **extra)
        if self.spec.uses_pseudo:
            kwargs.update(pseudo_BC=pseudo, num_epochs=num_epochs)
        if self.spec.uses_epoch:
            kwargs.update(epoch=epoch)
        return kwargs

    def resolved(self) -> dict:
        """Every hyper-parameter with the value this loss runs with, defaults included: what
        a result depends on (a changed default changes it)."""
        if self.spec.options is not None:
            opts = dataclasses.asdict(self.spec.options(**self.hparams))
            return {k: opts[k] for k in hparam_names(self.name)}
        defaults = {p: v.default for p, v in _keyword_hparams(self.spec.fn).items() if v.default is not v.empty}
        return {**defaults, **self.hparams}

    def __repr__(self) -> str:
        return f"BoundLoss({self.name!r}, {self.hparams})"


def get_loss(name: str, **hparams: Any) -> BoundLoss:
    if name not in LOSSES:
        raise ValueError(f"loss.name: unknown loss {name!r}; known: {', '.join(LOSSES)}")
    allowed = hparam_names(name)
    for key in hparams:
        if key not in allowed:
            raise ValueError(f"loss.params.{key}: not a hyper-parameter of loss {name!r}; "
                             f"known: {', '.join(allowed) or 'none'}")
    if LOSSES[name].options is not None:  # range checks now, not at the first step
        try:
            LOSSES[name].options(**{**LOSSES[name].defaults, **hparams})
        except ValueError as exc:
            raise ValueError(f"loss.params: {exc}") from exc
    return BoundLoss(name, hparams)


@dataclass
class LossConfig:
    name: str = "pml"
    # Hyper-parameters of that loss (see its docstring); unknown names are refused.
    params: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        get_loss(self.name, **dict(self.params))


__all__ = ["LOSSES", "LossConfig", "get_loss", "BoundLoss", "hparam_names"]
