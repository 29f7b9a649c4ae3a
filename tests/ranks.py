"""Runs ``stream_pml.train.main`` as N spawned processes of one gloo group, the way torchrun
would, with two optional instruments inside every rank:

- ``record_dir``: every pseudo-label read and write (epoch, rows, values), the chunks each
  rank owns per epoch, the store on disk right after each epoch hand-over (rank 0), and each
  rank's ROLE estimator at the end; also written after every checkpoint, so a killed run's
  records reach exactly its newest checkpoint;
- ``group_backend``: a process group the rank makes itself before ``main`` (e.g. NCCL-only
  on a GPU, as a launcher or a user's own code might), which the trainer must then use;
- ``stop_at=(epoch, batch)``: every rank stops itself (SIGSTOP) at the start of that batch's
  step, all at the same point of the run; the parent then SIGKILLs them all, like a lost
  node, and the run directory is left exactly as a crash leaves it.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def run_ranks(world_size: int, argv: list[str], *, record_dir: Path | None = None,
              stop_at: tuple[int, int] | None = None, group_backend: str | None = None,
              timeout_s: float = 600) -> list[int]:
    """Exit codes of the ranks (-9 each when ``stop_at`` killed them)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, argv, record_dir, stop_at, group_backend))
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout_s
    if stop_at is not None:
        while time.time() < deadline:
            states = [_state(p.pid) for p in procs]
            if all(s in ("T", "t") for s in states):
                break
            if any(p.exitcode is not None for p in procs):
                raise AssertionError(f"a rank ended before reaching {stop_at}: {[p.exitcode for p in procs]}")
            time.sleep(0.05)
        for p in procs:
            os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.join(max(1.0, deadline - time.time()))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.exitcode is None:
            p.kill()
            p.join()
    assert None not in codes, f"ranks did not finish within {timeout_s} s"
    return codes


def _rank_main(rank: int, world_size: int, port: int, argv: list[str], record_dir: Path | None,
               stop_at: tuple[int, int] | None, group_backend: str | None) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    if group_backend is not None:
        import torch.distributed as dist

        # The group starts CUDA; train.deterministic needs cuBLAS's setting before that.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        device = torch.device("cuda", rank) if "nccl" in group_backend else None
        if device is not None:
            torch.cuda.set_device(device)
        dist.init_process_group(group_backend, rank=rank, world_size=world_size, device_id=device)
    from stream_pml.train import main

    records = _install_recorder(Path(record_dir), rank) if record_dir is not None else None
    if stop_at is not None:
        _install_stop(*stop_at)
    rc = main(argv)
    if records is not None:
        records.dump()
    sys.exit(rc)


def _install_stop(epoch: int, batch: int) -> None:
    from stream_pml.trainer import Trainer

    real = Trainer.train_step

    def train_step(self, b, e):
        if e == epoch and self.batch_in_epoch == batch:
            os.kill(os.getpid(), signal.SIGSTOP)
        return real(self, b, e)

    Trainer.train_step = train_step


class _Records:
    def __init__(self, out: Path, rank: int):
        self.out, self.rank = out, rank
        self.epoch = 0
        self.reads: list[tuple[int, np.ndarray, np.ndarray]] = []
        self.writes: list[tuple[int, np.ndarray, np.ndarray]] = []
        self.owned: dict[int, list[int]] = {}
        self.estimator = None

    def dump(self) -> None:
        for name, items in (("reads", self.reads), ("writes", self.writes)):
            if items:
                np.savez(self.out / f"{name}-rank{self.rank}.npz",
                         epoch=np.concatenate([np.full(len(r), e) for e, r, _ in items]),
                         rows=np.concatenate([r for _, r, _ in items]),
                         values=np.concatenate([v for _, _, v in items]))
        owned = np.empty(len(self.owned), dtype=object)  # per epoch; lengths differ
        owned[:] = [self.owned[e] for e in sorted(self.owned)]
        np.save(self.out / f"owned-rank{self.rank}.npy", owned, allow_pickle=True)
        if self.estimator is not None:
            np.save(self.out / f"estimator-rank{self.rank}.npy", self.estimator)


def _install_recorder(out: Path, rank: int) -> _Records:
    import zarr

    from stream_pml import distributed
    from stream_pml.coordinator import Coordinator
    from stream_pml.pseudo_store import PseudoLabelStore
    from stream_pml.trainer import Trainer

    rec = _Records(out, rank)
    real_epoch, real_hand_over, real_save = Trainer.train_epoch, Coordinator.hand_over, Coordinator.save
    real_read, real_write, real_train = PseudoLabelStore.read, PseudoLabelStore.write, Trainer.train

    def train_epoch(self, epoch, *a, **kw):
        rec.epoch = epoch
        return real_epoch(self, epoch, *a, **kw)

    def hand_over(self, owned_chunks):
        owned_chunks = list(owned_chunks)
        real_hand_over(self, owned_chunks)
        rec.owned[rec.epoch] = sorted(owned_chunks)
        if rank == 0:  # every rank's journals are in Zarr now
            store = zarr.open_array(str(self.store.path), mode="r")[:]
            np.save(out / f"store-before-e{rec.epoch}.npy", store)
        distributed.barrier()  # no rank applies a new journal before the snapshot is taken

    def read(self, rows_B):
        values = real_read(self, rows_B)
        rec.reads.append((rec.epoch, np.asarray(rows_B.cpu()), values.numpy().copy()))
        return values

    def write(self, rows_B, probs_BC, previous_BC=None):
        # What the rows should hold, computed here rather than read back from the store, so
        # that a wrong blend or encoding cannot agree with itself: the momentum blend of
        # the store (pseudo.momentum, docs/training.md#pseudo-label-store), then uint8 p x 254 rounded to nearest.
        probs = probs_BC.detach().float().cpu().numpy().astype(np.float64)
        m = self.cfg.momentum
        if m > 0:
            prev = (previous_BC if previous_BC is not None else real_read(self, rows_B)).cpu().numpy()
            probs = m * prev.astype(np.float64) + (1 - m) * probs
        expected = (np.floor(np.clip(probs, 0, 1) * 254 + 0.5) / 254).astype(np.float32)
        real_write(self, rows_B, probs_BC, previous_BC)
        stored = real_read(self, rows_B).numpy()
        # rint rounds halves to even; a blend lands on an exact half only by chance.
        mismatch = np.abs(stored - expected) > 0.6 / 254
        if mismatch.any():
            raise AssertionError(f"rank {rank} wrote {stored[mismatch][:4]} where {expected[mismatch][:4]} "
                                 "was due")
        rec.writes.append((rec.epoch, np.asarray(rows_B.cpu()), stored.copy()))

    def train(self):
        try:
            return real_train(self)
        finally:
            if self.estimator is not None:
                rec.estimator = self.estimator.logits_NC.detach().cpu().numpy()

    def save(self, *a, **kw):
        path = real_save(self, *a, **kw)
        rec.dump()
        return path

    Trainer.train_epoch, Coordinator.hand_over, Trainer.train = train_epoch, hand_over, train
    Coordinator.save = save
    PseudoLabelStore.read, PseudoLabelStore.write = read, write
    return rec
