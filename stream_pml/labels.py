"""Label settings (METHOD.md): FAL, PAL_x, PPL_x, SPL, made once from full labels, seeded.

A setting is an int8 (N, C) matrix: 1 positive, 0 negative, -1 unknown. Its hash is stored
with the run so a result can always be traced to the exact mask it was trained with.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

SETTINGS = ("fal", "pal", "ppl", "spl")
DEFAULT_SEEDS = {"fal": 0, "pal": 0, "ppl": 0, "spl": 1200}
UNKNOWN = -1


def _one_positive_each(full: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(rows with a positive, the uniformly chosen positive of each)."""
    keys = rng.random(full.shape)
    keys[full != 1] = -1.0
    has_pos = (full == 1).any(axis=1)
    return np.nonzero(has_pos)[0], keys.argmax(axis=1)[has_pos]


def make_partial(full: np.ndarray, setting: str, ratio: float | None = None,
                 seed: int | None = None) -> np.ndarray:
    """Partial labels from a full 0/1 matrix (N, C); see METHOD.md "Label settings".

    - ``fal``: everything known.
    - ``pal``: each entry kept independently with probability ``ratio`` (u < ratio).
    - ``ppl``: negatives dropped; one positive kept per image that has one, every other
      positive kept with probability r = max(0, (x P - I) / (P - I)) so the expected share
      of positives kept is ``ratio`` (P positives, I images with a positive).
    - ``spl``: one positive per image, everything else unknown (seed 1200, Cole et al. 2021).
    """
    if setting not in SETTINGS:
        raise ValueError(f"label setting {setting!r} is not one of {SETTINGS}")
    full = np.asarray(full)
    if not np.isin(full, (0, 1)).all():
        raise ValueError("make_partial needs a full label matrix of 0/1")
    seed = DEFAULT_SEEDS[setting] if seed is None else seed
    rng = np.random.default_rng(seed)
    full = full.astype(np.int8)
    if setting == "fal":
        return full.copy()
    if setting in ("pal", "ppl") and (ratio is None or not 0.0 < ratio <= 1.0):
        raise ValueError(f"setting {setting} needs a ratio in (0, 1], got {ratio}")
    if setting == "pal":
        return np.where(rng.random(full.shape) < ratio, full, np.int8(UNKNOWN)).astype(np.int8)
    out = np.full(full.shape, UNKNOWN, dtype=np.int8)
    rows, cols = _one_positive_each(full, rng)
    if setting == "ppl":
        num_pos, num_img = int(full.sum()), len(rows)
        r = max(0.0, (ratio * num_pos - num_img) / (num_pos - num_img)) if num_pos > num_img else 0.0
        keep = (full == 1) & (rng.random(full.shape) < r)
        out[keep] = 1
    out[rows, cols] = 1
    return out


def setting_hash(partial: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(partial.shape).encode())
    h.update(np.ascontiguousarray(partial, dtype=np.int8).tobytes())
    return h.hexdigest()[:16]


def read_split_labels(shard_dir: Path | str, split: str, num_classes: int) -> np.ndarray:
    """The observed labels of a built split as int8 (N, C): 1 / 0 / -1."""
    path = Path(shard_dir) / f"{split}.labels.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; rebuild the shards with this version of shard-tools")
    z = np.load(path)
    num_rows = len(z["pos_indptr"]) - 1
    out = np.full((num_rows, num_classes), UNKNOWN, dtype=np.int8)
    for name, value in (("neg", 0), ("pos", 1)):
        indptr, indices = z[f"{name}_indptr"], z[f"{name}_indices"]
        rows = np.repeat(np.arange(num_rows), np.diff(indptr))
        out[rows, indices] = value
    return out


class LabelTable:
    """Per-row observed labels of the training split under a label setting, for batches."""

    def __init__(self, partial_NC: np.ndarray):
        self.partial_NC = torch.from_numpy(np.ascontiguousarray(partial_NC, dtype=np.int8))
        self.hash = setting_hash(partial_NC)

    def batch(self, rows_B: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets (B, C) float, known (B, C) bool) of these rows."""
        part = self.partial_NC[rows_B.cpu()].to(device)
        return (part == 1).float(), part >= 0

    def ids(self, rows_B: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded (-1) positive and negative class ids of these rows, like a loader batch."""
        part = self.partial_NC[rows_B.cpu()]
        return _padded_ids(part == 1).to(device), _padded_ids(part == 0).to(device)


def _padded_ids(mask_BC: torch.Tensor) -> torch.Tensor:
    counts = mask_BC.sum(1)
    width = max(int(counts.max()) if len(counts) else 0, 0)
    # Stable sort puts the True columns first in ascending class order.
    order = torch.sort((~mask_BC).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width)[None, :] < counts[:, None]
    return torch.where(valid, order, torch.full_like(order, -1)).to(torch.int32)
