"""Label settings (docs/method.md#label-settings): FAL, PAL_x, PPL_x, SPL, drawn per entry, seeded.

Every random choice is a counter-based hash of (seed, purpose, row, class), so any process
computes any row's partial labels from that row's positives alone, in O(classes): no rank
holds an (N, C) matrix, and the mask does not depend on which rows were asked for, in which
order, or on how many ranks ask. A partial label is 1 positive, 0 negative, -1 unknown.
Settings apply to fully labelled splits: a class not listed positive is a negative.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

SETTINGS = ("fal", "pal", "ppl", "spl")
DEFAULT_SEEDS = {"fal": 0, "pal": 0, "ppl": 0, "spl": 1200}
UNKNOWN = -1
# Part of every setting hash: a change of how masks are drawn changes every hash.
MASK_VERSION = "splitmix64-v1"
_KEEP, _CHOOSE = 1, 2  # purposes: keep an entry; choose an image's one positive


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele et al. 2014): a bijection of uint64 whose outputs pass
    BigCrush for counter inputs. uint64 array arithmetic wraps, as the algorithm wants."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def entry_uniform(seed: int, purpose: int, rows_B: np.ndarray, num_classes: int) -> np.ndarray:
    """Uniform [0, 1) float64 (B, C), one independent draw per (seed, purpose, row, class)."""
    stream = _splitmix64(np.array([(seed & (2**32 - 1)) << 8 | purpose], dtype=np.uint64))
    cells = (np.asarray(rows_B, dtype=np.uint64)[:, None] * np.uint64(num_classes)
             + np.arange(num_classes, dtype=np.uint64)[None, :])
    return (_splitmix64(cells ^ stream) >> np.uint64(11)).astype(np.float64) * 2.0**-53


class PartialLabels:
    """The training split's labels under a label setting, row by row (docs/method.md#label-settings):

    - ``fal``: everything known.
    - ``pal``: each entry kept independently with probability ``ratio``.
    - ``ppl``: negatives dropped; one positive kept per image that has one, every other
      positive kept with probability r = max(0, (x P - I) / (P - I)) so the expected share
      of positives kept is ``ratio`` (P positives, I images with a positive).
    - ``spl``: one positive per image, everything else unknown (seed 1200, Cole et al. 2021).

    Holds only the positives in CSR form (``pos_indptr`` (N + 1), ``pos_indices``).
    """

    def __init__(self, pos_indptr: np.ndarray, pos_indices: np.ndarray, num_classes: int, setting: str,
                 ratio: float | None = None, seed: int | None = None):
        if setting not in SETTINGS:
            raise ValueError(f"label setting {setting!r} is not one of {SETTINGS}")
        if setting in ("pal", "ppl") and (ratio is None or not 0.0 < ratio <= 1.0):
            raise ValueError(f"setting {setting} needs a ratio in (0, 1], got {ratio}")
        self.indptr = np.asarray(pos_indptr, dtype=np.int64)
        self.indices = np.asarray(pos_indices, dtype=np.int32)  # class ids
        self.num_rows, self.num_classes = len(self.indptr) - 1, num_classes
        self.setting, self.ratio = setting, ratio
        self.seed = DEFAULT_SEEDS[setting] if seed is None else seed
        num_pos, num_img = len(self.indices), int((np.diff(self.indptr) > 0).sum())
        self.ppl_rate = 0.0
        if setting == "ppl" and num_pos > num_img:
            self.ppl_rate = max(0.0, (ratio * num_pos - num_img) / (num_pos - num_img))
        h = hashlib.sha256(f"{MASK_VERSION} {setting} {ratio} {self.seed} {self.num_rows} {num_classes}".encode())
        h.update(self.indptr.tobytes())
        h.update(self.indices.tobytes())
        self.hash = h.hexdigest()[:16]

    @classmethod
    def from_split(cls, shard_dir: Path | str, split: str, num_classes: int, setting: str,
                   ratio: float | None = None, seed: int | None = None) -> "PartialLabels":
        with np.load(_labels_file(shard_dir, split)) as z:  # the positives only: O(positives)
            return cls(z["pos_indptr"], z["pos_indices"], num_classes, setting, ratio, seed)

    @classmethod
    def from_dense(cls, full_NC: np.ndarray, setting: str, ratio: float | None = None,
                   seed: int | None = None) -> "PartialLabels":
        full_NC = np.asarray(full_NC)
        if not np.isin(full_NC, (0, 1)).all():
            raise ValueError("a label setting needs a full label matrix of 0/1")
        rows, cols = np.nonzero(full_NC == 1)
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(full_NC)))])
        return cls(indptr, cols, full_NC.shape[1], setting, ratio, seed)

    def full(self, rows_B: np.ndarray) -> np.ndarray:
        """int8 (B, C): 1 where the row lists the class, else 0."""
        rows = np.asarray(rows_B, dtype=np.int64)
        starts = self.indptr[rows]
        counts = self.indptr[rows + 1] - starts  # O(batch): never a pass over all N rows
        out = np.zeros((len(rows), self.num_classes), dtype=np.int8)
        which = np.repeat(np.arange(len(rows)), counts)
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        out[which, self.indices[np.repeat(starts, counts) + offsets]] = 1
        return out

    def rows(self, rows_B: np.ndarray) -> np.ndarray:
        """int8 (B, C) partial labels of these rows: 1 / 0 / -1."""
        rows = np.asarray(rows_B, dtype=np.int64)
        full = self.full(rows)
        if self.setting == "fal":
            return full
        if self.setting == "pal":
            keep = entry_uniform(self.seed, _KEEP, rows, self.num_classes) < self.ratio
            return np.where(keep, full, np.int8(UNKNOWN)).astype(np.int8)
        out = np.full(full.shape, UNKNOWN, dtype=np.int8)
        if self.setting == "ppl" and self.ppl_rate > 0:
            out[(full == 1) & (entry_uniform(self.seed, _KEEP, rows, self.num_classes) < self.ppl_rate)] = 1
        keys = np.where(full == 1, entry_uniform(self.seed, _CHOOSE, rows, self.num_classes), -1.0)
        has_pos = full.any(axis=1)
        out[np.nonzero(has_pos)[0], keys.argmax(axis=1)[has_pos]] = 1
        return out

    def dense(self, block_rows: int = 1 << 16) -> np.ndarray:
        """The whole (N, C) matrix, built in row blocks (ROLE's estimator needs it; small sets)."""
        return np.concatenate([self.rows(np.arange(lo, min(lo + block_rows, self.num_rows)))
                               for lo in range(0, self.num_rows, block_rows)] or
                              [np.zeros((0, self.num_classes), np.int8)])

    def ids(self, rows_B: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded (-1) positive and negative class ids of these rows, like a loader batch."""
        part = torch.from_numpy(self.rows(rows_B.cpu().numpy()))
        return _padded_ids(part == 1).to(device), _padded_ids(part == 0).to(device)


def make_partial(full: np.ndarray, setting: str, ratio: float | None = None,
                 seed: int | None = None) -> np.ndarray:
    """Partial labels (N, C) int8 of a full 0/1 matrix under ``setting``: the dense form of
    :class:`PartialLabels` (the experiment harness's small feature sets)."""
    return PartialLabels.from_dense(full, setting, ratio, seed).dense()


def setting_hash(partial: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(partial.shape).encode())
    h.update(np.ascontiguousarray(partial, dtype=np.int8).tobytes())
    return h.hexdigest()[:16]


def read_split_labels(shard_dir: Path | str, split: str, num_classes: int) -> np.ndarray:
    """The observed labels of a built split as int8 (N, C): 1 / 0 / -1."""
    z = np.load(_labels_file(shard_dir, split))
    num_rows = len(z["pos_indptr"]) - 1
    out = np.full((num_rows, num_classes), UNKNOWN, dtype=np.int8)
    for name, value in (("neg", 0), ("pos", 1)):
        indptr, indices = z[f"{name}_indptr"], z[f"{name}_indices"]
        rows = np.repeat(np.arange(num_rows), np.diff(indptr))
        out[rows, indices] = value
    return out


def _labels_file(shard_dir: Path | str, split: str) -> Path:
    path = Path(shard_dir) / f"{split}.labels.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; rebuild the shards with this version of shard-tools")
    return path


def _padded_ids(mask_BC: torch.Tensor) -> torch.Tensor:
    counts = mask_BC.sum(1)
    width = max(int(counts.max()) if len(counts) else 0, 0)
    # Stable sort puts the True columns first in ascending class order.
    order = torch.sort((~mask_BC).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=mask_BC.device)[None, :] < counts[:, None]
    return torch.where(valid, order, torch.full_like(order, -1)).to(torch.int32)
