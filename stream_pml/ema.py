"""An exponential moving average of the model's weights, evaluated and saved instead of them.

The last epochs of a run move the weights around a minimum by the noise of the batches; which
point a run stops at depends on its seed and on the order of float sums (thread counts). The
average over the last few hundred steps is a better and much steadier model (Polyak
averaging; timm's ``ModelEmaV2`` in image classification). Every floating-point tensor of the
state (parameters and BatchNorm statistics) is averaged; integer buffers are copied. Early in
the run the decay is capped at ``(1 + n) / (10 + n)`` after ``n`` updates, so the average
does not keep the random initial weights for hundreds of steps.

Under DDP every rank holds the same weights after each step, so every rank's average is the
same and the state is saved once, like the model's.
"""

from __future__ import annotations

import copy

import torch


class WeightAverage:
    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1) (0 = off), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        mine, theirs = self.module.state_dict(), model.state_dict()
        floats = [k for k, v in mine.items() if v.is_floating_point()]
        torch._foreach_lerp_([mine[k] for k in floats], [theirs[k].detach() for k in floats], 1.0 - decay)
        for k, v in mine.items():
            if not v.is_floating_point():
                v.copy_(theirs[k])

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]
