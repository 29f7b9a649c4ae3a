"""Backbone (any torchvision classification model) + a linear multi-label head, placed on
its device and wrapped for training."""

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn


@dataclass
class ModelConfig:
    arch: str = "resnet50"
    # Local path to torchvision ImageNet weights (state dict); never downloaded.
    pretrained: Optional[str] = None
    channels_last: bool = True  # used on CUDA only

    def __post_init__(self) -> None:
        import torchvision

        if self.arch not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"model.arch: {self.arch!r} is not a torchvision classification model")
        if self.pretrained is not None and not Path(self.pretrained).is_file():
            raise ValueError(f"model.pretrained: {self.pretrained} does not exist")


def _replace_last_linear(model: nn.Module, num_classes: int) -> None:
    last_name = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name = name
    if last_name is None:
        raise ValueError(f"{type(model).__name__} has no linear classifier to replace")
    parent_name, _, attr = last_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, nn.Linear(old.in_features, num_classes))


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    import torchvision

    model = torchvision.models.get_model(cfg.arch, weights=None)
    if cfg.pretrained:
        state = torch.load(cfg.pretrained, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"model.pretrained: {cfg.pretrained} does not fit {cfg.arch}: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    _replace_last_linear(model, num_classes)
    return model


def place_model(model: nn.Module, device: torch.device, *, channels_last: bool, compile_model: bool,
                ddp: bool, warn: bool) -> tuple[nn.Module, nn.Module]:
    """(the plain model on ``device``, what trains: under torch.compile and DDP when asked).

    Checkpoints and evaluation use the plain model, whose weights the wrappers share.
    """
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    wrapped = model
    if compile_model:
        if device.type != "cuda" and warn:
            warnings.warn("train.compile on CPU compiles for a CPU step; it pays off on CUDA")
        wrapped = torch.compile(model)
    if ddp:
        wrapped = nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    return model, wrapped


def settle_ddp_buckets(model: nn.Module, raw_model: nn.Module, images_BCHW: torch.Tensor,
                       use_amp: bool) -> None:
    """One backward on ``images_BCHW`` whose effects are all undone, so DDP lays out its
    gradient buckets before the first real step of this process.

    DDP reduces the first backward in one bucket in parameter order and the rest in buckets
    rebuilt from the order gradients became ready. Where a gradient sits in a bucket decides
    the order in which a ring all-reduce adds the ranks' values, and float addition of three
    or more values depends on that order: without this, a resumed process's first step would
    round differently from the same step of an uninterrupted run (measured with 4 ranks).
    Collective: every rank calls it at the same point.
    """
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return
    buffers = {name: b.clone() for name, b in raw_model.named_buffers()}  # BN statistics
    model.train()
    device = images_BCHW.device
    # Dropout draws from the global generators, which a resume has just restored.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(images_BCHW)
        logits.float().sum().backward()
    with torch.no_grad():
        for name, b in raw_model.named_buffers():
            b.copy_(buffers[name])
    raw_model.zero_grad(set_to_none=True)
