"""How many threads a training process runs on the CPU (the thread plan).

Two kinds of threads share the cores a process owns (its CPU affinity divided by the local
processes, ``LOCAL_WORLD_SIZE``): the loader's decode threads, which work independently and
wait on I/O, and torch's intra-op team (OpenMP), whose threads meet at a barrier after every
parallel region, so a region is as slow as its slowest thread. Measured on the 2-core demo
(bench/contention.py, BENCHMARKS.md): with a team as large as the cores, one core taken by
other work made an epoch 19x slower (8.2 s -> 154 s), because a team member sharing a core
keeps the whole team waiting for its time slices thousands of times per step; a team of one
ran 11.9 s quiet and 11.9 s with the core taken. So the team gets half the owned cores
(decode, which runs concurrently with compute, gets them all: its threads never wait for
each other), and ``OMP_NUM_THREADS`` set by the user wins.
"""

from __future__ import annotations

import os


def owned_cores() -> int:
    """Cores this process may use: its affinity mask shared among the node's processes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def compute_threads() -> int:
    """The intra-op team: ``OMP_NUM_THREADS`` when the user set it, else half the owned cores."""
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, owned_cores() // 2)


def apply_plan() -> dict:
    """Set torch's intra-op team for this process; what was set, for run_info.json."""
    import torch

    torch.set_num_threads(compute_threads())
    return {"owned_cores": owned_cores(), "compute_threads": torch.get_num_threads()}
