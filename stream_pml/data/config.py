"""Configuration of the data path (shards, image size, loader backend)."""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

# auto: DALI when CUDA is present, else the torch-native backend, which measured faster on
# CPU-only machines (BENCHMARKS.md); both are tested.
BACKENDS = ("auto", "dali", "device", "torch")
DALI_SOURCES = ("auto", "reader", "external")


@dataclass
class DataConfig:
    # Directory holding manifest.json, or a URL (s3://, gs://, http(s)://, file://) whose
    # shards are read through the node-local cache below (docs/distributed.md#remote-shards).
    shards: str = "data/digits"
    # Node-local cache of remote shards (shared by the node's processes); empty = a
    # stream-pml folder in the user's cache directory.
    cache_dir: str = ""
    cache_limit: str = "200GB"  # never more bytes than this in the cache (e.g. 500GiB)
    prefetch_shards: int = 2  # shards downloaded ahead of the one being read
    download_retries: int = 4  # transient errors (5xx, resets, short or altered bodies)
    download_timeout_s: float = 600.0  # per shard download attempt
    fsspec: Dict[str, Any] = field(default_factory=dict)  # extra fsspec options (endpoint_url, ...)
    train_split: str = "train"
    # Evaluated each epoch; the best epoch by its mAP is kept (never chosen on test).
    # Empty: no selection, the last epoch's model is the result.
    val_split: str = "val"
    # Evaluated once, at the end, with the selected model. Empty: no test evaluation.
    test_split: str = "test"
    image_size: int = 448
    batch_size: int = 64
    eval_batch_size: int = 128
    flip: bool = True
    # Who decodes: "dali" (DALI, on the GPU), "device" (torchvision's decode_jpeg on the
    # training device: nvJPEG on CUDA, for GPUs without a matching DALI), "torch" (CPU
    # threads), "auto": dali where it runs on this GPU, else device; torch without CUDA.
    backend: str = "auto"
    # How DALI gets the samples: "reader" (its readers.webdataset opens the shard files;
    # it stops at the first corrupt JPEG and waits for a remote epoch's every shard),
    # "external" (read in Python in the torch backend's order, decoded by DALI; corrupt
    # samples skipped and reported, remote shards streamed through the cache), "auto":
    # external (as fast as the reader on local disk, BENCHMARKS.md).
    dali_source: str = "auto"
    # Decode threads (DALI and torch backends) per training process; 0 = the cores
    # divided by the local processes.
    num_threads: int = 0
    # DALI's shuffle buffer (samples); shards are already shuffled at build time.
    shuffle_buffer: int = 512
    prefetch_depth: int = 2
    # Rows per piece of the epoch deal, which is also the pseudo-label store's chunk
    # (data/deal.py); 0 = data.batch_size, so no rank leaves out more than one batch an epoch.
    piece_rows: int = 0
    # Unreadable samples (corrupt JPEG, truncated shard) a rank skips in one epoch before the
    # run stops; each is reported with its shard and byte offset (torch backend; DALI stops
    # at the first).
    max_bad_samples: int = 10
    # Label setting applied to the training split (docs/method.md#label-settings): fal, pal, ppl, spl.
    label_setting: str = "fal"
    label_ratio: Optional[float] = None
    label_seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"data.backend: {self.backend!r} is not one of {BACKENDS}")
        if self.dali_source not in DALI_SOURCES:
            raise ValueError(f"data.dali_source: {self.dali_source!r} is not one of {DALI_SOURCES}")
        if self.max_bad_samples < 0:
            raise ValueError(f"data.max_bad_samples must be >= 0, got {self.max_bad_samples}")
        if self.prefetch_shards < 0 or self.download_retries < 0 or self.download_timeout_s <= 0:
            raise ValueError("data.prefetch_shards and data.download_retries must be >= 0, "
                             "data.download_timeout_s > 0")
        from .cache import parse_size

        try:
            parse_size(self.cache_limit)  # a typo is said now, naming the value
        except ValueError as exc:
            raise ValueError(f"data.cache_limit: {exc}") from None
        if self.piece_rows < 0:
            raise ValueError(f"data.piece_rows must be >= 0 (0 = data.batch_size), got {self.piece_rows}")
        for name in ("image_size", "batch_size", "eval_batch_size", "prefetch_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.label_setting not in ("fal", "pal", "ppl", "spl"):
            raise ValueError(f"data.label_setting: {self.label_setting!r} is not one of fal, pal, ppl, spl")
        if self.label_setting in ("pal", "ppl") and self.label_ratio is None:
            raise ValueError(f"data.label_ratio must be set for label_setting={self.label_setting}")
        if self.label_ratio is not None and not 0.0 < self.label_ratio <= 1.0:
            raise ValueError(f"data.label_ratio must be in (0, 1], got {self.label_ratio}")
