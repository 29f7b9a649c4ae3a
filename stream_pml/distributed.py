"""The process group and every collective of the package: the only module that calls
``torch.distributed``.

On CUDA the group is ``cpu:gloo,cuda:nccl``: tensors on the GPU (DDP's gradients, the
loss's batch statistics) travel over NCCL, small CPU control values (stop flags, the resumed
checkpoint's index) and pickled objects over gloo. NCCL accepts CUDA tensors only, so each
collective here puts its tensor on a device the group serves (:func:`_group_device`); that
also holds in a group someone else made NCCL-only. Without CUDA the group is gloo.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

CUDA_BACKEND = "cpu:gloo,cuda:nccl"


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        """A process group is up (also at world size 1, e.g. a GPU test): DDP and the
        collectives run through it."""
        return _group_up()


def setup(device_pref: str = "auto") -> DistInfo:
    """Device and process group of this process, from torchrun's environment."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available")
    if use_cuda:
        # Before the group: NCCL binds each process to the current device.
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        if (rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
                and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0):
            # Measured with torch 2.14 (gloo): the restarted group read the failed attempt's
            # addresses from torchrun's shared store and could not connect (pytorch#135712).
            warnings.warn("torchrun shares its rendezvous store with the workers, so a restarted group "
                          "may fail to connect: launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                          "(docs/distributed.md#elastic-restarts-and-another-world-size)", stacklevel=2)
        dist.init_process_group(backend=CUDA_BACKEND if use_cuda else "gloo")
    if _group_up():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world_size, local_rank, device)


def teardown() -> None:
    if _group_up():
        dist.destroy_process_group()


def _group_up() -> bool:
    return dist.is_available() and dist.is_initialized()


def _served_device_types() -> set[str]:
    """Device types the default group's backend takes tensors on.

    ``get_backend`` names one backend ("gloo", "nccl") or device:backend pairs
    ("cpu:gloo,cuda:nccl"). gloo and MPI reduce CPU tensors; NCCL only CUDA tensors.
    """
    name = str(dist.get_backend()).lower()
    if ":" in name:
        return {pair.split(":")[0].strip() for pair in name.split(",")}
    return {"cuda"} if name == "nccl" else {"cpu"}


def _group_device() -> torch.device:
    """Where a control tensor goes: the CPU if the group has a CPU backend, else this
    process's CUDA device."""
    if "cpu" in _served_device_types():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _on_group_device(t: torch.Tensor) -> torch.Tensor:
    return t if t.device.type in _served_device_types() else t.to(_group_device())


def world_size() -> int:
    return dist.get_world_size() if _group_up() else 1


def barrier() -> None:
    if _group_up():
        dist.barrier()


def gather_to_main(obj) -> list | None:
    """Every rank's ``obj`` in rank order on rank 0, None on the others (one copy, not one per
    rank: evaluation's predictions)."""
    if not _group_up():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj):
    """Rank 0's ``obj`` on every rank."""
    if not _group_up():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_min(value: int) -> int:
    if not _group_up():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_group_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def all_reduce_flags(*flags: bool) -> list[bool]:
    """Each flag true on any rank is true on all (one small collective per call)."""
    if not _group_up():
        return [bool(f) for f in flags]
    t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int64, device=_group_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def all_reduce_sum(*values: torch.Tensor) -> list[torch.Tensor]:
    """Scalars summed over ranks, in float64, on their own device where the group serves it
    (the loss's batch statistics stay on the GPU under NCCL); no-op without a group."""
    stacked = torch.stack([v.detach().double() for v in values])
    if _group_up():
        moved = _on_group_device(stacked)
        dist.all_reduce(moved)
        stacked = moved.to(stacked.device)
    return list(stacked.unbind())


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` concatenated along dim 0 in rank order (same shape on every rank);
    ``t`` itself without a group."""
    if not _group_up():
        return t
    src = _on_group_device(t.contiguous())
    out = torch.empty((dist.get_world_size() * src.shape[0], *src.shape[1:]), dtype=src.dtype,
                      device=src.device)
    dist.all_gather_into_tensor(out, src)
    return out.to(t.device)


class StopOnSignal:
    """Within the block, SIGTERM / SIGINT set ``received`` instead of killing the process,
    so the loop can finish its step, save a checkpoint and return. A second signal stops at
    once (a person pressing Ctrl-C twice does not want to wait for the step)."""

    def __init__(self) -> None:
        self.received = False
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received:
            print("second signal: stopping now, without a checkpoint (the newest one stays)",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = True
        if signum == signal.SIGINT:
            print("stopping after this step with a checkpoint; press Ctrl-C again to stop now",
                  file=sys.stderr, flush=True)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
