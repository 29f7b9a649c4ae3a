"""Atomic checkpoints in the run directory: write to a temporary name, fsync, rename."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

PATTERN = re.compile(r"^ckpt-e(\d+)-s(\d+)\.pt$")


def checkpoint_name(epoch: int, step: int) -> str:
    return f"ckpt-e{epoch:04d}-s{step:09d}.pt"


def save_checkpoint(run_dir: Path, state: dict, epoch: int, step: int, keep: int) -> Path:
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / checkpoint_name(epoch, step)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    dir_fd = os.open(ckpt_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (``.tmp`` leftovers of a crash are ignored)."""
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if PATTERN.match(p.name)]
    return sorted(found, key=lambda p: tuple(int(g) for g in PATTERN.match(p.name).groups()))


def load_latest(run_dir: Path) -> tuple[dict, Path] | None:
    """Newest checkpoint that loads; a corrupt one is skipped with a warning naming it."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return torch.load(path, map_location="cpu", weights_only=False), path
        except Exception as exc:  # a truncated file raises from several layers
            warnings.warn(f"skipping unreadable checkpoint {path}: {exc}")
    return None
