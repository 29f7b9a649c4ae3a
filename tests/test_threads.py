"""The thread plan: the intra-op team takes half the cores a process owns, the user's
OMP_NUM_THREADS wins, decode threads take every owned core."""

from __future__ import annotations

import os

import torch

from stream_pml import threads
from stream_pml.data.config import DataConfig
from stream_pml.data.loader import default_threads


def test_cores_are_shared_among_the_local_processes(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.owned_cores() == 4 and threads.compute_threads() == 2
    assert default_threads(DataConfig()) == 4 and default_threads(DataConfig(num_threads=3)) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")  # more processes than cores: one each
    assert threads.owned_cores() == 1 and threads.compute_threads() == 1


def test_the_users_omp_num_threads_wins_and_is_applied(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    try:
        assert threads.apply_plan()["compute_threads"] == 3 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
