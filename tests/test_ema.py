"""The weight average against a naive loop, and the average as the model a checkpoint serves."""

from __future__ import annotations

import pytest
import torch

from stream_pml.ema import WeightAverage


def test_the_average_follows_the_capped_decay_and_copies_integer_buffers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = WeightAverage(model, 0.95)
    naive = {k: v.clone() for k, v in model.state_dict().items()}
    for n in range(1, 40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(1.0)
            model[1].num_batches_tracked.add_(1)
        ema.update(model)
        d = min(0.95, (1 + n) / (10 + n))
        for k, v in model.state_dict().items():
            naive[k] = d * naive[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    got = ema.module.state_dict()
    for k in naive:
        assert torch.allclose(got[k], naive[k], atol=1e-6), k
    assert got["1.num_batches_tracked"] == 39
    assert not any(p.requires_grad for p in ema.module.parameters())
    again = WeightAverage(model, 0.95)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 39 and all(torch.equal(again.module.state_dict()[k], got[k]) for k in got)


@pytest.mark.parametrize("decay", [1.0, -0.1])
def test_a_decay_outside_the_unit_interval_is_refused(decay):
    with pytest.raises(ValueError, match="ema_decay"):
        WeightAverage(torch.nn.Linear(2, 2), decay)


def test_a_checkpoint_of_a_run_with_an_average_serves_the_average(tmp_path):
    from stream_pml.inference import load_model
    from stream_pml.model import ModelConfig, build_model

    model = build_model(ModelConfig(arch="mobilenet_v3_small"), 3)
    ema = WeightAverage(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    config = {"model": {"arch": "mobilenet_v3_small"}, "data": {"image_size": 32}}
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(),
                "run": {"config": config, "classes": ["a", "b", "c"]}}, tmp_path / "trainer.pt")
    loaded = load_model(tmp_path / "trainer.pt")
    want = ema.module.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.model.state_dict().items())
