"""Under DDP, pml's batch statistics (P, T) are summed over ranks: every rank gets one beta."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stream_pml.losses import get_loss
from stream_pml.losses.pml import PAPER_OPTIONS


def _batches():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 9, generator=g)
    targets = (torch.rand(2, 6, 9, generator=g) < 0.3).float()
    known = torch.rand(2, 6, 9, generator=g) < 0.5
    known[1] = known[1] & (targets[1] == 1)  # rank 1 sees no negative at all
    return logits, targets, known


def _worker(rank: int, port: int, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    logits, targets, known = _batches()
    stats: dict = {}
    get_loss("pml", **{**PAPER_OPTIONS, "q": 1.0})(logits[rank], targets[rank], known[rank], stats=stats)
    out[rank] = stats["beta"]
    dist.destroy_process_group()


@pytest.mark.slow
def test_beta_is_computed_from_all_ranks():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
    logits, targets, known = _batches()
    # q = 1: T = all entries of both ranks' batches, P = their observed positives.
    P = float((targets * known).sum())
    T = float(known.numel())
    assert out[0] == out[1] == pytest.approx(max(P / T, 0.05))
    # A single rank alone would have computed something else.
    alone: dict = {}
    get_loss("pml", **{**PAPER_OPTIONS, "q": 1.0})(logits[1], targets[1], known[1], stats=alone)
    assert alone["beta"] != pytest.approx(out[0])
