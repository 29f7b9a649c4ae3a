"""GPU decoding with torch alone: the torch backend's reads and order, then
``torchvision.io.decode_jpeg`` on the training device (nvJPEG on CUDA), resize and flip
there. For GPUs without a matching DALI (docs/design.md#devices).

The order, flips and resume position are the torch backend's, so rows and labels equal it
batch for batch and ``checkpoint()`` is the number of batches handed out. Reads run in
``num_threads`` threads; one decode thread turns each batch's JPEG bytes into a uint8
(B, 3, S, S) batch on the device, on its own CUDA stream, ``prefetch_depth`` batches ahead,
so decoding overlaps the training step. A batch is decoded in one call; when that call
fails, its samples are decoded one at a time, a sample nvJPEG refuses is decoded on the CPU
(CMYK, progressive, PNG), and a sample nothing decodes is skipped and reported with its shard
and byte offset, counted against ``data.max_bad_samples``: the CPU path's policy.
"""

from __future__ import annotations

import queue
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from .batch import Batch
from .torch_stream import RawBatch, ReadInOrder, _pad, built_ahead, decode_resize

_DONE = object()
# torchvision 0.29 deprecates its image decoders in favour of TorchCodec; until TorchCodec's
# is what this path uses, the warning would repeat on every run (docs/decisions.md#gpu-decode-without-dali).
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def _resize(image_CHW: torch.Tensor, size: int) -> torch.Tensor:
    import torchvision.transforms.v2.functional as TF

    if image_CHW.shape[-2:] == (size, size):
        return image_CHW
    # Antialiased bilinear like the CPU path (v2 computes uint8 on CUDA in float and rounds).
    return TF.resize(image_CHW, [size, size], antialias=True)


class DeviceDecoder:
    """JPEG bytes of a batch -> uint8 (B, 3, S, S) on ``device``; what fails is reported
    through ``skip(k, exc)`` and left out."""

    def __init__(self, device: torch.device, image_size: int):
        self.device, self.image_size = device, image_size
        self.cuda = device.type == "cuda"

    def _host(self, jpegs: list[np.ndarray]) -> list[torch.Tensor]:
        """Byte tensors for decode_jpeg; on CUDA views of one pinned buffer, so the bitstream's
        copy to the device is a DMA from page-locked memory."""
        if not self.cuda:
            return [torch.from_numpy(j.copy()) for j in jpegs]  # writable: torch refuses read-only arrays
        sizes = [len(j) for j in jpegs]
        buf = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=True)
        out, at = [], 0
        for j, n in zip(jpegs, sizes):
            view = buf[at:at + n]
            view.numpy()[:] = j
            out.append(view)
            at += n
        return out

    def decode(self, jpegs: list[np.ndarray], flips: np.ndarray, skip) -> tuple[torch.Tensor, list[int]]:
        """(images, indices of the samples kept)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        data = self._host(jpegs)
        try:
            decoded = list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
            kept = list(range(len(jpegs)))
        except RuntimeError:  # one bad image fails the whole call: find it
            decoded, kept = [], []
            for k, d in enumerate(data):
                try:
                    image = decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device)
                except RuntimeError:
                    try:  # what nvJPEG does not take, the CPU path may (its own error if not)
                        image = decode_resize(jpegs[k].tobytes(), self.image_size).to(self.device)
                    except Exception as exc:
                        skip(k, exc)
                        continue
                decoded.append(image)
                kept.append(k)
        images = [_resize(img, self.image_size) for img in decoded]
        images = [img.flip(-1) if flips[k] else img for img, k in zip(images, kept)]
        if not images:
            return torch.empty((0, 3, self.image_size, self.image_size), dtype=torch.uint8, device=self.device), kept
        return torch.stack(images), kept


class DeviceDecodeStream(ReadInOrder):
    """Same constructor and contract as :class:`TorchShardStream` (``tars`` may be a cache's
    :class:`~stream_pml.data.cache.CachedShards`); ``device``: where to decode (default the
    current CUDA device, else the CPU, where torchvision uses libjpeg-turbo)."""

    def __init__(self, tars, idxs: list[str], *, image_size: int, num_threads: int, prefetch_depth: int = 2,
                 device: torch.device | str | None = None, **order: object):
        super().__init__(tars, idxs, image_size=image_size, num_threads=num_threads, prefetch_depth=prefetch_depth,
                         **order)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.decoder = DeviceDecoder(torch.device(device), image_size)
        self._readers = max(1, num_threads)
        self._depth = max(1, prefetch_depth)

    def _to_batch(self, raw: RawBatch) -> Batch:
        def skip(k: int, exc: Exception) -> None:
            shard, offset = raw.where[k]
            self.builder._skip(shard, offset, exc)

        images, kept = self.decoder.decode(raw.jpegs, raw.flips, skip)
        idx = np.asarray(kept, dtype=np.int64)
        rows = torch.from_numpy(raw.rows[idx])
        pos, neg = _pad([raw.pos[k] for k in kept]), _pad([raw.neg[k] for k in kept])
        if self.decoder.cuda:
            rows, pos, neg = (t.pin_memory().to(images.device, non_blocking=True) for t in (rows, pos, neg))
        return Batch(images, rows, pos, neg)

    def _decode_loop(self, raws: Iterator[tuple[int, RawBatch]], out: queue.Queue, stop: threading.Event) -> None:
        """The decode thread: batches in order into ``out`` with the event that marks them
        ready on the side stream; an exception is handed over in their place."""
        side = torch.cuda.Stream(self.decoder.device) if self.decoder.cuda else None
        try:
            for b, raw in raws:
                if stop.is_set():
                    break
                if side is None:
                    item = (b, self._to_batch(raw), None)
                else:
                    # decode_jpeg allocates on the current stream but writes from a private
                    # one without waiting for it (pytorch/vision#9606): an idle side stream
                    # makes every block it is handed free of pending readers.
                    side.synchronize()
                    with torch.cuda.stream(side):
                        batch = self._to_batch(raw)
                        ready = torch.cuda.Event()
                        ready.record(side)
                    item = (b, batch, ready)
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            out.put((None, exc, None))
        finally:
            out.put((None, _DONE, None))

    def __iter__(self) -> Iterator[Batch]:
        if self.handed_out >= self.order.stop:
            return
        pool = ThreadPoolExecutor(self._readers, thread_name_prefix="shard-read")
        raws = built_ahead(pool, self.builder.raw, self.handed_out, self.order.stop, self._readers * self._depth)
        out: queue.Queue = queue.Queue(maxsize=self._depth)
        stop = threading.Event()
        worker = threading.Thread(target=self._decode_loop, args=(raws, out, stop), name="device-decode",
                                  daemon=True)
        worker.start()
        try:
            while True:
                b, batch, ready = out.get()
                if batch is _DONE:
                    break
                if isinstance(batch, BaseException):
                    raise batch
                self.handed_out = b + 1
                if ready is not None:
                    current = torch.cuda.current_stream(batch.images_BCHW.device)
                    current.wait_event(ready)
                    for t in (batch.images_BCHW, batch.rows_B, batch.pos_BP, batch.neg_BN):
                        t.record_stream(current)  # freed on the side stream only after this use
                yield batch
            self.handed_out = self.order.stop
        finally:
            stop.set()
            while worker.is_alive():
                try:
                    out.get(timeout=0.1)
                except queue.Empty:
                    pass
            worker.join()
            raws.close()
            pool.shutdown(wait=True, cancel_futures=True)
