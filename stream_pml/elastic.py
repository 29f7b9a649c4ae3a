"""The epoch's plan across a change of world size (docs/design.md#a-change-of-world-size).

An epoch is normally the ordinary deal of :mod:`.data.deal` for the run's world size. When a
run resumes mid-epoch on another number of processes, the rest of that epoch is what no old
rank has trained yet: every old rank saved the rows it trained this epoch
(:class:`TrainedRows`, in its ``rank{r}.pt``), so each new rank computes the same rest and
deals it by whole pieces (:func:`~.data.deal.deal_rows`), one writer per store chunk as
always. That *tail* is shared state (:class:`EpochPlan`, saved in ``trainer.pt``), so a tail
interrupted at the same world size resumes bitwise, and one interrupted on yet another world
size is re-dealt the same way. From the next epoch on, the ordinary deal applies.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .data.deal import DealError, EpochDeal, deal_rows
from .data.loader import ShardLoader

if TYPE_CHECKING:
    from .trainer import Trainer


class TrainedRows:
    """Per rank: the rows this rank trained in the current plan of the epoch."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self.old: list[np.ndarray] | None = None  # every old rank's rows, after a reshape

    def add(self, rows_B: torch.Tensor) -> None:
        self._parts.append(np.asarray(rows_B.cpu(), dtype=np.int64))

    def clear(self) -> None:
        self._parts = []

    def rows(self) -> np.ndarray:
        return np.concatenate(self._parts) if self._parts else np.zeros(0, dtype=np.int64)

    def state_dict(self) -> dict:
        return {"rows": self.rows()}

    def load_state_dict(self, state: dict) -> None:
        self._parts, self.old = [np.asarray(state["rows"], dtype=np.int64)], None

    def load_resharded(self, states: list[dict]) -> None:
        """The states of every rank of another world size: kept for :meth:`EpochPlan.reshape`."""
        self._parts, self.old = [], [np.asarray(s["rows"], dtype=np.int64) for s in states]


class EpochPlan:
    """Shared: which deal the epoch in progress follows (the ordinary one, or a tail)."""

    def __init__(self, loader: ShardLoader):
        self.loader = loader
        # {"epoch", "generation" (tails so far in that epoch), "base" (share of the epoch's
        # samples trained before the tail), "rows" (per rank)}
        self.tail: dict | None = None

    def has_tail(self, epoch: int) -> bool:
        return self._tail_for(epoch) is not None

    def _tail_for(self, epoch: int) -> dict | None:
        return self.tail if self.tail is not None and self.tail["epoch"] == epoch else None

    def deal(self, epoch: int) -> EpochDeal:
        tail = self._tail_for(epoch)
        if tail is None:
            return self.loader.deal(epoch)
        loader = self.loader
        if len(tail["rows"]) != loader.world_size:
            raise RuntimeError(f"epoch {epoch}'s tail was dealt to {len(tail['rows'])} ranks, this run has "
                               f"{loader.world_size} (a resume on another world size re-deals it first)")
        return EpochDeal(loader.train_split.num_samples, loader.piece_rows, loader.cfg.batch_size,
                         tuple(np.unique(r // loader.piece_rows) for r in tail["rows"]), tuple(tail["rows"]))

    def generation(self, epoch: int) -> int:
        tail = self._tail_for(epoch)
        return 0 if tail is None else tail["generation"]

    def progress(self, epoch: int, batch_in_epoch: int, num_epochs: int) -> float:
        """Share of the run trained: what the learning-rate schedule follows."""
        tail = self._tail_for(epoch)
        base = 0.0 if tail is None else tail["base"]
        done = base + (1.0 - base) * batch_in_epoch / max(1, self.deal(epoch).num_batches)
        return (epoch - 1 + done) / num_epochs

    def epoch_done(self, epoch: int) -> None:
        if self._tail_for(epoch) is not None:
            self.tail = None

    def reshape(self, epoch: int, old_trained: list[np.ndarray], world_size: int) -> int:
        """Re-deal what is left of ``epoch`` to ``world_size`` ranks; returns its sample count
        (0: nothing a batch per rank could be made of, so the epoch is over)."""
        num_rows = self.loader.train_split.num_samples
        tail = self._tail_for(epoch)
        planned = np.arange(num_rows) if tail is None else np.concatenate(tail["rows"])
        rest = np.setdiff1d(planned, np.concatenate(old_trained) if old_trained else [])
        try:
            deal = deal_rows(rest, num_rows, self.loader.piece_rows, world_size, self.loader.cfg.batch_size)
        except DealError as exc:
            print(f"epoch {epoch}: the rest of the epoch is not re-dealt ({exc}); it ends here",
                  file=sys.stderr, flush=True)
            self.tail = {"epoch": epoch, "generation": self.generation(epoch) + 1, "base": 1.0,
                         "rows": [np.zeros(0, np.int64)] * world_size}
            return 0
        self.tail = {"epoch": epoch, "generation": self.generation(epoch) + 1,
                     "base": 1.0 - len(rest) / num_rows, "rows": list(deal.explicit)}
        return len(rest)

    def state_dict(self) -> dict:
        return {"tail": self.tail}

    def load_state_dict(self, state: dict) -> None:
        self.tail = state["tail"]


def after_resume(trainer: "Trainer", resumed: Path) -> dict:
    """After ``trainer``'s states were loaded from ``resumed``: on another world size, the rest
    of a mid-epoch checkpoint's epoch is re-dealt. Returns the resume's record for
    ``run_info.json`` (step, world sizes, config keys that changed)."""
    old_world, world = trainer.coordinator.resumed_world_size, trainer.dist.world_size
    record = {"from": resumed.name, "step": trainer.step, "epoch": trainer.epoch,
              "batch_in_epoch": trainer.batch_in_epoch, "world_size": world, "from_world_size": old_world,
              "changed": {k: list(v) for k, v in trainer.identity.changed.items()}}
    if old_world != world:
        note = f"resumed on {world} processes a checkpoint of {old_world} at step {trainer.step}"
        epoch = trainer.epoch + 1
        # Mid-epoch, or a tail of another shape not yet started: the rest is re-dealt.
        if trainer.batch_in_epoch or trainer.plan.has_tail(epoch):
            left = trainer.plan.reshape(epoch, trainer.trained.old or [], world)
            note += f"; the {left:,} samples of epoch {epoch} no rank had trained are re-dealt"
            trainer.batch_in_epoch = 0
        if trainer.dist.is_main:
            print(note, flush=True)
    return record
