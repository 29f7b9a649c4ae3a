"""What the pseudo-label store holds: which chunks were written, and each one's crc32.

Zarr reads a chunk file that is not there as its fill value, so a deleted chunk would come back
as 0.5 everywhere, silently. The record is part of every checkpoint (the chunks of every
rank's journal, gathered when it is saved), so a resume checks that each written chunk's file
exists, and every read of a chunk file checks its crc32 against the bytes last applied (the
store keeps that table: :meth:`PseudoLabelStore.expect`).
"""

from __future__ import annotations

import warnings
import zlib

import numpy as np


def crc32(blob: bytes) -> int:
    return zlib.crc32(blob) & 0xFFFFFFFF


class StoreRecord:
    def __init__(self, num_chunks: int):
        self.written = np.zeros(num_chunks, dtype=bool)
        self.crc = np.zeros(num_chunks, dtype=np.uint32)

    def update(self, chunks: list[int], crcs: list[int]) -> None:
        self.written[chunks] = True
        self.crc[chunks] = np.asarray(crcs, dtype=np.uint32)

    def state_dict(self) -> dict:
        return {"written": self.written.copy(), "crc": self.crc.copy()}

    def load_state_dict(self, state: dict) -> None:
        self.written, self.crc = state["written"].copy(), state["crc"].copy()

    def missing(self, store, rank: int, world_size: int) -> list[int]:
        """Written chunks (this rank's share: ``chunk % world_size == rank``) whose file is gone."""
        mine = np.flatnonzero(self.written)
        return [int(c) for c in mine[mine % world_size == rank] if not store.chunk_file(int(c)).exists()]

    def forget(self, chunks: list[int], store, warn: bool = True) -> None:
        """Accept lost chunks: they read as the fill value (``pseudo.init``) from now on."""
        self.written[chunks] = False
        for c in chunks if warn else ():
            lo, hi = store.chunk_bounds(c)
            warnings.warn(f"{store.chunk_file(c)} is missing: rows {lo}-{hi - 1} start again from "
                          f"pseudo.init (pseudo.accept_lost_chunks=true)")
