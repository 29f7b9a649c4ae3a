"""NVIDIA DALI pipeline over one rank's shard list: decode, resize, flip -> uint8 CHW.

On CUDA the JPEG decode is ``mixed`` (nvJPEG) and batches arrive on the GPU; without CUDA the
same pipeline runs on the CPU (``device_id=None``). Label members are raw little-endian
integers (docs/design.md#labels-in-shards) and are padded with -1 because DALI's iterator needs dense
tensors.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .batch import Batch

OUTPUTS = ["images", "rows", "pos", "neg"]


def _build_pipeline(tars: list[str], idxs: list[str], *, image_size: int, batch_size: int,
                    train: bool, flip: bool, seed: int, num_threads: int, device_id: int | None,
                    shuffle_buffer: int, prefetch_depth: int, checkpoint: str | None = None):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(enable_checkpointing=True)
    def pipe():
        jpg, row, pos, neg = fn.readers.webdataset(
            paths=tars, index_paths=idxs, ext=["jpg", "row", "pos", "neg"],
            dtypes=[types.UINT8, types.INT64, types.INT32, types.INT32],
            missing_component_behavior="error", random_shuffle=train,
            initial_fill=max(1, shuffle_buffer), pad_last_batch=True, name="reader")
        decoder_device = "mixed" if device_id is not None else "cpu"
        img = fn.decoders.image(jpg, device=decoder_device, output_type=types.RGB)
        img = fn.resize(img, resize_x=image_size, resize_y=image_size)
        mirror = fn.random.coin_flip() if (train and flip) else 0
        img = fn.crop_mirror_normalize(img, dtype=types.UINT8, output_layout="CHW", mirror=mirror)
        return img, row, fn.pad(pos, fill_value=-1), fn.pad(neg, fill_value=-1)

    p = pipe(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
             prefetch_queue_depth=prefetch_depth, checkpoint=checkpoint)
    p.build()
    return p


def write_subset_indexes(idxs: list[str], samples: list[np.ndarray], directory: Path) -> list[str]:
    """Index files listing only ``samples[k]`` of shard ``k``: DALI's reader then reads just
    those samples of each tar (every line holds absolute byte offsets, so a subset is valid)."""
    out = []
    for k, (idx, chosen) in enumerate(zip(idxs, samples)):
        lines = Path(idx).read_text().splitlines()
        if len(chosen) == len(lines) - 1:
            out.append(idx)  # the whole shard
            continue
        version = lines[0].split()[0]
        path = directory / f"{k:06d}-{Path(idx).name}"
        path.write_text("\n".join([f"{version} {len(chosen)}", *(lines[1 + int(i)] for i in chosen)]) + "\n")
        out.append(str(path))
    return out


class DaliShardStream:
    """Iterates batches over ``tars`` in a fixed, seeded order.

    ``samples[k]`` selects positions of ``tars[k]`` (None: every sample). Every selected
    sample comes exactly once, the last batch partial; ``max_batches`` stops early (equal
    batch counts across ranks).
    """

    def __init__(self, tars: list[str], idxs: list[str], *, image_size: int, batch_size: int,
                 train: bool, flip: bool, seed: int, num_threads: int, shuffle_buffer: int = 512,
                 prefetch_depth: int = 2, max_batches: int | None = None,
                 checkpoint: str | None = None, samples: list[np.ndarray] | None = None, **_: object):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if samples is not None:
            # Lives as long as the stream: DALI may read the index files when it builds.
            self._index_dir = tempfile.TemporaryDirectory(prefix="stream-pml-idx-")
            idxs = write_subset_indexes(idxs, samples, Path(self._index_dir.name))
        device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
        self.pipe = _build_pipeline(tars, idxs, image_size=image_size, batch_size=batch_size,
                                    train=train, flip=flip, seed=seed % (2**31),
                                    num_threads=num_threads, device_id=device_id,
                                    shuffle_buffer=shuffle_buffer, prefetch_depth=prefetch_depth,
                                    checkpoint=checkpoint)
        self.iterator = DALIGenericIterator(self.pipe, OUTPUTS, reader_name="reader",
                                            last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)
        self.max_batches = max_batches

    def checkpoint(self) -> str:
        """DALI's own pipeline checkpoint at the position of the last batch handed out."""
        return self.iterator.checkpoints()[0]

    def __iter__(self) -> Iterator[Batch]:
        for n, out in enumerate(self.iterator):
            if self.max_batches is not None and n >= self.max_batches:
                break
            d = out[0]
            yield Batch(d["images"], d["rows"].view(-1).long(), d["pos"], d["neg"])
