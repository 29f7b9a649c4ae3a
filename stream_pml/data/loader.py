"""Which shards each rank reads, and the loaders built on them (DESIGN.md sections 3-4).

Each epoch deals the training shards to ranks by a permutation of (seed, epoch), so a rank
owns whole shards (one writer per pseudo-label chunk) and the data order is a pure function
of (seed, epoch, rank, position). Every rank computes every rank's deal, so equal batch
counts need no communication.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from shard_tools.manifest import Manifest, ManifestError, load_manifest, shard_paths

from .batch import Batch
from .config import DataConfig
from .dali import DaliShardStream
from .torch_stream import TorchShardStream


def resolve_backend(cfg: DataConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    import torch

    return "dali" if torch.cuda.is_available() else "torch"


def deal_shards(num_shards: int, world_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shard indices owned by each rank in ``epoch``; disjoint and covering all shards."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_shards)
    return [sorted(perm[r::world_size].tolist()) for r in range(world_size)]


def stream_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def default_threads(cfg: DataConfig) -> int:
    """Decode threads: ``data.num_threads``, else every core the process owns (threads.py)."""
    from ..threads import owned_cores

    return cfg.num_threads if cfg.num_threads > 0 else owned_cores()


class ShardLoader:
    """Train and eval streams of one rank over a built shard directory."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.directory = Path(cfg.shards)
        self.backend = resolve_backend(cfg)
        self._stream_cls = DaliShardStream if self.backend == "dali" else TorchShardStream
        self.manifest: Manifest = load_manifest(self.directory)
        self.train_split = self.manifest.split(cfg.train_split, self.directory)
        self.train_tars, self.train_idxs = shard_paths(self.directory, self.train_split)
        # Every split named in the config is checked now, not after hours of training.
        self.eval_shards = {}
        for name in (cfg.val_split, cfg.test_split):
            if name:
                self.eval_shards[name] = shard_paths(self.directory, self.manifest.split(name, self.directory))
        if len(self.train_tars) < world_size:
            raise ManifestError(
                f"{self.directory}: split {cfg.train_split} has {len(self.train_tars)} shards but "
                f"{world_size} processes; every rank needs a whole shard (rebuild with a smaller "
                "--shard-size)")

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    def num_batches(self, epoch: int) -> int:
        sizes = [s.num_samples for s in self.train_split.shards]
        deal = deal_shards(len(sizes), self.world_size, self.seed, epoch)
        n = min(sum(sizes[i] for i in owned) // self.cfg.batch_size for owned in deal)
        if n == 0:
            raise ManifestError(f"{self.directory}: a rank holds fewer than data.batch_size="
                                f"{self.cfg.batch_size} training samples in epoch {epoch}")
        return n

    def owned_train_shards(self, epoch: int) -> list[int]:
        return deal_shards(len(self.train_tars), self.world_size, self.seed, epoch)[self.rank]

    def train_epoch(self, epoch: int) -> Iterator[Batch]:
        return iter(self.train_stream(epoch))

    def train_stream(self, epoch: int, checkpoint: str | None = None,
                     max_batches: int | None = None) -> DaliShardStream | TorchShardStream:
        """This rank's stream for ``epoch``; ``checkpoint`` (a stream's ``checkpoint()``)
        continues exactly where that stream was, ``max_batches`` limits what is left."""
        owned = self.owned_train_shards(epoch)
        num_batches = self.num_batches(epoch)
        covered, total = num_batches * self.cfg.batch_size * self.world_size, self.train_split.num_samples
        if self.rank == 0 and checkpoint is None and covered < total - self.world_size * self.cfg.batch_size:
            # Whole shards per rank, equal batch counts: the rank with the fewest samples sets
            # the count. Not silent: a user can rebuild with smaller shards.
            print(f"epoch {epoch} trains {covered:,} of {total:,} samples ({covered / total:.1%}): "
                  f"{len(self.train_tars)} shards dealt whole to {self.world_size} ranks; a smaller "
                  "--shard-size at build time evens the deal", file=sys.stderr, flush=True)
        return self._stream_cls(
            [self.train_tars[i] for i in owned], [self.train_idxs[i] for i in owned],
            image_size=self.cfg.image_size, batch_size=self.cfg.batch_size, train=True,
            flip=self.cfg.flip, seed=stream_seed(self.seed, epoch, self.rank),
            num_threads=default_threads(self.cfg), num_workers=default_threads(self.cfg),
            shuffle_buffer=self.cfg.shuffle_buffer, prefetch_depth=self.cfg.prefetch_depth,
            max_bad_samples=self.cfg.max_bad_samples,
            max_batches=num_batches if max_batches is None else max_batches,
            checkpoint=checkpoint)

    def eval_batches(self, split: str) -> Iterator[Batch]:
        """This rank's share of an evaluation split (fixed deal), every sample once."""
        tars, idxs = self.eval_shards[split]
        owned = list(range(self.rank, len(tars), self.world_size))
        if not owned:
            return iter(())
        return iter(self._stream_cls(
            [tars[i] for i in owned], [idxs[i] for i in owned],
            image_size=self.cfg.image_size, batch_size=self.cfg.eval_batch_size, train=False,
            flip=False, seed=0, num_threads=default_threads(self.cfg),
            num_workers=default_threads(self.cfg), max_bad_samples=self.cfg.max_bad_samples,
            prefetch_depth=self.cfg.prefetch_depth))
