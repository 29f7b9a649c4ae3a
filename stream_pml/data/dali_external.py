"""DALI decoding fed from Python (``fn.external_source``): the torch backend's order and
reads, DALI's decode, resize and flip.

DALI's ``readers.webdataset`` opens every file it will read when its pipeline is built, so
shards in a node-local cache of remote storage (cache.py) would all have to be downloaded
before the epoch starts, and held until it ends. Here the samples are read in Python from
the shards as the order reaches them, so the cache's prefetch window and eviction work as
with the torch backend, and DALI sees only JPEG bytes. The order, flips and resume position
are the torch backend's (a pure function of the seed; ``checkpoint()`` is the number of
batches handed out), so rows and labels are identical to it batch for batch; only the
pixels differ, by the decoder and resize kernel (as between the two backends).

A sample that cannot be read is skipped and counted as in the torch backend. When DALI
cannot decode a batch, its samples are decoded on the CPU one by one; those that fail there
too are skipped and reported (shard, byte offset) like unreadable ones, and the pipeline is
built again from that batch without them. Only a batch whose every sample decodes on the
CPU and still fails in DALI stops the stream, naming the batch. (DALI's own reader stops at
the first corrupt JPEG, hence ``data.dali_source=auto`` is this source.)
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from shard_tools.remote import RemoteError

from .batch import Batch
from .torch_stream import BadSamples, RawBatch, ReadInOrder, built_ahead, decode_resize

OUTPUTS = ["images", "rows", "pos", "neg"]


class DaliDecodeError(RuntimeError):
    """DALI could not decode a batch fed to it."""


def _build_pipeline(source, *, image_size: int, batch_size: int, seed: int, num_threads: int,
                    device_id: int | None, prefetch_depth: int):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def pipe():
        jpg, mirror, row, pos, neg = fn.external_source(
            source=source, num_outputs=5, batch=True, no_copy=False,
            dtype=[types.UINT8, types.INT32, types.INT64, types.INT32, types.INT32])
        decoder_device = "mixed" if device_id is not None else "cpu"
        img = fn.decoders.image(jpg, device=decoder_device, output_type=types.RGB)
        img = fn.resize(img, resize_x=image_size, resize_y=image_size)
        img = fn.crop_mirror_normalize(img, dtype=types.UINT8, output_layout="CHW", mirror=mirror)
        return img, row, fn.pad(pos, fill_value=-1), fn.pad(neg, fill_value=-1)

    p = pipe(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
             prefetch_queue_depth=prefetch_depth)
    p.build()
    return p


def _dali_inputs(raw: RawBatch) -> tuple[list, ...]:
    """One external_source batch: per sample, the JPEG bytes, mirror flag, row and labels."""
    return (raw.jpegs, [np.array(int(f), np.int32) for f in raw.flips],
            [np.array([r], np.int64) for r in raw.rows], [np.ascontiguousarray(x) for x in raw.pos],
            [np.ascontiguousarray(x) for x in raw.neg])


class DaliExternalStream(ReadInOrder):
    """Same constructor and contract as :class:`TorchShardStream` (``tars`` may be a cache's
    :class:`~stream_pml.data.cache.CachedShards`); batches come from DALI."""

    def __init__(self, tars, idxs: list[str], *, image_size: int, batch_size: int, seed: int,
                 num_threads: int, prefetch_depth: int = 2, **order: object):
        super().__init__(tars, idxs, image_size=image_size, batch_size=batch_size, seed=seed,
                         num_threads=num_threads, prefetch_depth=prefetch_depth, **order)
        self._settings = dict(image_size=image_size, batch_size=batch_size, seed=seed % (2**31),
                              num_threads=max(1, num_threads), prefetch_depth=prefetch_depth)
        # Undecoded batches read ahead of DALI by this many threads (reads are cheap; DALI
        # decodes): enough to keep a remote shard's first read off the critical path.
        self._readers = max(1, min(num_threads, 2))
        self._ahead = max(2, self._readers * prefetch_depth)

    def _raw_batches(self, pool: ThreadPoolExecutor, start: int, dropped: dict[int, list[int]]
                     ) -> Iterator[tuple[list, ...]]:
        ahead = built_ahead(pool, self.builder.raw, start, self.order.stop, self._ahead)
        try:
            for b, raw in ahead:
                if b in dropped:
                    raw = _without(raw, dropped[b])
                if len(raw.rows):  # every sample unreadable: nothing for DALI, no batch
                    self._fed.append((b, raw))
                    yield _dali_inputs(raw)
        finally:
            ahead.close()

    def _undecodable(self, b: int, raw: RawBatch, exc: Exception) -> list[int]:
        """The samples of a batch DALI refused that the CPU cannot decode either, reported
        and skipped; none found: the stream stops, naming the batch."""
        bad = []
        for k, jpeg in enumerate(raw.jpegs):
            try:
                decode_resize(jpeg.tobytes(), 8)
            except Exception as cpu_exc:
                bad.append(k)
                self.builder._skip(*raw.where[k], cpu_exc)
        if not bad:
            raise DaliDecodeError(f"DALI could not decode batch {b} of this stream although each of its "
                                  f"samples decodes on the CPU: {str(exc).strip().splitlines()[0]}") from None
        return bad

    def __iter__(self) -> Iterator[Batch]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
        dropped: dict[int, list[int]] = {}  # batch -> its samples left out after a decode error
        while self.handed_out < self.order.stop:
            pool = ThreadPoolExecutor(self._readers, thread_name_prefix="shard-read")
            self._fed: deque = deque()  # (batch number, what it was fed) in the order DALI was fed
            failed = None
            try:
                pipe = _build_pipeline(self._raw_batches(pool, self.handed_out, dropped), device_id=device_id,
                                       **self._settings)
                try:
                    # size=-1: the source's end ends the iteration; batches may be partial.
                    iterator = DALIGenericIterator(pipe, OUTPUTS, size=-1, auto_reset=False)
                except StopIteration:
                    self.handed_out = self.order.stop  # nothing readable was left
                    return
                while True:
                    try:
                        out = next(iterator)
                    except StopIteration:
                        break
                    except (BadSamples, RemoteError):
                        raise  # from the reads: said as the torch backend says them
                    except RuntimeError as exc:
                        if not self._fed:
                            raise DaliDecodeError(f"DALI failed at batch {self.handed_out} of this stream: "
                                                  f"{str(exc).strip().splitlines()[0]}") from None
                        failed = (self._fed[0], exc)
                        break
                    b, _ = self._fed.popleft()
                    d = out[0]
                    self.handed_out = b + 1
                    yield Batch(d["images"], d["rows"].view(-1).long(), d["pos"], d["neg"])
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
            if failed is None:
                self.handed_out = self.order.stop
                return
            (b, raw), exc = failed
            bad = self._undecodable(b, raw, exc)
            # Positions in the batch as read (a batch dropped from before keeps its gaps).
            before = dropped.get(b, [])
            original = [k for k in range(len(raw.rows) + len(before)) if k not in before]
            dropped[b] = sorted(before + [original[k] for k in bad])
            del pipe, iterator  # the next pass builds a new pipeline from batch b
            self.handed_out = b


def _without(raw: RawBatch, drop: list[int]) -> RawBatch:
    keep = [k for k in range(len(raw.rows)) if k not in set(drop)]
    return RawBatch([raw.jpegs[k] for k in keep], raw.flips[keep], raw.rows[keep], [raw.pos[k] for k in keep],
                    [raw.neg[k] for k in keep], [raw.where[k] for k in keep])
