"""Pseudo labels of unknown entries (paper eq. 5) in a Zarr array, crash-consistent.

0.5 before an image is seen (the array's fill value: a fresh 5.6M x 600 store writes only
metadata), afterwards the model's last prediction. Invariants
(docs/design.md#store-chunks-and-writers, docs/design.md#checkpoint-and-store-agree):

- one chunk per piece of the epoch deal (``chunk_rows = data.piece_rows``, see
  ``data/deal.py``), and a rank writes only the chunks of the pieces it owns this epoch
  (asserted);
- ``write()`` never touches disk: updates since the last checkpoint stay in memory, one
  chunk-sized buffer per touched chunk (bounded by the checkpoint interval; the trainer
  forces a checkpoint when ``pseudo.max_pending_mb`` is exceeded);
- at a checkpoint each rank saves its updates as a journal inside the checkpoint directory
  before the directory is published: every touched chunk whole (store + updates), already
  compressed in Zarr's on-disk format, in one fsynced file. After publishing, a background
  thread applies it: the chunks' current files are saved as an undo file, then each chunk
  file is atomically replaced by the journal's bytes. A row is compressed once, and no
  chunk is decoded or re-encoded during the apply;
- on resume, journals of the resumed checkpoint and older that are not marked applied are
  re-applied (idempotent), and applied journals of newer checkpoints (published but not
  loadable, e.g. corrupt) are rolled back from their undo files. So the store always equals
  what the resumed checkpoint saw.

uint8 stores round(p * 254): 0.5 is exact (127), where "x 255" would store 0.502; resolution 1/254 is far below the noise of a prediction.
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

from .store_record import crc32

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
    # Resume although written chunks of the store are missing (their rows restart from init);
    # without it such a resume stops and names the chunks.
    accept_lost_chunks: bool = False
    # Decoded chunks kept for reads; 0 = four shards' worth (a rank reads one or two shards
    # at a time, a chunk is a piece of the deal: data.piece_rows rows).
    cache_chunks: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.init <= 1.0:
            raise ValueError(f"pseudo.init must be in [0, 1], got {self.init}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"pseudo.momentum must be in [0, 1), got {self.momentum}")
        if self.dtype not in ("uint8", "float16"):
            raise ValueError(f"pseudo.dtype: {self.dtype!r} is not uint8 or float16")
        if self.max_pending_mb < 1 or self.cache_chunks < 0:
            raise ValueError("pseudo.max_pending_mb must be >= 1 and pseudo.cache_chunks >= 0")


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


def _save_blobs(path: Path, chunks: list[int], blobs: list[bytes | None], durable: bool) -> None:
    """Chunk files' bytes (None: no file) in one file: one write and one fsync, not one per chunk."""
    sizes = [0 if b is None else len(b) for b in blobs]
    arrays = {"chunks": np.asarray(chunks, dtype=np.int64),
              "present": np.array([b is not None for b in blobs], dtype=bool),
              "offsets": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
              "data": np.frombuffer(b"".join(b for b in blobs if b is not None), dtype=np.uint8)}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    tmp.replace(path)


def _load_blobs(path: Path) -> tuple[list[int], list[bytes | None]]:
    with np.load(path) as z:
        chunks, present, offsets, data = z["chunks"], z["present"], z["offsets"], z["data"]
    blobs = [data[offsets[i]:offsets[i + 1]].tobytes() if present[i] else None for i in range(len(chunks))]
    return [int(c) for c in chunks], blobs


class ChunkCodec:
    """Encodes and decodes whole chunks exactly as the store's Zarr metadata declares them
    (bytes codec, little endian, then zstd), without Zarr's per-call machinery: zarr 3.1
    spends ~4 ms per chunk write and ~2 ms per read around ~0.8 ms of compression
    (BENCHMARKS.md). ``tests/test_pseudo_store.py`` checks both directions against Zarr."""

    def __init__(self, array, chunk_rows: int, num_classes: int):
        from numcodecs import Zstd
        from zarr.codecs import BytesCodec, ZstdCodec

        codecs = list(array.metadata.codecs)
        if (len(codecs) != 2 or not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[1], ZstdCodec)
                or (codecs[0].endian is not None and codecs[0].endian.value != "little")):
            raise StoreError(f"unsupported pseudo-label store codecs {codecs}: this store was not "
                             "created by stream-pml (expected bytes + zstd)")
        self.zstd = Zstd(level=codecs[1].level, checksum=codecs[1].checksum)
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.shape = (chunk_rows, num_classes)

    def encode(self, chunk_RC: np.ndarray) -> bytes:
        assert chunk_RC.shape == self.shape, (chunk_RC.shape, self.shape)
        return bytes(self.zstd.encode(np.ascontiguousarray(chunk_RC, dtype=self.dtype)))

    def decode(self, blob: bytes) -> np.ndarray:
        return np.frombuffer(self.zstd.decode(blob), dtype=self.dtype).reshape(self.shape)


class PseudoLabelStore:
    def __init__(self, path: Path | str, num_rows: int, num_classes: int, chunk_rows: int,
                 identity: dict, cfg: PseudoConfig, create: bool = True, cache_chunks: int = 4):
        """``cache_chunks``: decoded chunks kept for reads when ``cfg.cache_chunks`` is 0."""
        import zarr

        self.path = Path(path)
        self.cfg = cfg
        self.dtype = cfg.dtype
        self.num_rows, self.num_classes, self.chunk_rows = num_rows, num_classes, chunk_rows
        self.cache_chunks = cfg.cache_chunks or max(1, cache_chunks)
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
        self.codec = ChunkCodec(self.array, chunk_rows, num_classes)
        self._pending: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        # Whole chunks journaled at the last save_journal() (and the write count then), and
        # those of published journals whose apply is still running: reads see them.
        self._num_writes = 0
        self._staged: tuple[dict[int, np.ndarray], int] = ({}, 0)
        self._inflight: list[dict[int, np.ndarray]] = []
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pseudo-writer")
        self._io_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pseudo-io")
        self._futures: list[Future] = []
        self.owned: Optional[set[int]] = None
        self.journaled: tuple[list[int], list[int]] = ([], [])  # chunks and crc32s of the last journal
        # crc32 of the bytes last applied, per chunk (None: unchecked): see store_record.py.
        self._expected: Optional[np.ndarray] = None

    # -- reads and writes (training step) --------------------------------------------------
    def set_owned_chunks(self, chunks: Iterable[int]) -> None:
        """Take this epoch's chunks (the rank's shards) and drop cached chunks outside them:
        another rank writes those this epoch, so a copy kept here would be stale when the
        chunk comes back. Call once every rank's journals are in Zarr (the epoch hand-over)."""
        owned = set(int(c) for c in chunks)
        with self._lock:
            busy = sorted(set(self._pending) | set(self._staged[0]) |
                          {c for layer in self._inflight for c in layer})
            if busy:
                raise StoreError(f"{self.path}: ownership changed while chunks {busy[:8]} still have "
                                 "updates that are not applied (save and flush first)")
            for chunk in [c for c in self._cache if c not in owned]:
                del self._cache[chunk]
        self.owned = owned

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.num_rows)

    def _base_chunk(self, chunk: int) -> np.ndarray:
        with self._lock:
            if chunk in self._cache:
                self._cache.move_to_end(chunk)
                return self._cache[chunk]
            data = self._read_chunk(chunk)
            self._remember({chunk: data})
            return data

    def _remember(self, chunks: dict[int, np.ndarray]) -> None:
        """Add decoded chunks to the read cache, oldest out first (caller holds the lock)."""
        self._cache.update(chunks)
        while len(self._cache) > self.cache_chunks:
            self._cache.popitem(last=False)

    def read(self, rows_B: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Pseudo labels (B, C) float32 of these rows: latest update, else the store."""
        rows = np.asarray(rows_B.cpu() if isinstance(rows_B, torch.Tensor) else rows_B, dtype=np.int64)
        out = np.empty((len(rows), self.num_classes), dtype=self.array.dtype)
        chunks = rows // self.chunk_rows
        for chunk in np.unique(chunks).tolist():
            sel = chunks == chunk
            offsets = rows[sel] - chunk * self.chunk_rows
            with self._lock:  # newest whole chunk first: journals being applied, else the store
                base = next((layer[chunk] for layer in reversed(self._inflight) if chunk in layer), None)
            vals = (base if base is not None else self._base_chunk(chunk))[offsets]
            if chunk in self._pending:
                buf, mask = self._pending[chunk]
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
        self._num_writes += 1
        chunks = rows // self.chunk_rows
        for chunk in np.unique(chunks):
            chunk = int(chunk)
            if self.owned is not None and chunk not in self.owned:
                raise StoreError(f"{self.path}: write to chunk {chunk} (rows {self.chunk_bounds(chunk)}) "
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
        """Write the updates since the last checkpoint into ``ckpt_dir`` (not yet published).

        The journal holds each touched chunk whole, already encoded in the store's on-disk
        format: the store plus the updates, compressed once here (outside the GIL, in the
        I/O threads). Applying it is then a file copy per chunk, with no Zarr call.
        """
        self.flush()  # the base chunks must include every earlier journal
        chunks = sorted(self._pending)
        merged = list(self._io_pool.map(self._merged_chunk, chunks))
        blobs = list(self._io_pool.map(self.codec.encode, merged))
        path = Path(ckpt_dir) / JOURNAL.format(rank=rank)
        _save_blobs(path, chunks, blobs, durable=True)
        self.journaled = (chunks, [crc32(b) for b in blobs])
        self._staged = (dict(zip(chunks, merged)), self._num_writes)
        return path

    def _merged_chunk(self, chunk: int) -> np.ndarray:
        buf, mask = self._pending[chunk]
        if mask.all():
            return buf
        data = self._base_chunk(chunk).copy()
        data[mask] = buf[mask]
        return data

    def apply_journal_async(self, ckpt_dir: Path, rank: int) -> Future:
        """After the checkpoint is published: apply its journal in the background."""
        layer, num_writes = self._staged
        if num_writes != self._num_writes:
            raise StoreError("write() after save_journal(): those updates are in no journal")
        self._pending, self._staged = {}, ({}, self._num_writes)
        with self._lock:
            self._inflight.append(layer)
        future = self._executor.submit(self._apply_and_release, Path(ckpt_dir), rank, layer)
        self._futures.append(future)
        return future

    def _apply_and_release(self, ckpt_dir: Path, rank: int, layer: dict) -> None:
        chunks, crcs = self.journaled
        try:
            self.apply_journal(ckpt_dir, rank)
            if self._expected is not None:  # the chunk files now hold these bytes
                self._expected[chunks] = crcs
        finally:
            with self._lock:
                self._inflight.remove(layer)
                self._remember(layer)  # the chunks now in the store, decoded

    def apply_journal(self, ckpt_dir: Path, rank: int) -> bool:
        """Apply ``ckpt_dir``'s journal of ``rank`` unless marked applied; idempotent."""
        ckpt_dir = Path(ckpt_dir)
        marker = ckpt_dir / APPLIED.format(rank=rank)
        journal = ckpt_dir / JOURNAL.format(rank=rank)
        if marker.exists() or not journal.exists():
            return False
        chunks, blobs = _load_blobs(journal)
        undo = ckpt_dir / UNDO.format(rank=rank)
        if not undo.exists():
            # The chunk files as they are now, saved whole before any is replaced. Not
            # fsynced: the chunk files written next are not either, so the undo file guards
            # against process crashes (the page cache keeps it), as they do; the journal, part
            # of the published checkpoint, is fsynced.
            _save_blobs(undo, chunks, [self._chunk_bytes(c) for c in chunks], durable=False)
        for c, blob in zip(chunks, blobs):
            self._replace_chunk_file(c, blob)
        marker.write_text("applied\n")
        return True

    def rollback_journal(self, ckpt_dir: Path, rank: int) -> bool:
        """Undo ``ckpt_dir``'s journal if any of it may have reached the store."""
        undo = Path(ckpt_dir) / UNDO.format(rank=rank)
        if not undo.exists():
            return False  # its apply never started
        try:
            chunks, blobs = _load_blobs(undo)
        except Exception as exc:
            raise StoreError(f"{undo}: unreadable undo file ({exc}); the pseudo-label store may be "
                             "ahead of the checkpoint being resumed") from exc
        for c, blob in zip(chunks, blobs):
            self._replace_chunk_file(c, blob)
        (Path(ckpt_dir) / APPLIED.format(rank=rank)).unlink(missing_ok=True)
        undo.unlink()
        return True

    # -- chunk files -----------------------------------------------------------------------
    def expect(self, written: np.ndarray, crc: np.ndarray) -> None:
        """Check every chunk file read from now on: a written chunk must exist and match its
        crc32 (call when the files match the record: after a resume, at a hand-over)."""
        self._expected = np.where(written, crc.astype(np.int64), -1)

    def chunk_file(self, chunk: int) -> Path:
        return self.path / self.array.metadata.encode_chunk_key((chunk, 0))

    def lost(self, chunk: int, what: str) -> str:
        """The one-line message for a written chunk that is not what was written."""
        lo, hi = self.chunk_bounds(chunk)
        return (f"{self.chunk_file(chunk)} (pseudo labels of rows {lo}-{hi - 1}) {what}; restore it, or resume "
                "with pseudo.accept_lost_chunks=true to restart those rows from pseudo.init")

    def _chunk_bytes(self, chunk: int) -> bytes | None:
        """Chunk ``chunk``'s file as stored; None when it was never written (the fill value)."""
        try:
            return self.chunk_file(chunk).read_bytes()
        except FileNotFoundError:
            return None

    def _read_chunk(self, chunk: int) -> np.ndarray:
        """Chunk ``chunk`` decoded, ``chunk_rows`` rows (the last chunk is padded, as in Zarr)."""
        blob = self._chunk_bytes(chunk)
        expected = -1 if self._expected is None else int(self._expected[chunk])
        if expected >= 0 and (blob is None or crc32(blob) != expected):
            raise StoreError(self.lost(chunk, "is missing" if blob is None
                                       else "does not hold the bytes last written (crc32 differs)"))
        if blob is None:  # read as Zarr reads a chunk never written
            return np.full((self.chunk_rows, self.num_classes), self.array.fill_value, self.array.dtype)
        try:
            return self.codec.decode(blob)
        except Exception as exc:
            raise StoreError(f"{self.chunk_file(chunk)}: corrupt pseudo-label chunk {chunk} ({exc})") from exc

    def _replace_chunk_file(self, chunk: int, blob: bytes | None) -> None:
        """Atomically set chunk ``chunk``'s file to ``blob`` (None: no file, the fill value)."""
        path = self.chunk_file(chunk)
        if blob is None:
            path.unlink(missing_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(blob)
            tmp.replace(path)
        with self._lock:
            self._cache.pop(chunk, None)

    def flush(self) -> None:
        """Wait until every published journal has reached the store."""
        futures, self._futures = self._futures, []
        for f in futures:
            f.result()

    def discard_pending(self) -> None:
        self._pending, self._staged = {}, ({}, self._num_writes)

    def close(self) -> None:
        self.flush()
        self._executor.shutdown(wait=True)
        self._io_pool.shutdown(wait=True)
