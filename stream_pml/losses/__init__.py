"""Losses: the paper's ``pml`` and the baselines, behind one registry.

``get_loss(name, **hparams)`` returns ``fn(logits, targets, known, *, pseudo=None, epoch=1,
num_epochs=1) -> scalar``; unknown hyper-parameter names are refused with the known ones.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict

import torch

from .baselines import an_loss, bce_loss
from .pml import pml_loss


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[..., torch.Tensor]
    defaults: dict
    uses_pseudo: bool = False


LOSSES: dict[str, LossSpec] = {
    "pml": LossSpec(pml_loss, {}, uses_pseudo=True),
    "bce": LossSpec(bce_loss, {}),
    "bce_ls": LossSpec(bce_loss, {"label_smoothing": 0.1}),
    "an": LossSpec(an_loss, {}),
    "an_ls": LossSpec(an_loss, {"label_smoothing": 0.1}),
    "iun": LossSpec(bce_loss, {}),
}

_CALL_ARGS = {"logits_BC", "targets_BC", "known_BC", "pseudo_BC", "epoch", "num_epochs",
              "generator", "stats", "sampled_BC"}


def hparam_names(name: str) -> list[str]:
    sig = inspect.signature(LOSSES[name].fn)
    return [p for p, v in sig.parameters.items()
            if v.kind == v.KEYWORD_ONLY and p not in _CALL_ARGS]


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
        kwargs = dict(self.hparams, **extra)
        if self.spec.uses_pseudo:
            kwargs.update(pseudo_BC=pseudo, epoch=epoch, num_epochs=num_epochs)
        return self.spec.fn(logits, targets, known, **kwargs)

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
    return BoundLoss(name, hparams)


@dataclass
class LossConfig:
    name: str = "pml"
    # Hyper-parameters of that loss (see its docstring); unknown names are refused.
    params: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        get_loss(self.name, **dict(self.params))


__all__ = ["LOSSES", "LossConfig", "get_loss", "BoundLoss", "hparam_names"]
