"""Who trains which samples in an epoch (docs/design.md#rank-owned-pieces).

The work of an epoch is a set of *pieces*: fixed ranges of ``piece_rows`` consecutive row ids,
which are also the chunks of the pseudo-label store, so a rank that owns a piece is the only
writer of that chunk in the epoch. Pieces are listed in a seeded order of their shards (a new
order every epoch, so ranks meet other shards each epoch; a rank's pieces stay mostly whole
shards, so it opens few files) and the list is cut into ``world_size`` runs whose piece counts
differ by at most one. Rank sample counts then differ by at most ``piece_rows``; every rank
trains ``ceil(min count / batch_size)`` batches (the last one may be partial), so a rank leaves
out at most ``piece_rows`` samples (``<= batch_size`` with the default piece size) and every
other sample is trained exactly once.

Why pieces rather than whole shards: with whole shards, the rank with the fewest samples set
everyone's batch count, which left out ~42% of COCO on 48 ranks. Pieces also let the deal use
more ranks than there are shards.

Everything here is a pure function of (rows, shard size, piece size, world size, seed, epoch),
computed by every rank for every rank, with no communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class DealError(ValueError):
    """An epoch that cannot give every rank a batch."""


def num_pieces(num_rows: int, piece_rows: int) -> int:
    return -(-num_rows // piece_rows)


def piece_order(num_rows: int, shard_size: int, piece_rows: int, seed: int, epoch: int) -> np.ndarray:
    """Piece ids in the epoch's order: shards in a permutation of (seed, epoch), each shard's
    pieces in row order (a piece that crosses a shard boundary goes with its first row), the
    split's last piece at the end."""
    num_shards = -(-num_rows // shard_size)
    rank_of_shard = np.empty(num_shards, dtype=np.int64)
    rank_of_shard[np.random.default_rng([seed, epoch]).permutation(num_shards)] = np.arange(num_shards)
    pieces = np.arange(num_pieces(num_rows, piece_rows), dtype=np.int64)
    order = pieces[np.lexsort((pieces, rank_of_shard[pieces * piece_rows // shard_size]))]
    if num_rows % piece_rows:
        # The one short piece goes last, to the rank whose piece count is the larger one
        # (or all are equal): rank sample counts then differ by at most one piece.
        order = np.concatenate([order[order != pieces[-1]], pieces[-1:]])
    return order


@dataclass(frozen=True)
class EpochDeal:
    """One epoch's pieces per rank and the batch count every rank trains."""

    num_rows: int
    piece_rows: int
    batch_size: int
    pieces: tuple[np.ndarray, ...]  # per rank: piece ids, in the deal's order
    # Per rank: the row ids themselves, when pieces are not whole (the rest of an epoch
    # re-dealt after a resume on another world size, :func:`deal_rows`).
    explicit: tuple[np.ndarray, ...] | None = None

    @property
    def world_size(self) -> int:
        return len(self.pieces)

    def piece_sizes(self, pieces: np.ndarray) -> np.ndarray:
        return np.minimum(self.num_rows, (pieces + 1) * self.piece_rows) - pieces * self.piece_rows

    def num_samples(self, rank: int) -> int:
        if self.explicit is not None:
            return len(self.explicit[rank])
        return int(self.piece_sizes(self.pieces[rank]).sum())

    @property
    def num_batches(self) -> int:
        fewest = min(self.num_samples(r) for r in range(self.world_size))
        return -(-fewest // self.batch_size)

    def rows(self, rank: int) -> np.ndarray:
        """Row ids of the rank's pieces, piece by piece in the deal's order."""
        if self.explicit is not None:
            return self.explicit[rank]
        pieces = self.pieces[rank]
        if not len(pieces):
            return np.zeros(0, dtype=np.int64)
        sizes = self.piece_sizes(pieces)
        starts = np.repeat(pieces * self.piece_rows - np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes)
        return starts + np.arange(int(sizes.sum()), dtype=np.int64)

    def left_out(self, rank: int) -> int:
        """Samples of the rank's pieces beyond its batches this epoch (at most ``piece_rows``)."""
        return max(0, self.num_samples(rank) - self.num_batches * self.batch_size)


def deal_epoch(num_rows: int, shard_size: int, piece_rows: int, world_size: int, batch_size: int,
               seed: int, epoch: int) -> EpochDeal:
    order = piece_order(num_rows, shard_size, piece_rows, seed, epoch)
    if len(order) < world_size:
        raise DealError(f"{num_rows} training samples make {len(order)} pieces of {piece_rows} rows, "
                        f"fewer than the {world_size} processes")
    cuts = [len(order) * r // world_size for r in range(world_size + 1)]
    return EpochDeal(num_rows, piece_rows, batch_size,
                     tuple(order[cuts[r]:cuts[r + 1]] for r in range(world_size)))


def deal_rows(rows: np.ndarray, num_rows: int, piece_rows: int, world_size: int,
              batch_size: int) -> EpochDeal:
    """Deal an arbitrary set of rows (what is left of an epoch) by whole pieces: each piece,
    in row order, goes to the rank with the fewest rows so far (lowest rank on ties). A rank
    then holds at most one piece more than the least loaded (the rank that took the last
    piece of the most loaded one was the least loaded then), so the one-batch bound holds."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    pieces, starts, counts = np.unique(rows // piece_rows, return_index=True, return_counts=True)
    if len(pieces) < world_size:
        raise DealError(f"{len(rows)} rows left in {len(pieces)} pieces, fewer than the {world_size} processes")
    load = np.zeros(world_size, dtype=np.int64)
    owner = np.empty(len(pieces), dtype=np.int64)
    for i, count in enumerate(counts.tolist()):  # O(pieces x ranks), once per resume
        owner[i] = int(np.argmin(load))
        load[owner[i]] += count
    mine = [np.flatnonzero(owner == r) for r in range(world_size)]
    explicit = tuple(np.concatenate([rows[starts[i]:starts[i] + counts[i]] for i in m]) if len(m)
                     else np.zeros(0, np.int64) for m in mine)
    return EpochDeal(num_rows, piece_rows, batch_size, tuple(pieces[m] for m in mine), explicit)


def default_piece_rows(batch_size: int, shard_size: int) -> int:
    """The largest divisor of ``shard_size`` up to ``batch_size``: at most one batch left out
    per rank, and no piece crosses a shard boundary (a rank never opens, or downloads, a shard
    for a few samples). A shard size with no divisor near the batch size (a prime, say) would
    make tiny pieces, so then pieces are ``batch_size`` rows and some cross shard boundaries."""
    limit = max(1, min(batch_size, shard_size))
    best = max(d for d in range(1, limit + 1) if shard_size % d == 0)
    return best if 4 * best >= limit else limit


def by_shard(rows: np.ndarray, shard_size: int) -> tuple[list[int], list[np.ndarray]]:
    """Shards (ascending) holding ``rows`` and, per shard, the positions of those rows in it."""
    rows = np.sort(rows)
    shard_N = rows // shard_size
    shards, starts = np.unique(shard_N, return_index=True)
    parts = np.split(rows, starts[1:])
    return shards.tolist(), [part - s * shard_size for s, part in zip(shards.tolist(), parts)]
