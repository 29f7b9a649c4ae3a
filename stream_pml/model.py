"""Backbone (a torchvision classification model, or a timm model as ``timm:NAME``) with a
linear multi-label head of one logit per class, placed on its device and wrapped for
training. Weights come only from a local file (``model.pretrained``), never from a hub."""

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

TIMM_PREFIX = "timm:"


class WeightsError(ValueError):
    """A ``model.pretrained`` file that cannot be read or does not fit the architecture."""


@dataclass
class ModelConfig:
    # A torchvision classification model (resnet50, convnext_tiny, ...) or timm:NAME (a timm
    # model, e.g. timm:tresnet_m, timm:convnext_tiny; needs the timm extra).
    arch: str = "resnet50"
    # Local path to the backbone's weights, safetensors or a torch state dict (torchvision's
    # ImageNet files, the model.safetensors of a timm model); never downloaded. The file's
    # classifier is replaced by the multi-label head.
    pretrained: Optional[str] = None
    channels_last: bool = True  # used on CUDA only
    # Keyword arguments of the model's constructor, e.g. {drop_path_rate: 0.1} or, for a
    # timm ViT at 448 px with 224 px weights, {dynamic_img_size: true}.
    options: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.arch.startswith(TIMM_PREFIX):
            name = self.arch[len(TIMM_PREFIX):]
            try:
                import timm
            except ImportError:
                raise ValueError(f"model.arch: {self.arch} needs timm: pip install 'stream-pml[timm]'") from None
            if not timm.is_model(name):
                raise ValueError(f"model.arch: {name!r} is not a timm model (timm {timm.__version__}; "
                                 f"timm.list_models() lists them)")
        else:
            import torchvision

            if self.arch not in torchvision.models.list_models(module=torchvision.models):
                raise ValueError(f"model.arch: {self.arch!r} is not a torchvision classification model "
                                 f"(or write timm:NAME for a timm model)")
        if self.pretrained is not None and not Path(self.pretrained).is_file():
            raise ValueError(f"model.pretrained: {self.pretrained} does not exist")


def _last_linear(model: nn.Module) -> str:
    last_name = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name = name
    if last_name is None:
        raise ValueError(f"{type(model).__name__} has no linear classifier to replace")
    return last_name


def _replace_last_linear(model: nn.Module, num_classes: int) -> None:
    last_name = _last_linear(model)
    parent_name, _, attr = last_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, nn.Linear(old.in_features, num_classes))


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors or torch file (also one wrapped as {"state_dict": ...}
    or {"model": ...}, as training scripts save them)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: its own message, on one line
        raise WeightsError(f"model.pretrained: {path} is not a readable safetensors or torch weights file "
                           f"({str(exc).splitlines()[0][:200]})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"model.pretrained: {path} holds no state dict of tensors")
    return state


def load_backbone_weights(model: nn.Module, path: str, arch: str, heads: tuple[str, ...]) -> None:
    """Load every weight of ``model`` but its classifiers ``heads`` (module names) from the
    file; anything else missing, unexpected or of another shape is an error naming it.
    BatchNorm's step counters (``num_batches_tracked``) may be absent, as in files saved
    before torch 1.0: they only matter without a momentum."""
    in_head = lambda k: any(k.startswith(h + ".") for h in heads)  # noqa: E731
    state = {k: v for k, v in read_weights(path).items() if not in_head(k)}
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
             for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not in_head(k) and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if wrong or missing or unexpected:
        parts = [f"{len(wrong)} of another shape (first: {wrong[0]})" if wrong else "",
                 f"{len(missing)} missing (first: {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (first: {unexpected[0]})" if unexpected else ""]
        raise WeightsError(f"model.pretrained: {path} does not fit {arch}: "
                           + ", ".join(p for p in parts if p) + " of its weights")
    model.load_state_dict(state, strict=False)


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    if cfg.arch.startswith(TIMM_PREFIX):
        import timm

        model = timm.create_model(cfg.arch[len(TIMM_PREFIX):], pretrained=False, num_classes=num_classes,
                                  **cfg.options)
        classifier = model.pretrained_cfg.get("classifier") or _last_linear(model)
        # timm sized the classifier to num_classes (a linear layer, or a 1x1 convolution as
        # in DLA); distilled ViTs (DeiT, LeViT) have two heads, averaged at inference.
        heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        if cfg.pretrained:
            load_backbone_weights(model, cfg.pretrained, cfg.arch, heads)
        return model
    import torchvision

    model = torchvision.models.get_model(cfg.arch, weights=None, **cfg.options)
    if cfg.pretrained:  # the file's 1000-class head is left out: it is replaced anyway
        load_backbone_weights(model, cfg.pretrained, cfg.arch, (_last_linear(model),))
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
