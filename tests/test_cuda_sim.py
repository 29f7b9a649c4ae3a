"""The training step's hot path on simulated CUDA, in CI without a GPU (``-m cuda_sim``).

``FakeTensorMode`` gives ``cuda:0`` tensors that carry shapes, dtypes and devices but no data:
every op checks its devices as a GPU would, so a CPU tensor mixed into a CUDA computation
fails here as it would on the first GPU. Modules are built under ``torch.device("cuda")``
(an existing module cannot be moved into the mode); the code under test runs outside that
context, so a tensor it makes without ``device=`` is a CPU tensor, as in a real run.
Backward does not run on fake tensors: these are forward paths.

:class:`HostSyncs` sits inside the fake mode and answers, and counts by call site, every op
that would make the host wait for the GPU: a scalar read (``.item()``, ``float()``,
``bool()``, ``.tolist()``), a copy to the CPU, and ops whose output size depends on the data
(``nonzero``, boolean indexing, ``bincount``). ``test_the_step_has_only_its_known_host_syncs``
is the guard: a new sync in the step fails it, naming the line.
"""

from __future__ import annotations

import collections
import traceback
import warnings

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from stream_pml.data.batch import Batch, Normalizer, dense_labels
from stream_pml.losses import LOSSES, get_loss

pytestmark = pytest.mark.cuda_sim

B, C = 4, 7
aten = torch.ops.aten


def _site() -> str:
    """The innermost frame of our own code: where the sync is written."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/stream_pml/" in frame.filename:
            return f"{frame.filename.split('/stream_pml/')[-1]}:{frame.name}"
    return "outside stream_pml"


class HostSyncs(TorchDispatchMode):
    """Counts (by kind and call site) and answers the ops that wait for the device."""

    def __init__(self):
        super().__init__()
        self.seen: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Host tensors (the label setting's CSR, numpy views) wait for nothing: answered, not counted.
        count = 1 if bool(args) and isinstance(args[0], torch.Tensor) and args[0].device.type == "cuda" else 0
        if func in (aten._local_scalar_dense.default, aten.is_nonzero.default):
            self.seen[("scalar read", _site())] += count
            dtype = args[0].dtype
            return True if dtype == torch.bool else 1 if not dtype.is_floating_point else 0.5
        if func is aten.nonzero.default:  # boolean masks and nonzero: as if every entry were set
            self.seen[("data-dependent size", _site())] += count
            mask = args[0]
            grids = torch.meshgrid(*[torch.arange(n, device=mask.device) for n in mask.shape], indexing="ij")
            return torch.stack([g.reshape(-1) for g in grids], dim=1)
        if func is aten.bincount.default:
            self.seen[("data-dependent size", _site())] += count
            minlength = kwargs.get("minlength", args[2] if len(args) > 2 else 0)
            return torch.zeros(minlength, dtype=torch.int64, device=args[0].device)
        if func is aten._to_copy.default and kwargs.get("device") is not None:
            src, dst = args[0].device, torch.device(kwargs["device"])
            if src.type == "cuda" and dst.type == "cpu":
                self.seen[("copy to host", _site())] += 1
        return func(*args, **kwargs)

    def sites(self) -> dict[str, int]:
        return {f"{kind} at {where}": n for (kind, where), n in sorted(self.seen.items()) if n}


DEV = torch.device("cuda", 0)


@pytest.fixture
def cuda():
    """Simulated CUDA: fake tensors, host syncs answered and counted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with FakeTensorMode(allow_non_fake_inputs=False):
            syncs = HostSyncs()
            with syncs:
                yield syncs


def _build(arch: str, num_classes: int = 7):
    from stream_pml.model import ModelConfig, build_model

    with torch.device("cuda"):
        return build_model(ModelConfig(arch=arch), num_classes)


def _labels():
    pos = torch.tensor([[0, 1], [2, -1], [-1, -1], [3, 4]], dtype=torch.int32, device=DEV)
    neg = torch.tensor([[5], [0], [1], [-1]], dtype=torch.int32, device=DEV)
    return pos, neg


def _loss_call(name: str, sparse: bool, logits, pos, neg):
    spec = LOSSES[name]
    loss = get_loss(name, **({"expected_positives": 1.5} if spec.uses_prior else {}))
    extra = {"stats": {}, "epoch": 2, "num_epochs": 3}
    if spec.uses_pseudo:
        extra["pseudo"] = torch.full((B, C), 0.5, device=DEV)
    if spec.uses_estimator:
        extra["estimates_BC"] = torch.rand(B, C, device=DEV)
    if sparse:
        return loss.sparse(logits, pos, neg, **extra)
    targets, known = dense_labels(pos, neg, C)
    return loss(logits, targets, known, **extra)


FORMS = [(n, False) for n in LOSSES] + [(n, True) for n, s in LOSSES.items() if s.sparse_fn is not None]


@pytest.mark.parametrize("name, sparse", FORMS, ids=[f"{n}-{'sparse' if s else 'dense'}" for n, s in FORMS])
def test_every_loss_runs_on_the_device(cuda, name, sparse):
    # bf16 logits, as autocast hands them to the loss: each loss computes in fp32.
    pos, neg = _labels()
    out = _loss_call(name, sparse, torch.randn(B, C, dtype=torch.bfloat16, device=DEV), pos, neg)
    assert out.device == torch.device("cuda", 0) and out.shape == () and out.dtype == torch.float32


def test_the_harness_catches_a_device_mix(cuda):
    """What every test here relies on: a CPU tensor in a CUDA op fails, as on a GPU."""
    logits = torch.randn(B, C, device=DEV)
    # FakeTensorDeviceMismatchError from torch 2.12 on, a plain RuntimeError before: same words.
    with pytest.raises(RuntimeError, match=r"devices.*cuda:0.*cpu|cuda:0 and cpu"):
        torch.stack([logits, torch.zeros(B, C)])  # no device=: the CPU, as in a real run


def test_batch_to_device_and_normalize(cuda):
    batch = Batch(torch.zeros(B, 3, 32, 32, dtype=torch.uint8, device="cpu"), torch.arange(B, device="cpu"),
                  *[t.to("cpu") for t in _labels()])
    on = batch.to(DEV)
    assert {t.device.type for t in (on.images_BCHW, on.rows_B, on.pos_BP, on.neg_BN)} == {"cuda"}
    x = Normalizer(channels_last=True)(on.images_BCHW)
    assert x.device.type == "cuda" and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    targets, known = dense_labels(on.pos_BP, on.neg_BN, C)
    assert targets.device.type == known.device.type == "cuda"


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "timm:test_convnext"])
def test_model_forward_in_bf16(cuda, arch):
    """autocast("cuda") switches itself off where torch sees no CUDA, so the model is built
    in bf16 outright: the same kernels' device and dtype rules as autocast's bf16 matmuls and
    convolutions. (A module cannot be converted inside the mode: channels_last is the input's.)"""
    if arch.startswith("timm:"):
        pytest.importorskip("timm")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = _build(arch, C)
    finally:
        torch.set_default_dtype(default)
    x = torch.randn(B, 3, 64, 64, dtype=torch.bfloat16, device=DEV).to(memory_format=torch.channels_last)
    logits = model(x)
    assert logits.shape == (B, C) and logits.device.type == "cuda" and logits.dtype == torch.bfloat16


def test_ema_update_on_the_device(cuda):
    from stream_pml.ema import WeightAverage

    model = _build("mobilenet_v3_small", C)
    # The constructor's deepcopy would make a second fake mode (not supported): built apart.
    ema = WeightAverage.__new__(WeightAverage)
    ema.decay, ema.updates = 0.99, 0
    ema.module = _build("mobilenet_v3_small", C).eval()
    ema.update(model)
    assert all(p.device.type == "cuda" for p in ema.module.parameters())


def test_pseudo_labels_and_label_setting_reach_the_device(tmp_path):
    """The store and the label setting live on the host (Zarr, CSR): what they hand the step
    is moved to the device in one copy each, and what comes back is one copy to the host."""
    from stream_pml.labels import PartialLabels
    from stream_pml.pseudo_store import PseudoConfig, PseudoLabelStore

    store = PseudoLabelStore(tmp_path / "p.zarr", num_rows=16, num_classes=C, chunk_rows=8,
                             identity={"run": "sim"}, cfg=PseudoConfig())
    full = (np.random.default_rng(0).random((16, C)) < 0.3).astype(np.int8)
    labels = PartialLabels.from_dense(full, "pal", 0.5, 0)
    rows = torch.arange(B)
    host_pseudo = store.read(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with FakeTensorMode(allow_non_fake_inputs=True):
            syncs = HostSyncs()
            with syncs:
                pseudo = host_pseudo.to(DEV, non_blocking=True)
                pos, neg = labels.ids(rows, DEV)
                logits = torch.randn(B, C, device=DEV)
                loss = get_loss("pml").sparse(logits, pos, neg, pseudo=pseudo, stats={}, epoch=1, num_epochs=2)
                # What the store's write does with the predictions (its numpy step has no
                # fake form): one copy to the host.
                moved = torch.sigmoid(logits.detach().float()).cpu()
    assert pseudo.device.type == pos.device.type == neg.device.type == loss.device.type == "cuda"
    assert moved.device.type == "cpu"
    # The label setting works on the host (the loader's rows are there): nothing to wait for.
    assert syncs.sites() == {**KNOWN_STEP_SYNCS, "copy to host at outside stream_pml": 1}


# The step's host syncs, by site: each is a decision, not an accident.
KNOWN_STEP_SYNCS = {
    # The entry list of the sampled unknown entries (nonzero) and its per-image count
    # (bincount): O(entries), docs/design.md#sparse-loss.
    "data-dependent size at losses/pml.py:_finish": 2,
    # observed_share, a Python float that sets the unknown weight.
    "scalar read at losses/pml.py:_finish": 1,
    # beta's share P/T as a Python float, and the logged statistics (alpha, beta, p2 share,
    # the known and pseudo parts): issue 33's note, left for a change that logs them as tensors.
    "scalar read at losses/pml.py:_combine": 4,
}


def test_the_step_has_only_its_known_host_syncs(cuda):
    """The step's device work as :meth:`Trainer.train_step` does it (labels already on the
    device, as the loader hands them), the default loss: a sync added anywhere fails here,
    naming its line. The trainer's own per-step reads (the finite-loss flag, the logged loss)
    come after the step's work is queued and are not counted here."""
    model = _build("mobilenet_v3_small", C)
    images = torch.zeros(B, 3, 64, 64, dtype=torch.uint8, device=DEV)
    pos, neg = _labels()
    pseudo = torch.full((B, C), 0.5, device=DEV)
    cuda.seen.clear()
    logits = model(Normalizer(channels_last=True)(images))
    loss = get_loss("pml").sparse(logits, pos, neg, pseudo=pseudo, stats={}, epoch=2, num_epochs=3)
    assert loss.device.type == "cuda"
    assert cuda.sites() == KNOWN_STEP_SYNCS
