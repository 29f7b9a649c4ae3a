"""The collectives run as NCCL would accept them.

No GPU here, so two gloo processes pretend to have CUDA: ``setup()`` sees a CUDA device, the
backend it asks ``init_process_group`` for is recorded (the real group is gloo), and every
tensor collective is checked against NCCL's rule before it runs: a backend takes tensors
only on the device types it serves (NCCL: CUDA; gloo: CPU; "cpu:gloo,cuda:nccl": both, each
on its own backend). A CPU control tensor sent through an NCCL-only group, the crash of the
first multi-GPU step, is rejected here as NCCL would reject it.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from .conftest import REPO
from .ranks import free_port

TENSOR_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce",
                      "reduce_scatter_tensor", "all_to_all_single", "gather", "scatter")


def served_device_types(backend: str) -> set[str]:
    """NCCL reduces CUDA tensors only, gloo CPU tensors (torch.distributed docs, 'Backends')."""
    pairs = [p.split(":") for p in backend.lower().split(",")] if ":" in backend else [("", backend.lower())]
    return {dev or {"nccl": "cuda", "gloo": "cpu"}[name] for dev, name in pairs}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)


def _fake_cuda_rank(rank: int, port: int, out) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch.distributed as dist

    requested: dict = {}
    calls: list = []
    real_init = dist.init_process_group

    def init_process_group(backend=None, **kw):
        requested["backend"] = str(backend)
        real_init(backend="gloo", **kw)

    def guard(name):
        real = getattr(dist, name)

        def checked(*args, **kw):
            served = served_device_types(requested["backend"])
            for t in _tensors([*args, *kw.values()]):
                if t.device.type not in served:
                    raise RuntimeError(f"{name}: backend {requested['backend']!r} rejects a "
                                       f"{t.device.type} tensor")
            calls.append(name)
            return real(*args, **kw)

        setattr(dist, name, checked)

    dist.init_process_group = init_process_group
    dist.get_backend = lambda group=None: requested["backend"]
    for name in TENSOR_COLLECTIVES:
        guard(name)
    torch.cuda.is_available = lambda: True
    torch.cuda.set_device = lambda device: None
    torch.cuda.current_device = lambda: rank

    from stream_pml import distributed

    try:
        info = distributed.setup("auto")
        result = {
            "backend": requested["backend"], "device": str(info.device), "grouped": info.grouped,
            "min": distributed.all_reduce_min(5 - rank),
            "flags": distributed.all_reduce_flags(rank == 1, False),
            "gathered": distributed.gather_to_main({"rank": rank}),
            "broadcast": distributed.broadcast_from_main(f"from {rank}"),
            "sum": [float(v) for v in distributed.all_reduce_sum(torch.tensor(1.5 + rank), torch.tensor(2.0))],
            "cat": distributed.all_gather_cat(torch.arange(3) + 10 * rank).tolist(),
        }
        distributed.barrier()
        result["calls"] = sorted(set(calls))
        out[rank] = result
        distributed.teardown()
    except Exception as exc:  # the parent reports it
        out[rank] = {"error": f"{type(exc).__name__}: {exc}"}


@pytest.mark.slow
def test_collectives_are_accepted_by_the_backend_of_their_tensors():
    import torch.multiprocessing as mp

    out = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_fake_cuda_rank, args=(free_port(), out), nprocs=2, start_method="spawn")
    for rank in range(2):
        result = out[rank]
        assert "error" not in result, result["error"]
        assert "nccl" in result["backend"] and "cuda" in served_device_types(result["backend"]), \
            "CUDA tensors (DDP's gradients) travel over NCCL"
        assert result["device"] == f"cuda:{rank}" and result["grouped"]
        assert result["min"] == 4 and result["flags"] == [True, False]
        assert result["gathered"] == ([{"rank": 0}, {"rank": 1}] if rank == 0 else None)
        assert result["broadcast"] == "from 0"
        assert result["sum"] == [4.0, 4.0]
        assert result["cat"] == [0, 1, 2, 10, 11, 12]
        assert {"all_reduce", "all_gather_into_tensor"} <= set(result["calls"]), "the checks ran"


def test_the_recorder_rejects_what_nccl_rejects():
    assert served_device_types("nccl") == {"cuda"}
    assert served_device_types("gloo") == {"cpu"}
    assert served_device_types("cpu:gloo,cuda:nccl") == {"cpu", "cuda"}


def test_distributed_py_is_the_only_module_that_calls_torch_distributed():
    pattern = re.compile(r"torch\.distributed|from torch import distributed|import torch\.distributed")
    offenders = [str(p.relative_to(REPO)) for folder in ("stream_pml", "shard_tools")
                 for p in sorted((REPO / folder).rglob("*.py"))
                 if p != REPO / "stream_pml" / "distributed.py" and pattern.search(p.read_text())]
    assert offenders == []


def test_without_a_group_collectives_are_local():
    from stream_pml import distributed

    assert distributed.all_reduce_min(3) == 3
    assert distributed.all_reduce_flags(True, False) == [True, False]
    assert distributed.gather_to_main("x") == ["x"] and distributed.broadcast_from_main("y") == "y"
    t = torch.arange(4.0)
    assert torch.equal(distributed.all_gather_cat(t), t)
    assert [float(v) for v in distributed.all_reduce_sum(torch.tensor(2.0))] == [2.0]

