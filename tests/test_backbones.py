"""timm backbones beside torchvision's: the multi-label head, weights from a local file only
(a missing or mismatched file is one line), channels_last and torch.compile, and a timm run
that resumes bitwise."""

from __future__ import annotations

import pytest
import torch

from stream_pml import checkpoint as ckpt
from stream_pml.model import ModelConfig, WeightsError, build_model
from stream_pml.train import main

from .conftest import tiny_overrides
from .test_resume import _assert_same_run

timm = pytest.importorskip("timm", reason="timm is in the dev extra; without it timm backbones are refused")

TIMM = "timm:test_convnext"  # timm's own tiny test network: a ConvNeXt of 0.3M weights


def _timm_file(tmp_path, name="test_convnext", suffix=".safetensors"):
    """ImageNet-shaped weights (1000-class head) as a timm hub repo's file holds them."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    net = timm.create_model(name, pretrained=False)
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": net.state_dict()}, path)
    return path, net.state_dict()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_weights_load_from_a_local_file_and_the_head_is_new(tmp_path, suffix):
    path, ref = _timm_file(tmp_path, suffix=suffix)
    model = build_model(ModelConfig(arch=TIMM, pretrained=str(path)), num_classes=601)
    assert model.get_classifier().out_features == 601
    state = model.state_dict()
    backbone = [k for k in ref if not k.startswith("head.fc.")]
    assert backbone and all(torch.equal(state[k], ref[k]) for k in backbone)
    assert state["head.fc.weight"].shape == (601, ref["head.fc.weight"].shape[1])
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 601)


def test_torchvision_weights_load_from_safetensors(tmp_path):
    from safetensors.torch import save_file
    import torchvision

    torch.manual_seed(2)
    net = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    path = tmp_path / "mnv3.safetensors"
    save_file(net.state_dict(), str(path))
    model = build_model(ModelConfig(arch="mobilenet_v3_small", pretrained=str(path)), num_classes=5)
    assert torch.equal(model.state_dict()["features.0.0.weight"], net.state_dict()["features.0.0.weight"])
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 5)


def test_a_mismatched_or_missing_weights_file_is_one_line(tmp_path, digits_shards, capsys):
    vit, _ = _timm_file(tmp_path, name="test_vit")
    with pytest.raises(WeightsError, match=r"does not fit timm:test_convnext: .* missing \(first: stem"):
        build_model(ModelConfig(arch=TIMM, pretrained=str(vit)), num_classes=3)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    for path, expected in ((vit, "model error: model.pretrained: "), (junk, "is not a readable safetensors"),
                           (tmp_path / "absent.pth", "config error: ")):
        rc = main(tiny_overrides(digits_shards, tmp_path / "run", **{"model.arch": TIMM,
                                                                      "model.pretrained": path}))
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and expected in err[0], err
    assert "does not exist" in err[0]


def test_unknown_timm_name_is_refused_with_the_key():
    from stream_pml.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.arch: 'no_such_net' is not a timm model"):
        load_config(None, ["model.arch=timm:no_such_net"])


@pytest.mark.parametrize("arch", [TIMM, "mobilenet_v3_small"])
def test_channels_last_and_compile_trace_forward_and_backward(arch):
    """channels_last (what CUDA runs use) and torch.compile's graph capture with AOT
    autograd (the compiler backend itself is the device's)."""
    torch.manual_seed(0)
    # eval: dropout off and BatchNorm's statistics fixed, so both calls compute the same function.
    model = build_model(ModelConfig(arch=arch), num_classes=4).to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    out = compiled(x)
    out.sum().backward()
    assert out.shape == (2, 4) and torch.allclose(out, eager, atol=1e-5)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
def test_a_timm_run_trains_and_resumes_bitwise(digits_shards, tmp_path, monkeypatch):
    from stream_pml.trainer import Trainer

    run_cfg = {"model.arch": TIMM, "train.checkpoint_every": 1, "train.keep_checkpoints": 50,
               "loss.name": "pml", "data.label_setting": "pal", "data.label_ratio": 0.5, "train.ema_decay": 0.9}
    reference = tmp_path / "reference"
    assert main(tiny_overrides(digits_shards, reference, **run_cfg)) == 0

    class Killed(BaseException):
        pass

    real = Trainer.save_checkpoint

    def once_then_die(self):
        path = real(self)
        if self.step == 1:
            raise Killed("killed after the first step's checkpoint")
        return path

    run = tmp_path / "run"
    monkeypatch.setattr(Trainer, "save_checkpoint", once_then_die)
    with pytest.raises(Killed):
        main(tiny_overrides(digits_shards, run, **run_cfg))
    monkeypatch.setattr(Trainer, "save_checkpoint", real)
    assert [int(ckpt.PATTERN.match(p.name).groups()[-1]) for p in ckpt.list_checkpoints(run)] == [1]
    assert main(tiny_overrides(digits_shards, run, **run_cfg)) == 0
    _assert_same_run(reference, run)
    # The trained timm model exports, and its files rebuild it in a process with timm only.
    from stream_pml.cli import main as cli

    assert cli(["export", "--checkpoint", str(run), "--out", str(tmp_path / "export")]) == 0
    meta = (tmp_path / "export" / "model.json").read_text()
    assert '"arch": "timm:test_convnext"' in meta and "timm.create_model('test_convnext'" in meta


def test_two_headed_and_convolution_headed_timm_models_load_their_backbone(tmp_path):
    """A distilled ViT's two classifiers are both replaced; DLA's classifier is a 1x1
    convolution; a file without BatchNorm's step counters (saved before torch 1.0) loads."""
    from safetensors.torch import save_file

    for name in ("deit_tiny_distilled_patch16_224", "dla34"):
        net = timm.create_model(name, pretrained=False)
        state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        model = build_model(ModelConfig(arch=f"timm:{name}", pretrained=str(path)), num_classes=7).eval()
        own = model.state_dict()
        heads = net.pretrained_cfg["classifier"]
        heads = (heads,) if isinstance(heads, str) else heads
        kept = [k for k in state if not any(k.startswith(h + ".") for h in heads)]
        assert kept and all(torch.equal(own[k], state[k]) for k in kept)
        size = 224 if "deit" in name else 64
        assert model(torch.zeros(1, 3, size, size)).shape == (1, 7)
