"""Pseudo labels of unknown entries (paper eq. 5) in a Zarr array, crash-consistent.

0.5 before an image is seen (the array's fill value: a fresh 5.6M x 600 store writes only
metadata), afterwards the model's last prediction. Invariants (DESIGN.md sections 3 and 5):

- one chunk per shard (``chunk_rows = shard_size``), and a rank writes only the chunks of
  the shards it owns this epoch (asserted);
- ``write()`` never touches disk: updates since the last checkpoint stay in memory, one
  chunk-sized buffer per touched chunk (bounded by the checkpoint interval; the trainer
  forces a checkpoint when ``pseudo.max_pending_mb`` is exceeded);
- at a checkpoint each rank saves its updates as a journal inside the checkpoint directory
  before the directory is published; after publishing, a background thread applies the
  journal to Zarr, whole chunks at a time (partial chunk writes rewrite the chunk anyway),
  after saving the chunks' previous rows as an undo file;
- on resume, journals of the resumed checkpoint and older that are not marked applied are
  re-applied (idempotent), and applied journals of newer checkpoints (published but not
  loadable, e.g. corrupt) are rolled back from their undo files. So the store always equals
  what the resumed checkpoint saw.

uint8 stores round(p * 254): 0.5 is exact (127), where DESIGN.md's "x 255" would store
0.502; resolution 1/254 is far below the noise of a prediction.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

UINT8_SCALE = 254.0
JOURNAL = "pseudo-rank{rank}.journal.npz"
UNDO = "pseudo-rank{rank}.undo.npz"
APPLIED = "pseudo-rank{rank}.applied"


@dataclass
class PseudoConfig:
    init: float = 0.5
    # new = momentum * old + (1 - momentum) * prediction; 0 = plain replacement (paper).
    momentum: float = 0.0
    dtype: str = "uint8"  # uint8 (p x 254) or float16
    # Store location; empty = <run_dir>/pseudo_labels.zarr.
    path: str = ""
    # Updates held in memory since the last checkpoint; past this a checkpoint is forced.
    max_pending_mb: int = 1024
    # Decoded chunks kept for reads (a rank reads one or two shards at a time).
    cache_chunks: int = 4

    def __post_init__(self) -> None:
        if not 0.0 <= self.init <= 1.0:
            raise ValueError(f"pseudo.init must be in [0, 1], got {self.init}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"pseudo.momentum must be in [0, 1), got {self.momentum}")
        if self.dtype not in ("uint8", "float16"):
            raise ValueError(f"pseudo.dtype: {self.dtype!r} is not uint8 or float16")
        if self.max_pending_mb < 1 or self.cache_chunks < 1:
            raise ValueError("pseudo.max_pending_mb and pseudo.cache_chunks must be >= 1")


class StoreError(RuntimeError):
    """A store that does not belong to this run, or a write outside the rank's shards."""


def encode(probs: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "uint8":
        return np.rint(np.clip(probs, 0.0, 1.0) * UINT8_SCALE).astype(np.uint8)
    return probs.astype(np.float16)


def decode(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "uint8":
        return values.astype(np.float32) / UINT8_SCALE
    return values.astype(np.float32)


def _save_npz(path: Path, durable: bool = True, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    tmp.replace(path)


class PseudoLabelStore:
    def __init__(self, path: Path | str, num_rows: int, num_classes: int, chunk_rows: int,
                 identity: dict, cfg: PseudoConfig, create: bool = True):
        import zarr

        self.path = Path(path)
        self.cfg = cfg
        self.dtype = cfg.dtype
        self.num_rows, self.num_classes, self.chunk_rows = num_rows, num_classes, chunk_rows
        attrs = {"identity": identity, "num_rows": num_rows, "num_classes": num_classes,
                 "chunk_rows": chunk_rows, "dtype": cfg.dtype, "init": cfg.init}
        if (self.path / "zarr.json").exists():
            self.array = zarr.open_array(str(self.path), mode="r+")
            found = dict(self.array.attrs.get("stream_pml", {}))
            if found != attrs:
                diff = sorted(k for k in set(found) | set(attrs) if found.get(k) != attrs.get(k))
                raise StoreError(f"{self.path}: this pseudo-label store belongs to another run or "
                                 f"dataset; differs in {diff}: store {[found.get(k) for k in diff]} vs "
                                 f"run {[attrs.get(k) for k in diff]}")
        elif not create:
            raise StoreError(f"{self.path}: no pseudo-label store")
        else:
            # Bare chunks (no sharding codec: zarr 3.1 rejects multi-row writes through it).
            self.array = zarr.create_array(
                store=str(self.path), shape=(num_rows, num_classes), chunks=(chunk_rows, num_classes),
                dtype=cfg.dtype, fill_value=encode(np.array(cfg.init), cfg.dtype).item(),
                compressors=zarr.codecs.ZstdCodec(level=1))
            self.array.attrs["stream_pml"] = attrs
        self._pending: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._inflight: list[dict[int, tuple[np.ndarray, np.ndarray]]] = []
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pseudo-writer")
        self._io_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pseudo-io")
        self._futures: list[Future] = []
        self.owned: Optional[set[int]] = None

    # -- reads and writes (training step) --------------------------------------------------
    def set_owned_chunks(self, chunks: Iterable[int]) -> None:
        self.owned = set(int(c) for c in chunks)

    def _chunk_bounds(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.num_rows)

    def _base_chunk(self, chunk: int) -> np.ndarray:
        with self._lock:
            if chunk in self._cache:
                self._cache.move_to_end(chunk)
                return self._cache[chunk]
            start, stop = self._chunk_bounds(chunk)
            data = self.array[start:stop]
            self._cache[chunk] = data
            while len(self._cache) > self.cfg.cache_chunks:
                self._cache.popitem(last=False)
            return data

    def read(self, rows_B: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Pseudo labels (B, C) float32 of these rows: latest update, else the store."""
        rows = np.asarray(rows_B.cpu() if isinstance(rows_B, torch.Tensor) else rows_B, dtype=np.int64)
        out = np.empty((len(rows), self.num_classes), dtype=self.array.dtype)
        chunks = rows // self.chunk_rows
        for chunk in np.unique(chunks):
            sel = chunks == chunk
            offsets = rows[sel] - chunk * self.chunk_rows
            vals = self._base_chunk(int(chunk))[offsets].copy()
            # Newer layers last: in-flight journals (oldest first), then pending updates.
            for layer in [*self._inflight, self._pending]:
                if int(chunk) in layer:
                    buf, mask = layer[int(chunk)]
                    hit = mask[offsets]
                    vals[hit] = buf[offsets[hit]]
            out[sel] = vals
        return torch.from_numpy(decode(out, self.dtype))

    def write(self, rows_B: torch.Tensor | np.ndarray, probs_BC: torch.Tensor | np.ndarray,
              previous_BC: torch.Tensor | None = None) -> None:
        """Record new pseudo labels of these rows (memory only; see the module docstring)."""
        rows = np.asarray(rows_B.cpu() if isinstance(rows_B, torch.Tensor) else rows_B, dtype=np.int64)
        probs = probs_BC.detach().float().cpu().numpy() if isinstance(probs_BC, torch.Tensor) else probs_BC
        if self.cfg.momentum > 0:
            old = (previous_BC if previous_BC is not None else self.read(rows)).cpu().numpy()
            probs = self.cfg.momentum * old + (1 - self.cfg.momentum) * probs
        values = encode(probs, self.dtype)
        chunks = rows // self.chunk_rows
        for chunk in np.unique(chunks):
            chunk = int(chunk)
            if self.owned is not None and chunk not in self.owned:
                raise StoreError(f"{self.path}: write to chunk {chunk} (rows {self._chunk_bounds(chunk)}) "
                                 f"by a rank that does not own that shard this epoch")
            if chunk not in self._pending:
                self._pending[chunk] = (np.empty((self.chunk_rows, self.num_classes), self.array.dtype),
                                        np.zeros(self.chunk_rows, dtype=bool))
            buf, mask = self._pending[chunk]
            sel = chunks == chunk
            offsets = rows[sel] - chunk * self.chunk_rows
            buf[offsets] = values[sel]
            mask[offsets] = True

    @property
    def pending_bytes(self) -> int:
        return sum(buf.nbytes + mask.nbytes for buf, mask in self._pending.values())

    # -- checkpoints ---------------------------------------------------------------------
    def save_journal(self, ckpt_dir: Path, rank: int) -> Path:
        """Write the updates since the last checkpoint into ``ckpt_dir`` (not yet published)."""
        chunks = sorted(self._pending)
        rows, values = [], []
        for chunk in chunks:
            buf, mask = self._pending[chunk]
            offsets = np.nonzero(mask)[0]
            rows.append(offsets + chunk * self.chunk_rows)
            values.append(buf[offsets])
        path = Path(ckpt_dir) / JOURNAL.format(rank=rank)
        _save_npz(path, rows=np.concatenate(rows) if rows else np.zeros(0, np.int64),
                  values=np.concatenate(values) if values else np.zeros((0, self.num_classes), self.array.dtype))
        return path

    def apply_journal_async(self, ckpt_dir: Path, rank: int) -> Future:
        """After the checkpoint is published: apply its journal in the background."""
        layer, self._pending = self._pending, {}
        with self._lock:
            self._inflight.append(layer)
        future = self._executor.submit(self._apply_and_release, Path(ckpt_dir), rank, layer)
        self._futures.append(future)
        return future

    def _apply_and_release(self, ckpt_dir: Path, rank: int, layer: dict) -> None:
        try:
            self.apply_journal(ckpt_dir, rank)
        finally:
            with self._lock:
                self._inflight.remove(layer)

    def apply_journal(self, ckpt_dir: Path, rank: int) -> bool:
        """Apply ``ckpt_dir``'s journal of ``rank`` unless marked applied; idempotent."""
        ckpt_dir = Path(ckpt_dir)
        marker = ckpt_dir / APPLIED.format(rank=rank)
        journal = ckpt_dir / JOURNAL.format(rank=rank)
        if marker.exists() or not journal.exists():
            return False
        with np.load(journal) as z:
            rows, values = z["rows"], z["values"]
        chunks = rows // self.chunk_rows
        # Each touched chunk is read once: its old rows become the undo file (saved before
        # anything is written), then the chunk is written back whole with the new rows.
        ids = [int(c) for c in np.unique(chunks)]
        # Chunk (de)compression runs outside the GIL: a few threads overlap it with file I/O.
        touched = dict(zip(ids, self._io_pool.map(self._read_chunk, ids)))
        undo = ckpt_dir / UNDO.format(rank=rank)
        if not undo.exists():
            old = np.empty_like(values)
            for c, data in touched.items():
                sel = chunks == c
                old[sel] = data[rows[sel] - c * self.chunk_rows]
            # Not fsynced: the chunk files Zarr writes next are not either, so the undo file
            # guards against process crashes (kept by the page cache), as they do; the
            # journal, part of the published checkpoint, is fsynced.
            _save_npz(undo, durable=False, rows=rows, values=old)
        for c, data in touched.items():
            sel = chunks == c
            data[rows[sel] - c * self.chunk_rows] = values[sel]
        list(self._io_pool.map(self._write_chunk, touched.keys(), touched.values()))
        marker.write_text("applied\n")
        return True

    def rollback_journal(self, ckpt_dir: Path, rank: int) -> bool:
        """Undo ``ckpt_dir``'s journal if any of it may have reached the store."""
        undo = Path(ckpt_dir) / UNDO.format(rank=rank)
        if not undo.exists():
            return False  # its apply never started
        try:
            with np.load(undo) as z:
                rows, values = z["rows"], z["values"]
        except Exception as exc:
            raise StoreError(f"{undo}: unreadable undo file ({exc}); the pseudo-label store may be "
                             "ahead of the checkpoint being resumed") from exc
        chunks = rows // self.chunk_rows
        for chunk in np.unique(chunks):
            self._write_rows(int(chunk), rows[chunks == chunk], values[chunks == chunk])
        (Path(ckpt_dir) / APPLIED.format(rank=rank)).unlink(missing_ok=True)
        undo.unlink()
        return True

    def _read_chunk(self, chunk: int) -> np.ndarray:
        start, stop = self._chunk_bounds(chunk)
        return np.array(self.array[start:stop])

    def _write_chunk(self, chunk: int, data: np.ndarray) -> None:
        start, stop = self._chunk_bounds(chunk)
        with self._lock:
            self.array[start:stop] = data  # a whole, aligned chunk: one chunk write
            self._cache.pop(chunk, None)

    def _write_rows(self, chunk: int, rows: np.ndarray, values: np.ndarray) -> None:
        data = self._read_chunk(chunk)
        data[rows - chunk * self.chunk_rows] = values
        self._write_chunk(chunk, data)

    def flush(self) -> None:
        """Wait until every published journal has reached the store."""
        futures, self._futures = self._futures, []
        for f in futures:
            f.result()

    def discard_pending(self) -> None:
        self._pending = {}

    def close(self) -> None:
        self.flush()
        self._executor.shutdown(wait=True)
        self._io_pool.shutdown(wait=True)
