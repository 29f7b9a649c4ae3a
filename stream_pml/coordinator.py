"""Cross-rank state of a run: checkpoint save and resume, and the epoch hand-over.

Everything a restart needs is registered once under a fixed key, as an object with
``state_dict()`` / ``load_state_dict()``: *shared* states are replicated on every rank (model,
optimizer, scheduler, ROLE's estimator, progress) and saved once by rank 0 in
``trainer.pt``; *per-rank* states (stream position, random states) are saved by each rank in
``rank{r}.pt``. The pseudo-label store is the third kind, rank-owned: each rank journals its
own chunks into the checkpoint (DESIGN.md section 5).

The hand-over at each epoch start is where chunk ownership moves between ranks: every rank
waits for its journals to reach Zarr, all ranks meet, and only then does each take its new
chunks and drop cached chunks it no longer owns. Without it a rank could read a chunk that its
previous owner is still writing, or serve an epochs-old cached copy and journal it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Protocol

from . import checkpoint as ckpt
from .distributed import DistInfo, all_reduce_min, barrier
from .pseudo_store import PseudoLabelStore


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Coordinator:
    """Saves and restores registered states and the store together, and hands epochs over."""

    def __init__(self, run_dir: Path, dist_info: DistInfo, store: PseudoLabelStore, keep: int):
        self.run_dir = Path(run_dir)
        self.dist = dist_info
        self.store = store
        self.keep = keep
        self.shared: dict[str, Stateful] = {}
        self.per_rank: dict[str, Stateful] = {}

    def register(self, key: str, obj: Stateful, *, per_rank: bool = False) -> None:
        """Add ``obj`` under ``key``; states load in registration order (register the
        compatibility check first)."""
        if key in self.shared or key in self.per_rank:
            raise ValueError(f"state {key!r} is registered twice")
        (self.per_rank if per_rank else self.shared)[key] = obj

    # -- checkpoints -----------------------------------------------------------------------
    def save(self, epoch: int, step: int) -> Path:
        """Atomic checkpoint of every rank (collective), then the journals go to Zarr in the
        background."""
        rank, main = self.dist.rank, self.dist.is_main
        # The previous checkpoint's journal must be in the store before it may be pruned.
        self.store.flush()
        tmp = ckpt.tmp_dir(self.run_dir, epoch, step)
        if main:
            ckpt.prepare(self.run_dir, epoch, step)
        barrier()
        self.store.save_journal(tmp, rank)
        ckpt.save_file(tmp / ckpt.RANK_FILE.format(rank=rank),
                       {k: obj.state_dict() for k, obj in self.per_rank.items()})
        if main:
            ckpt.save_file(tmp / ckpt.MAIN_FILE, {k: obj.state_dict() for k, obj in self.shared.items()})
        barrier()
        final = tmp.with_name(tmp.name[: -len(".tmp")])
        if main:
            ckpt.publish(tmp)
        barrier()
        self.store.apply_journal_async(final, rank)
        if main:
            ckpt.prune(self.run_dir, self.keep)
        return final

    def resume(self, enabled: bool = True) -> Path | None:
        """Load the newest checkpoint every rank can read into the registered states and
        bring the store to what it saw; None when there is none. Checkpoints newer than the one
        resumed (none readable by every rank: all) are rolled back and set aside
        (:func:`checkpoint.set_aside`). Refused (:class:`~stream_pml.checkpoint.ResumeError`)
        when ``enabled`` is False and checkpoints exist, or they were written by another
        number of processes."""
        rank = self.dist.rank
        ckpts = ckpt.list_checkpoints(self.run_dir)
        # Refused before anything is rolled back; every rank sees the same files.
        if ckpts and not enabled:
            raise ckpt.ResumeError(
                f"train.resume=never, but {ckpts[-1].parent} holds {len(ckpts)} checkpoint(s) of an earlier "
                "run whose pseudo labels are in the store; use a new train.run_dir")
        writers = ckpt.written_by(ckpts[-1]) if ckpts else self.dist.world_size
        if writers != self.dist.world_size:
            raise ckpt.ResumeError(
                f"cannot resume from {ckpts[-1]}: written by {writers} processes, this run "
                f"has {self.dist.world_size}; resume with the same number of processes")
        mine, loaded = ckpt.load_newest(self.run_dir, rank) if enabled else (-1, None)
        index = all_reduce_min(mine)  # every rank resumes from the same checkpoint
        # Newer journals may have reached the store: undone newest first. Older ones not
        # marked applied are applied oldest first. A chunk's writer changes between epochs,
        # so every rank finishes one checkpoint before any rank starts the next.
        for newer in reversed(ckpts[index + 1:]):
            self.store.rollback_journal(newer, rank)
            barrier()
            # Its timeline is given up: listed again, it would sort before the next
            # checkpoint and its journal be re-applied over newer rows (or prune the new run's).
            if self.dist.is_main:
                ckpt.set_aside(newer)
            barrier()
        for older in ckpts[: index + 1]:
            self.store.apply_journal(older, rank)
            barrier()
        if index < 0:
            return None
        # The states loaded while looking are reused unless another rank chose an older one.
        main_state, rank_state = loaded if index == mine else ckpt.load(ckpts[index], rank)
        for states, objs in ((main_state, self.shared), (rank_state, self.per_rank)):
            missing = [k for k in objs if k not in states]
            if missing:
                raise ckpt.ResumeError(f"cannot resume from {ckpts[index]}: it holds no {missing} (written "
                                 "by another version of stream-pml; use a new train.run_dir)")
            for key, obj in objs.items():
                obj.load_state_dict(states[key])
        return ckpts[index]

    # -- epochs ----------------------------------------------------------------------------
    def hand_over(self, owned_chunks: Iterable[int]) -> None:
        """At each epoch start on every rank (collective): the store's chunks change owners."""
        self.store.flush()
        barrier()
        self.store.set_owned_chunks(owned_chunks)
