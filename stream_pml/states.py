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


# Config keys that may differ at resume: cadence, logging and throughput knobs that do not
# change what is trained, the data's location (its manifest fingerprint is still checked),
# and train.epochs (extending a run; the schedule follows the new total). The number of
# processes may change too (elastic.py). Anything else is refused, naming the key.
MAY_CHANGE_AT_RESUME = (
    "train.epochs", "train.checkpoint_every", "train.checkpoint_minutes", "train.eval_every", "train.log_every",
    "train.keep_checkpoints", "train.resume", "train.run_dir", "data.shards", "data.num_threads",
    "data.prefetch_depth", "data.max_bad_samples", "pseudo.max_pending_mb", "pseudo.cache_chunks",
    "pseudo.accept_lost_chunks",
)


def flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _schema_defaults() -> dict:
    from omegaconf import OmegaConf

    from .config import Config  # config imports the modules that import this one

    return flatten(OmegaConf.to_container(OmegaConf.structured(Config)))


class RunIdentity:
    """Checked first on resume: a checkpoint of another dataset, or of a run configured
    otherwise outside :data:`MAY_CHANGE_AT_RESUME`, is refused with the key that differs.
    After a load, ``changed`` maps each allowed key that differs to (old, new)."""

    def __init__(self, config: dict, world_size: int, manifest: str, classes: list[str]):
        self.config = config
        self.world_size = world_size
        self.manifest = manifest
        self.classes = classes
        self.changed: dict[str, tuple] = {}

    def state_dict(self) -> dict:
        return {"world_size": self.world_size, "manifest": self.manifest,
                "arch": self.config["model"]["arch"], "config": self.config, "classes": self.classes}

    def load_state_dict(self, state: dict) -> None:
        run_dir = self.config["train"]["run_dir"]
        if state["manifest"] != self.manifest:
            raise ResumeError(f"cannot resume {run_dir}: its shards' manifest is {state['manifest']!r}, these "
                              f"are {self.manifest!r} (another dataset or build; use a new train.run_dir)")
        then, now = flatten(state["config"]), flatten(self.config)
        defaults = _schema_defaults()
        self.changed = {}
        for key in sorted(set(then) | set(now)):
            old, new = then.get(key, "<absent>"), now.get(key, "<absent>")
            if old == new:
                continue
            # A key added to stream-pml after the run began, left at its default: new keys
            # default to the behaviour before them (train.ema_decay=0 is no average).
            if key not in then and key in defaults and new == defaults[key]:
                continue
            if key not in MAY_CHANGE_AT_RESUME:
                raise ResumeError(f"cannot resume {run_dir}: {key} was {old!r}, now {new!r}; at resume only "
                                  "the number of processes and the keys listed in docs/training.md#what-may-change-at-resume may "
                                  "change (use a new train.run_dir for another setting)")
            self.changed[key] = (old, new)


class RandomStates:
    """Every random generator one rank draws from."""

    def __init__(self, generator: torch.Generator, device: torch.device, reseed: Callable[[], int]):
        self.generator = generator
        self.device = device
        self.reseed = reseed  # a seed for this rank at the resumed step (another world size)

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

    def load_resharded(self, states: list[dict]) -> None:
        """Another world size: no old rank's generators belong to this rank; every generator
        is seeded from (seed, rank, step), so the resumed run is still reproducible."""
        seed = self.reseed()
        self.generator.manual_seed(seed)
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)


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

    def load_resharded(self, states: list[dict]) -> None:
        self.resume_at(None)  # the rest of the epoch is re-dealt: a new stream (elastic.py)


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
