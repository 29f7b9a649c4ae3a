"""The small states a checkpoint holds beside model and optimizer, and the switch that makes
CUDA kernels deterministic.

- :class:`RunIdentity` (shared): what a resumed run must match, plus the config and class
  names that ``stream-pml`` reads from a checkpoint;
- :class:`RandomStates` (per rank): torch, CUDA, numpy and Python generators and the loss's
  own sampling generator;
- :class:`StreamPosition` (per rank): where the epoch's stream continues;
- :func:`use_deterministic_kernels`: ``train.deterministic``.
"""

from __future__ import annotations

import os
import random
from typing import Callable

import numpy as np
import torch

from .checkpoint import ResumeError


class RunIdentity:
    """Checked first on resume: a checkpoint of another world size, dataset, model or run
    length is refused with what differs."""

    def __init__(self, config: dict, world_size: int, manifest: str, classes: list[str]):
        self.config = config
        self.world_size = world_size
        self.manifest = manifest
        self.classes = classes

    def state_dict(self) -> dict:
        return {"world_size": self.world_size, "manifest": self.manifest,
                "arch": self.config["model"]["arch"], "config": self.config, "classes": self.classes}

    def load_state_dict(self, state: dict) -> None:
        run_dir = self.config["train"]["run_dir"]
        for key, mine in (("world_size", self.world_size), ("manifest", self.manifest),
                          ("arch", self.config["model"]["arch"])):
            if state[key] != mine:
                raise ResumeError(f"cannot resume from {run_dir}: the checkpoint's {key} is "
                                 f"{state[key]!r}, this run's is {mine!r} (use a new train.run_dir)")
        then, now = state["config"]["train"]["epochs"], self.config["train"]["epochs"]
        if then != now:
            raise ResumeError(f"cannot resume from {run_dir}: train.epochs was {then}, now {now}; the "
                             "learning-rate schedule and d are built for the run's length (use a new "
                             "train.run_dir)")


class RandomStates:
    """Every random generator one rank draws from."""

    def __init__(self, generator: torch.Generator, device: torch.device):
        self.generator = generator
        self.device = device

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        if state["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)


class StreamPosition:
    """A rank's place in the epoch's stream: the loader's own checkpoint (DALI's pipeline
    checkpoint, or the torch backend's position), None at an epoch boundary."""

    def __init__(self, current: Callable[[], str | None], resume_at: Callable[[str | None], None]):
        self.current = current
        self.resume_at = resume_at

    def state_dict(self) -> dict:
        return {"loader": self.current()}

    def load_state_dict(self, state: dict) -> None:
        self.resume_at(state["loader"])


def use_deterministic_kernels() -> None:
    """Deterministic kernels wherever torch has them, an error where it has none.

    CPU kernels already are; on CUDA, atomics (``index_add``, scatter-add, the backward of
    an index) and cuDNN's autotuned convolutions are not. cuBLAS needs a fixed workspace,
    read when its first handle is made, so this runs before any CUDA work. Sources: torch
    "Reproducibility" notes and ``torch.use_deterministic_algorithms``.
    """
    if torch.cuda.is_initialized() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        raise RuntimeError("train.deterministic must be set before CUDA starts (cuBLAS reads its "
                           "workspace setting once)")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
