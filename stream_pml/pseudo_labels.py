"""Pseudo labels of unknown entries (paper eq. 5): 0.5 at first, then the model's last output.

This is the in-memory table; rows are global row ids. Under DDP each rank's writes are
all-gathered so every rank's copy stays identical (rows move between ranks across epochs).
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class PseudoConfig:
    init: float = 0.5
    # new = momentum * old + (1 - momentum) * prediction; 0 = plain replacement (paper).
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.init <= 1.0:
            raise ValueError(f"pseudo.init must be in [0, 1], got {self.init}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"pseudo.momentum must be in [0, 1), got {self.momentum}")


class InMemoryPseudoLabels:
    def __init__(self, num_rows: int, num_classes: int, cfg: PseudoConfig):
        self.cfg = cfg
        self.table_NC = torch.full((num_rows, num_classes), cfg.init, dtype=torch.float32)

    def read(self, rows_B: torch.Tensor) -> torch.Tensor:
        return self.table_NC[rows_B.cpu()]

    def write(self, rows_B: torch.Tensor, probs_BC: torch.Tensor) -> None:
        rows = rows_B.detach()
        probs = probs_BC.detach().float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            all_rows = [torch.empty_like(rows) for _ in range(world)]
            all_probs = [torch.empty_like(probs) for _ in range(world)]
            dist.all_gather(all_rows, rows)
            dist.all_gather(all_probs, probs)
            rows, probs = torch.cat(all_rows), torch.cat(all_probs)
        rows, probs = rows.cpu(), probs.cpu()
        if self.cfg.momentum > 0:
            probs = self.cfg.momentum * self.table_NC[rows] + (1 - self.cfg.momentum) * probs
        self.table_NC[rows] = probs

    def state_dict(self) -> dict:
        return {"table_NC": self.table_NC.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["table_NC"].shape != self.table_NC.shape:
            raise ValueError(f"pseudo-label table shape {tuple(state['table_NC'].shape)} does not match "
                             f"this run's {tuple(self.table_NC.shape)}")
        self.table_NC.copy_(state["table_NC"])
