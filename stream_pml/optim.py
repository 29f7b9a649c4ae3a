"""Optimizer and learning-rate schedule.

The paper says only that the learning rate changes continuously; Adam with lr 1e-4, weight
decay 1e-4 and OneCycle is our choice (METHOD.md), as in ASL/ML-Decoder training recipes.
"""

from dataclasses import dataclass

import torch

SCHEDULES = ("onecycle", "constant")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-4
    schedule: str = "onecycle"
    pct_start: float = 0.2

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule: {self.schedule!r} is not one of {SCHEDULES}")
        if not 0.0 < self.pct_start < 1.0:
            raise ValueError(f"optim.pct_start must be in (0, 1), got {self.pct_start}")


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(total_steps, 1),
                                                   pct_start=cfg.pct_start)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
