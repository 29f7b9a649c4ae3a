"""Each rank's train and eval streams over a built shard directory.

Design: docs/design.md#rank-owned-pieces, docs/design.md#exact-data-order.

Training samples are dealt to ranks each epoch in pieces (:mod:`.deal`): a rank owns its
pieces' store chunks for the epoch, and its data order is a pure function of (seed, epoch,
rank, position). Every rank computes every rank's deal, so equal batch counts need no
communication.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from shard_tools.manifest import MANIFEST_NAME, Manifest, ManifestError, load_manifest, shard_paths
from shard_tools.remote import is_remote

from .batch import Batch
from .cache import CachedShards, ShardCache, parse_size
from .config import DataConfig
from .dali import DaliShardStream
from .dali_external import DaliExternalStream
from .device_decode import DeviceDecodeStream
from .deal import DealError, EpochDeal, by_shard, deal_epoch, default_piece_rows
from .torch_stream import TorchShardStream


def dali_unusable() -> str | None:
    """Why DALI cannot decode on this process's GPU (not installed, or built for another
    CUDA: a wheel for another major imports but fails to run), or None when a one-operator
    GPU pipeline runs. Asked once per process."""
    global _DALI_CHECK
    if _DALI_CHECK is None:
        try:
            import torch
            from nvidia.dali import fn, pipeline_def

            @pipeline_def(batch_size=1, num_threads=1, device_id=torch.cuda.current_device())
            def probe():
                return fn.random.uniform(range=[0.0, 1.0], shape=[1]).gpu()

            pipe = probe()
            pipe.build()
            pipe.run()
            del pipe
            _DALI_CHECK = ""
        except Exception as exc:  # ImportError, a CUDA/driver mismatch, ...: all mean "not here"
            _DALI_CHECK = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return _DALI_CHECK or None


_DALI_CHECK: str | None = None


def resolve_backend(cfg: DataConfig) -> tuple[str, str]:
    """(backend, why): ``auto`` is DALI where it runs on the GPU, else torch's own GPU decode
    (``device``), and the CPU loader (``torch``) without CUDA."""
    if cfg.backend != "auto":
        return cfg.backend, "data.backend"
    import torch

    if not torch.cuda.is_available():
        return "torch", "no CUDA"
    reason = dali_unusable()
    if reason is None:
        return "dali", "DALI runs on this GPU"
    return "device", f"DALI unusable here ({reason})"


def stream_seed(seed: int, epoch: int, rank: int, generation: int = 0) -> int:
    """A rank's stream seed; ``generation`` counts re-deals of the epoch (elastic.py)."""
    key = [seed, epoch, rank] + ([generation] if generation else [])
    return int(np.random.SeedSequence(key).generate_state(1)[0])


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
        self.backend, self.backend_reason = resolve_backend(cfg)
        # auto: fed from Python, which skips and reports corrupt samples and streams remote
        # shards; DALI's reader stops at the first corrupt JPEG (dali_external.py).
        external = cfg.dali_source in ("external", "auto")
        self._stream_cls = {"torch": TorchShardStream, "device": DeviceDecodeStream,
                            "dali": DaliExternalStream if external else DaliShardStream}[self.backend]
        self.cache: ShardCache | None = None
        if is_remote(cfg.shards):
            self.manifest = load_manifest(cfg.shards)
            self.cache = self._open_cache()
            self.directory = self.cache.dir  # manifest, label and key files come here
            (self.directory / MANIFEST_NAME).write_text(self.manifest.to_json())
            split_files = lambda split: ([s.name for s in split.shards], [s.index for s in split.shards])  # noqa: E731
        else:
            self.directory = Path(cfg.shards)
            self.manifest = load_manifest(self.directory)
            split_files = lambda split: shard_paths(self.directory, split)  # noqa: E731
        self.train_split = self.manifest.split(cfg.train_split, self.directory)
        self.train_tars, self.train_idxs = split_files(self.train_split)
        # Every split named in the config is checked now, not after hours of training.
        self.eval_shards = {}
        for name in (cfg.val_split, cfg.test_split):
            if name:
                self.eval_shards[name] = split_files(self.manifest.split(name, self.directory))
        self.piece_rows = cfg.piece_rows or default_piece_rows(cfg.batch_size, self.manifest.shard_size)
        self._deals: dict[int, EpochDeal] = {}
        self.skipped: dict[str, list[str]] = {}  # per evaluation split, after eval_batches
        self.deal(1)  # too few samples for the ranks: said now

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    def _open_cache(self) -> ShardCache:
        import os

        cfg = self.cfg
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path.home() / ".cache" / "stream-pml" / "shards"
        limit = parse_size(cfg.cache_limit)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        largest = max((s.size for split in self.manifest.splits.values() for s in split.shards), default=0)
        if local * (cfg.prefetch_shards + 1) * largest > limit:
            raise ManifestError(
                f"data.cache_limit={cfg.cache_limit} ({limit:,} bytes) cannot hold the prefetch window of this "
                f"node: {local} processes x (data.prefetch_shards={cfg.prefetch_shards} + 1) x {largest:,} bytes "
                f"(largest shard) = {local * (cfg.prefetch_shards + 1) * largest:,} bytes")
        cache = ShardCache(cfg.shards, cache_dir, limit, retries=cfg.download_retries,
                           timeout_s=cfg.download_timeout_s, options=dict(cfg.fsspec), window=cfg.prefetch_shards)
        for split in self.manifest.splits.values():
            for shard in split.shards:
                cache.expect(shard.name, shard.size, shard.sha256)
                cache.expect(shard.index, None, shard.index_sha256)
        return cache

    def local_files(self, split: str) -> Path:
        """The directory holding ``split``'s label and key files (fetched if remote)."""
        if self.cache is not None:
            info = self.manifest.split(split, self.cfg.shards)
            for name in (f"{split}.labels.npz", info.keys_file):
                if name:
                    self.cache.path(name)
        return self.directory

    def _stream_files(self, tars: list[str], idxs: list[str]):
        """What a stream opens: local paths, or (remote) shards fetched through
        the cache when first read; index files are small and fetched now."""
        if self.cache is None:
            return tars, idxs
        idxs = [self.cache.path(i) for i in idxs]
        if self._stream_cls is DaliShardStream:  # DALI's reader opens every file when built
            need = sum(self.cache.expected[t][0] or 0 for t in tars)
            if need > self.cache.limit:
                raise ManifestError(f"data.backend=dali reads this rank's {len(tars)} shards of the epoch "
                                    f"({need:,} bytes) from the cache at once, more than data.cache_limit="
                                    f"{self.cfg.cache_limit}; raise the limit or use data.dali_source=external")
            self.cache.plan(list(tars), window=len(tars))  # all of them stay until the epoch ends
            return [self.cache.path(t) for t in tars], idxs
        return CachedShards(list(tars), self.cache), idxs

    def deal(self, epoch: int) -> EpochDeal:
        if epoch not in self._deals:
            try:
                self._deals[epoch] = deal_epoch(self.train_split.num_samples, self.manifest.shard_size,
                                                self.piece_rows, self.world_size, self.cfg.batch_size,
                                                self.seed, epoch)
            except DealError as exc:
                raise ManifestError(f"{self.directory}: split {self.cfg.train_split}: {exc}") from None
        return self._deals[epoch]

    def num_batches(self, epoch: int) -> int:
        return self.deal(epoch).num_batches

    def owned_pieces(self, epoch: int) -> list[int]:
        """This rank's pieces in ``epoch``: the pseudo-label chunks it alone writes."""
        return sorted(self.deal(epoch).pieces[self.rank].tolist())

    def train_epoch(self, epoch: int) -> Iterator[Batch]:
        return iter(self.train_stream(epoch))

    def train_stream(self, epoch: int, checkpoint: str | None = None, max_batches: int | None = None,
                     deal: EpochDeal | None = None, generation: int = 0):
        """This rank's stream for ``epoch`` (under ``deal``, by default the ordinary one);
        ``checkpoint`` (a stream's ``checkpoint()``) continues exactly where that stream
        was, ``max_batches`` limits what is left."""
        deal = deal if deal is not None else self.deal(epoch)
        left_out = sum(deal.left_out(r) for r in range(self.world_size))
        if self.rank == 0 and checkpoint is None and left_out:
            total = self.train_split.num_samples
            # Not silent; bounded by the deal at one piece per rank, other pieces next epoch.
            print(f"epoch {epoch} trains {total - left_out:,} of {total:,} samples ({left_out} left out: "
                  f"pieces of {self.piece_rows} rows dealt to {self.world_size} ranks, "
                  f"{deal.num_batches} batches each)", file=sys.stderr, flush=True)
        shards, positions = by_shard(deal.rows(self.rank), self.manifest.shard_size)
        tars, idxs = self._stream_files([self.train_tars[i] for i in shards], [self.train_idxs[i] for i in shards])
        return self._stream_cls(
            tars, idxs, samples=positions,
            image_size=self.cfg.image_size, batch_size=self.cfg.batch_size, train=True,
            flip=self.cfg.flip, seed=stream_seed(self.seed, epoch, self.rank, generation),
            num_threads=default_threads(self.cfg), num_workers=default_threads(self.cfg),
            shuffle_buffer=self.cfg.shuffle_buffer, prefetch_depth=self.cfg.prefetch_depth,
            max_bad_samples=self.cfg.max_bad_samples,
            max_batches=deal.num_batches if max_batches is None else max_batches,
            checkpoint=checkpoint)

    def eval_batches(self, split: str) -> Iterator[Batch]:
        """This rank's share of an evaluation split (fixed deal), every readable sample once.
        Samples that could not be read are listed in ``self.skipped[split]`` (shard, byte
        offset, why) once the iteration ends (torch backend, DALI fed externally)."""
        tars, idxs = self.eval_shards[split]
        owned = list(range(self.rank, len(tars), self.world_size))
        self.skipped[split] = []
        if not owned:
            return
        stream = self._stream_cls(
            *self._stream_files([tars[i] for i in owned], [idxs[i] for i in owned]),
            image_size=self.cfg.image_size, batch_size=self.cfg.eval_batch_size, train=False,
            flip=False, seed=0, num_threads=default_threads(self.cfg),
            num_workers=default_threads(self.cfg), max_bad_samples=self.cfg.max_bad_samples,
            prefetch_depth=self.cfg.prefetch_depth)
        yield from stream
        self.skipped[split] = list(getattr(getattr(stream, "builder", None), "bad", []))
