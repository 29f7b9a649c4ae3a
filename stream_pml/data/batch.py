"""What a loader yields, whatever the backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Batch:
    """One batch. Images stay uint8 so the loader does no float work; :func:`normalize`
    runs on the training device (measured: about 2x CPU loader throughput)."""

    images_BCHW: torch.Tensor  # uint8
    rows_B: torch.Tensor  # int64 global row ids
    pos_BP: torch.Tensor  # int32 observed positive class ids, padded with -1
    neg_BN: torch.Tensor  # int32 observed negative class ids, padded with -1

    @property
    def size(self) -> int:
        return int(self.rows_B.shape[0])

    def to(self, device: torch.device) -> "Batch":
        nb = device.type == "cuda"
        return Batch(*(t.to(device, non_blocking=nb) for t in
                       (self.images_BCHW, self.rows_B, self.pos_BP, self.neg_BN)))


def normalize(images_BCHW: torch.Tensor, channels_last: bool = False,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """ImageNet normalisation of uint8 images to float32: (x - 255 mean) / (255 std).

    One conversion pass and two in-place passes (x * scale + bias): 2.6x faster on CPU
    than the subtract-then-divide form, which allocates two more batch-sized temporaries.
    On CPU the passes run one image at a time, so an image's 2.4 MB of float stay in cache
    between them (0.48 against 0.80 ms per 448 image, measured). ``out``: a float32 tensor
    of the same shape to write into (see :class:`Normalizer`).
    """
    std = torch.tensor(IMAGENET_STD, device=images_BCHW.device).view(3, 1, 1) * 255
    mean = torch.tensor(IMAGENET_MEAN, device=images_BCHW.device).view(3, 1, 1) * 255
    scale, bias = 1.0 / std, -mean / std
    if out is None:
        out = _float_like(images_BCHW, channels_last)
    if out.device.type != "cpu":  # one kernel per pass over the whole batch
        return out.copy_(images_BCHW).mul_(scale).add_(bias)
    for out_CHW, image_CHW in zip(out, images_BCHW):
        out_CHW.copy_(image_CHW).mul_(scale).add_(bias)
    return out


def _float_like(images_BCHW: torch.Tensor, channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(images_BCHW.shape, dtype=torch.float32, device=images_BCHW.device, memory_format=fmt)


class Normalizer:
    """:func:`normalize` into one output buffer reused across calls, on CPU.

    A fresh float batch (77 MB at 32 x 3 x 448 x 448) is a fresh mmap: its page faults and
    the kernel's zeroing cost more than the arithmetic (measured per 448 image on one core:
    2.5 ms fresh, 0.48 ms into a reused buffer). The result is overwritten by the next call,
    so it must be consumed first, as a training or evaluation step does. On GPUs the
    caching allocator already reuses memory, so no buffer is kept.
    """

    def __init__(self, channels_last: bool = False):
        self.channels_last = channels_last
        self._out: torch.Tensor | None = None

    def __call__(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        if images_BCHW.device.type != "cpu":
            return normalize(images_BCHW, self.channels_last)
        if self._out is None or self._out.shape != images_BCHW.shape:
            self._out = _float_like(images_BCHW, self.channels_last)
        return normalize(images_BCHW, out=self._out)


def dense_labels(pos_BP: torch.Tensor, neg_BN: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets (B, C) float and known (B, C) bool from padded id lists; O(B x C)."""
    batch = pos_BP.shape[0]
    device = pos_BP.device
    targets = torch.zeros(batch, num_classes + 1, device=device)
    known = torch.zeros(batch, num_classes + 1, dtype=torch.bool, device=device)
    # Padding (-1) is routed to a spare last column that is cut off afterwards.
    pos = torch.where(pos_BP < 0, num_classes, pos_BP).long()
    neg = torch.where(neg_BN < 0, num_classes, neg_BN).long()
    targets.scatter_(1, pos, 1.0)
    known.scatter_(1, pos, True)
    known.scatter_(1, neg, True)
    return targets[:, :num_classes], known[:, :num_classes]
