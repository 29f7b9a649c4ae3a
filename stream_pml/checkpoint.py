"""Checkpoint directories in ``<run_dir>/checkpoints``, published atomically.

A checkpoint is a directory ``ckpt-eEEEE-sSSSSSSSSS`` holding ``trainer.pt`` (rank 0: the
states every rank shares, by key: run identity with the config, model, optimizer, scheduler,
estimator, progress), ``rank{r}.pt`` (each rank: stream position with the loader's own
checkpoint, random states) and each rank's pseudo-label journal; what goes in is registered
with :class:`~stream_pml.coordinator.Coordinator`. It is written
under a ``.tmp`` name, every file fsynced, then renamed: a crash leaves either the whole
checkpoint or a ``.tmp`` leftover that is ignored (and removed by the next save).
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

import torch

PATTERN = re.compile(r"^ckpt-e(\d+)-s(\d+)$")
RANK_PATTERN = re.compile(r"^rank(\d+)\.pt$")
MAIN_FILE = "trainer.pt"
RANK_FILE = "rank{rank}.pt"


class ResumeError(ValueError):
    """A run directory this run cannot continue: the message says why and what to do."""


def written_by(path: Path) -> int:
    """How many processes wrote this (published) checkpoint: one rank file each."""
    return sum(1 for f in Path(path).iterdir() if RANK_PATTERN.match(f.name))


def checkpoint_name(epoch: int, step: int) -> str:
    return f"ckpt-e{epoch:04d}-s{step:09d}"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tmp_dir(run_dir: Path, epoch: int, step: int) -> Path:
    return checkpoints_dir(run_dir) / (checkpoint_name(epoch, step) + ".tmp")


def save_file(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_best(run_dir: Path, state: dict) -> None:
    """``best.pt`` replaced whole: a crash leaves the previous best, never a partial file."""
    tmp = Path(run_dir) / "best.pt.tmp"
    save_file(tmp, state)
    tmp.replace(Path(run_dir) / "best.pt")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare(run_dir: Path, epoch: int, step: int) -> Path:
    """Fresh temporary directory for a checkpoint (rank 0, before the others write)."""
    tmp = tmp_dir(run_dir, epoch, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path) -> Path:
    final = tmp.with_name(tmp.name[: -len(".tmp")])
    if final.exists():  # the same step saved again (e.g. a signal right at an epoch end)
        shutil.rmtree(final)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    tmp.rename(final)
    _fsync_dir(final.parent)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Published checkpoints, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and PATTERN.match(p.name)]
    return sorted(found, key=lambda p: tuple(int(g) for g in PATTERN.match(p.name).groups()))


def writers(main: dict, path: Path) -> int:
    """How many processes wrote the checkpoint at ``path``: its ``trainer.pt`` says (older
    checkpoints: count its rank files)."""
    return main.get("world_size", written_by(path))


def load(path: Path, rank: int, world_size: int | None = None) -> tuple[dict, list[dict]]:
    """``trainer.pt`` and the per-rank states: this rank's alone when the checkpoint was
    written by ``world_size`` processes (or ``world_size`` is None), else every old rank's
    (a resume on another world size re-deals them)."""
    main = torch.load(path / MAIN_FILE, map_location="cpu", weights_only=False)
    n = writers(main, path)
    ranks = [rank] if world_size is None or n == world_size else range(n)
    return main, [torch.load(path / RANK_FILE.format(rank=r), map_location="cpu", weights_only=False)
                  for r in ranks]


def load_newest(run_dir: Path, rank: int, world_size: int | None = None) -> tuple[int, tuple[dict, list[dict]] | None]:
    """(index in :func:`list_checkpoints`, its loaded states) of the newest checkpoint this
    rank can load, or (-1, None). A damaged or partial one (a file missing or unreadable) is
    skipped with a warning naming it; one written by another number of processes is not."""
    ckpts = list_checkpoints(run_dir)
    for i in range(len(ckpts) - 1, -1, -1):
        try:
            return i, load(ckpts[i], rank, world_size)
        except Exception as exc:  # a truncated file raises from several layers
            warnings.warn(f"skipping unreadable checkpoint {ckpts[i]}: {type(exc).__name__}: {exc}")
    return -1, None


def set_aside(path: Path) -> Path:
    """Rename a checkpoint whose journal was rolled back to ``<name>.abandoned[-k]``: its
    timeline was given up, so it must never be listed, resumed or re-applied again, and is
    kept (not deleted) for whoever wants to look at it."""
    for k in range(1, 10_000):
        target = path.with_name(path.name + (".abandoned" if k == 1 else f".abandoned-{k}"))
        if not target.exists():
            path.rename(target)
            _fsync_dir(path.parent)
            warnings.warn(f"checkpoint {path.name} is newer than the one resumed from; set aside as "
                          f"{target.name}")
            return target
    raise RuntimeError(f"{path}: too many set-aside copies")


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints and the ``keep`` most recently set-aside ones
    (a run that resumes many times would otherwise fill its disk with them); remove
    leftovers of interrupted saves."""
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        aside = sorted((p for p in root.iterdir() if p.is_dir() and ".abandoned" in p.name),
                       key=lambda p: (p.stat().st_mtime_ns, p.name))
        for old in aside[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob("*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
