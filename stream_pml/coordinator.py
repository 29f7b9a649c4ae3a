"""Cross-rank state of a run: checkpoint save and resume, and the epoch hand-over.

Everything a restart needs is registered once under a fixed key, as an object with
``state_dict()`` / ``load_state_dict()``: *shared* states are replicated on every rank (model,
optimizer, scheduler, ROLE's estimator, progress) and saved once by rank 0 in
``trainer.pt``; *per-rank* states (stream position, random states) are saved by each rank in
``rank{r}.pt``. The pseudo-label store is the third kind, rank-owned: each rank journals its
own chunks into the checkpoint (docs/design.md#checkpoint-and-store-agree).

A checkpoint written by another number of processes resumes too (docs/design.md#a-change-of-world-size): the
shared states load as always, each new rank applies (or rolls back) the journals of the old
ranks ``r`` with ``r % world_size == rank``, and per-rank states are handed every old rank's
state through ``load_resharded`` (a state without it refuses the change in one line).

The hand-over at each epoch start is where chunk ownership moves between ranks: every rank
waits for its journals to reach Zarr, all ranks meet, and only then does each take its new
chunks and drop cached chunks it no longer owns. Without it a rank could read a chunk that its
previous owner is still writing, or serve an epochs-old cached copy and journal it back.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Protocol

from . import checkpoint as ckpt
from .distributed import DistInfo, all_reduce_flags, all_reduce_min, barrier, broadcast_from_main, gather_to_main
from .pseudo_store import PseudoLabelStore, StoreError
from .store_record import StoreRecord


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
        self.resumed_world_size: int | None = None  # processes that wrote the resumed checkpoint
        self.record = StoreRecord(-(-store.num_rows // store.chunk_rows))

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
        # Every rank's journaled chunks join the record that the checkpoint holds.
        for chunks, crcs in broadcast_from_main(gather_to_main(self.store.journaled)):
            self.record.update(chunks, crcs)
        ckpt.save_file(tmp / ckpt.RANK_FILE.format(rank=rank),
                       {k: obj.state_dict() for k, obj in self.per_rank.items()})
        if main:
            ckpt.save_file(tmp / ckpt.MAIN_FILE, {"world_size": self.dist.world_size,
                                                  "store_record": self.record.state_dict(),
                                                  **{k: obj.state_dict() for k, obj in self.shared.items()}})
        barrier()
        final = tmp.with_name(tmp.name[: -len(".tmp")])
        if main:
            ckpt.publish(tmp)
        barrier()
        self.store.apply_journal_async(final, rank)
        if main:
            ckpt.prune(self.run_dir, self.keep)
        return final

    def _old_ranks(self, ckpt_dir: Path) -> list[int]:
        """The old ranks whose journals in ``ckpt_dir`` this rank applies or rolls back."""
        found = {int(m.group(1)) for f in ckpt_dir.iterdir()
                 if (m := re.fullmatch(r"pseudo-rank(\d+)\.(?:journal|undo)\.npz", f.name))}
        return sorted(r for r in found if r % self.dist.world_size == self.dist.rank)

    def resume(self, enabled: bool = True) -> Path | None:
        """Load the newest checkpoint every rank can read into the registered states and
        bring the store to what it saw; None when there is none. Checkpoints newer than the one
        resumed (none readable by every rank: all) are rolled back and set aside
        (:func:`checkpoint.set_aside`). Refused (:class:`~stream_pml.checkpoint.ResumeError`)
        when ``enabled`` is False and checkpoints exist."""
        world = self.dist.world_size
        ckpts = ckpt.list_checkpoints(self.run_dir)
        # Refused before anything is rolled back; every rank sees the same files.
        if ckpts and not enabled:
            raise ckpt.ResumeError(
                f"train.resume=never, but {ckpts[-1].parent} holds {len(ckpts)} checkpoint(s) of an earlier "
                "run whose pseudo labels are in the store; use a new train.run_dir")
        mine, loaded = ckpt.load_newest(self.run_dir, self.dist.rank, world) if enabled else (-1, None)
        index = all_reduce_min(mine)  # every rank resumes from the same checkpoint
        if ckpts and index < 0:  # never a silent fresh start over days of training
            raise ckpt.ResumeError(f"{ckpts[-1].parent} holds {len(ckpts)} checkpoint(s) and none is readable "
                                   "by every rank (see the warnings); move them away to start afresh")
        # Newer journals may have reached the store: undone newest first. Older ones not
        # marked applied are applied oldest first. A chunk's writer changes between epochs,
        # so every rank finishes one checkpoint before any rank starts the next.
        for newer in reversed(ckpts[index + 1:]):
            for old in self._old_ranks(newer):
                self.store.rollback_journal(newer, old)
            barrier()
            # Its timeline is given up: listed again, it would sort before the next
            # checkpoint and its journal be re-applied over newer rows (or prune the new run's).
            if self.dist.is_main:
                ckpt.set_aside(newer)
            barrier()
        for older in ckpts[: index + 1]:
            for old in self._old_ranks(older):
                self.store.apply_journal(older, old)
            barrier()
        if index < 0:
            return None
        # The states loaded while looking are reused unless another rank chose an older one.
        main_state, rank_states = loaded if index == mine else ckpt.load(ckpts[index], self.dist.rank, world)
        self.resumed_world_size = ckpt.writers(main_state, ckpts[index])
        for states, objs in ((main_state, self.shared), (rank_states[0], self.per_rank)):
            missing = [k for k in objs if k not in states]
            if missing:
                raise ckpt.ResumeError(f"cannot resume from {ckpts[index]}: it holds no {missing} (written "
                                       "by another version of stream-pml; use a new train.run_dir)")
        for key, obj in self.shared.items():
            obj.load_state_dict(main_state[key])
        for key, obj in self.per_rank.items():
            if self.resumed_world_size == world:
                obj.load_state_dict(rank_states[0][key])
            elif hasattr(obj, "load_resharded"):
                obj.load_resharded([s[key] for s in rank_states])
            else:
                raise ckpt.ResumeError(f"cannot resume {ckpts[index]} (written by {self.resumed_world_size} "
                                       f"processes) with {world}: state {key!r} cannot be re-dealt")
        if "store_record" in main_state:
            self.record.load_state_dict(main_state["store_record"])
            self._check_store()
        return ckpts[index]

    def _check_store(self) -> None:
        """Every chunk the resumed checkpoint's store holds is there (each rank checks its share)."""
        missing = self.record.missing(self.store, self.dist.rank, self.dist.world_size)
        if self.store.cfg.accept_lost_chunks:
            lost = [c for part in broadcast_from_main(gather_to_main(missing)) for c in part]
            self.record.forget(lost, self.store, warn=self.dist.is_main)
        elif all_reduce_flags(bool(missing))[0]:
            if not missing:
                raise StoreError(f"{self.store.path}: another rank found written chunks missing (see its line)")
            more = f", and {len(missing) - 1} more chunks" if len(missing) > 1 else ""
            raise StoreError(self.store.lost(missing[0], f"is missing{more}"))
        self.store.expect(self.record.written, self.record.crc)

    # -- epochs ----------------------------------------------------------------------------
    def hand_over(self, owned_chunks: Iterable[int]) -> None:
        """At each epoch start on every rank (collective): the store's chunks change owners."""
        self.store.flush()
        barrier()
        self.store.set_owned_chunks(owned_chunks)
        self.store.expect(self.record.written, self.record.crc)
