"""Optimizer and learning-rate schedule.

The paper says only that the learning rate changes continuously; Adam with lr 1e-4, weight
decay 1e-4 and OneCycle is our choice (docs/method.md#optimiser), as in ASL/ML-Decoder training recipes.
"""

import warnings
from dataclasses import dataclass

import torch

SCHEDULES = ("onecycle", "constant")
OPTIMIZERS = ("adam", "adamw")


@dataclass
class OptimConfig:
    # adam: weight decay added to the gradient (coupled L2; its strength relative to the loss
    # depends on the loss's scale, which pml's alpha/beta shrink); adamw: decoupled decay,
    # the same shrink per step whatever the loss (BENCHMARKS.md "Optimizer").
    name: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 1e-4
    schedule: str = "onecycle"
    pct_start: float = 0.2

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name: {self.name!r} is not one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule: {self.schedule!r} is not one of {SCHEDULES}")
        if not 0.0 < self.pct_start < 1.0:
            raise ValueError(f"optim.pct_start must be in (0, 1), got {self.pct_start}")


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    kind = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class ProgressSchedule:
    """The learning rate (and OneCycle's momentum) as a function of training progress in
    [0, 1], not of the step count: a resume on another number of processes changes the
    steps per epoch, and an extended run changes the total, yet the schedule continues from
    where the run is. OneCycle's closed form is evaluated at ``progress x RESOLUTION`` ticks."""

    RESOLUTION = 1_000_000

    def __init__(self, opt: torch.optim.Optimizer, cfg: OptimConfig):
        self.progress = 0.0
        self.inner = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=self.RESOLUTION + 1,
                                                          pct_start=cfg.pct_start)
                      if cfg.schedule == "onecycle" else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))

    def set_progress(self, progress: float) -> None:
        self.progress = min(max(float(progress), 0.0), 1.0)
        # The schedulers compute the value for ``last_epoch + 1`` in closed form.
        self.inner.last_epoch = round(self.progress * self.RESOLUTION) - 1
        with warnings.catch_warnings():  # "step() before optimizer.step()": set, not stepped
            warnings.simplefilter("ignore", UserWarning)
            self.inner.step()

    def get_last_lr(self) -> list[float]:
        return self.inner.get_last_lr()

    def state_dict(self) -> dict:
        return {"progress": self.progress}

    def load_state_dict(self, state: dict) -> None:
        self.set_progress(state["progress"])


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig) -> ProgressSchedule:
    return ProgressSchedule(opt, cfg)
