"""GPU checks (``pytest -m gpu``; skipped without CUDA): an NCCL process group that rejects
CPU tensors, real training steps through DALI ``mixed`` decoding and torch's own GPU decode
(``data.backend=device``), bf16 autocast and
channels_last, and a run killed mid-epoch and resumed that ends bitwise equal to an
uninterrupted one under ``train.deterministic``.

CI has no GPU: these run through ``bench/gpu_check.sh`` on a device machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from stream_pml import checkpoint as ckpt
from stream_pml.losses.pml import PAPER_OPTIONS

from .conftest import tiny_overrides
from .ranks import free_port, run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _nccl_rank(port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    import torch.distributed as dist

    from stream_pml import distributed

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    result: dict = {}
    try:
        dist.all_reduce(torch.ones(1))  # a CPU tensor: NCCL must refuse it
        result["nccl_took_a_cpu_tensor"] = True
    except Exception:
        result["nccl_took_a_cpu_tensor"] = False
    info = distributed.setup("auto")
    result.update(
        grouped=info.grouped, device=str(info.device),
        min=distributed.all_reduce_min(7), flags=distributed.all_reduce_flags(True, False),
        objects=distributed.gather_to_main({"a": 1}), broadcast=distributed.broadcast_from_main(3),
        sum=[float(v) for v in distributed.all_reduce_sum(torch.tensor(2.5, device="cuda"),
                                                           torch.tensor(1.0, device="cuda"))],
        cat=distributed.all_gather_cat(torch.arange(3)).tolist())
    distributed.barrier()
    out["result"] = result
    distributed.teardown()


def test_collectives_run_on_an_nccl_only_group():
    import torch.multiprocessing as mp

    out = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_nccl_rank, args=(free_port(), out), nprocs=1, start_method="spawn")
    result = out["result"]
    assert result["nccl_took_a_cpu_tensor"] is False, "the check below could not fail"
    assert result["grouped"] and result["device"] == "cuda:0"
    assert result["min"] == 7 and result["flags"] == [True, False]
    assert result["objects"] == [{"a": 1}] and result["broadcast"] == 3
    assert result["sum"] == [2.5, 1.0] and result["cat"] == [0, 1, 2]


def _has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


# The device machine's image has no DALI (a 199 MB wheel, too large to carry there): the
# NCCL / bf16 / deterministic path is also checked with the torch backend.
NEEDS_DALI = pytest.mark.skipif(not _has_dali(), reason="nvidia-dali is not installed")


@NEEDS_DALI
def test_dali_mixed_decode_delivers_batches_on_the_gpu(digits_shards):
    from shard_tools.manifest import load_manifest, shard_paths
    from stream_pml.data.dali import DaliShardStream

    tars, idxs = shard_paths(digits_shards, load_manifest(digits_shards).splits["train"])
    stream = DaliShardStream(tars, idxs, image_size=64, batch_size=8, train=True, flip=True, seed=0,
                             num_threads=2)
    batch = next(iter(stream))
    assert batch.images_BCHW.device.type == "cuda"
    assert batch.images_BCHW.shape == (8, 3, 64, 64) and batch.images_BCHW.dtype == torch.uint8


@NEEDS_DALI
@pytest.mark.parametrize("source", [pytest.param("dali-external", marks=NEEDS_DALI), "device"])
def test_gpu_decoding_gives_the_torch_backends_batches(digits_shards, source):
    """DALI fed from Python, and data.backend=device (nvJPEG through torchvision, resized and
    flipped on the GPU): the torch backend's rows and labels, close pixels, uint8 images on the
    GPU; the device stream's batch is ready on the consumer's stream (read here without a
    synchronize) and carries its labels there too."""
    from shard_tools.manifest import load_manifest, shard_paths
    from stream_pml.data.dali_external import DaliExternalStream
    from stream_pml.data.device_decode import DeviceDecodeStream
    from stream_pml.data.torch_stream import TorchShardStream

    tars, idxs = shard_paths(digits_shards, load_manifest(digits_shards).splits["train"])
    kw = dict(image_size=64, batch_size=8, train=True, flip=True, seed=0, shuffle_buffer=8)
    cls = DaliExternalStream if source == "dali-external" else DeviceDecodeStream
    got = list(cls(tars, idxs, num_threads=2, **kw))
    ref = list(TorchShardStream(tars, idxs, num_workers=1, **kw))
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a.images_BCHW.device.type == "cuda" and a.images_BCHW.dtype == torch.uint8
        assert torch.equal(a.rows_B.cpu(), b.rows_B)
        assert (a.images_BCHW.cpu().float() - b.images_BCHW.float()).abs().mean() < 12
        if source == "device":
            assert a.rows_B.device.type == "cuda" and torch.equal(a.pos_BP.cpu(), b.pos_BP)
            assert (a.images_BCHW.float().mean() - b.images_BCHW.float().mean()).abs() < 12


def _argv(shards: Path, run: Path, backend: str) -> list[str]:
    return tiny_overrides(shards, run, **{
        "data.backend": backend, "data.image_size": 64, "model.arch": "resnet18",
        "model.channels_last": True, "train.amp": True, "train.deterministic": True,
        "train.epochs": 2, "train.checkpoint_every": 4, "train.device": "cuda",
        "data.label_setting": "pal", "data.label_ratio": 0.5, "loss.name": "pml",
        **{f"loss.params.{k}": v for k, v in PAPER_OPTIONS.items()}})


@pytest.mark.parametrize("backend", [pytest.param("dali", marks=NEEDS_DALI), "torch", "device"])
def test_killed_gpu_run_resumes_bitwise_equal_on_an_nccl_group(digits_shards, tmp_path, backend):
    import zarr

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert run_ranks(1, _argv(digits_shards, reference, backend), group_backend="nccl") == [0]
    info = json.loads((reference / "run_info.json").read_text())
    assert info["device"].startswith("cuda") and info["amp"] and info["deterministic"]
    # Epoch 2, batch 6: the newest checkpoint (step 16) is two steps behind, mid-epoch.
    assert run_ranks(1, _argv(digits_shards, killed, backend), stop_at=(2, 6), group_backend="nccl") == [-9]
    assert run_ranks(1, _argv(digits_shards, killed, backend), group_backend="nccl") == [0]
    states = [torch.load(ckpt.list_checkpoints(r)[-1] / ckpt.MAIN_FILE, map_location="cpu",
                         weights_only=False) for r in (reference, killed)]
    assert states[0]["progress"]["step"] == states[1]["progress"]["step"]
    for name, value in states[0]["model"].items():
        assert torch.equal(value, states[1]["model"][name]), name
    stores = [zarr.open_array(str(r / "pseudo_labels.zarr"), mode="r")[:] for r in (reference, killed)]
    assert np.array_equal(*stores) and (stores[0] != 127).any()


@pytest.mark.parametrize("normalize", ["ab", "weights", "none"])
def test_pml_loss_on_cuda_equals_the_cpu_loss(normalize):
    """Every normaliser's batch statistics stay on the batch's device (all_reduce_sum stacks
    them: one CPU scalar beside CUDA ones would fail) and give the CPU value."""
    from stream_pml.losses.pml import pml_loss_sparse

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 40, generator=gen)
    pos, neg = torch.randint(0, 40, (16, 3), generator=gen), torch.randint(-1, 40, (16, 8), generator=gen)
    kw = dict(epoch=3, num_epochs=10, normalize=normalize)  # q = 1: every unknown entry, no draw
    cpu = pml_loss_sparse(x, pos, neg, **kw)
    cuda = pml_loss_sparse(x.cuda(), pos.cuda(), neg.cuda(), **kw)
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-5, atol=1e-6)
