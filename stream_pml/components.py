"""What a run trains with besides the model: the label setting's table, the loss with its
priors, ROLE's estimator and the pseudo-label store, each built from the config and the
shards' manifest."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from shard_tools.manifest import ManifestError

from .data.loader import ShardLoader
from .distributed import DistInfo, barrier
from .labels import PartialLabels, read_split_labels
from .losses import LOSSES, BoundLoss, get_loss
from .pseudo_store import PseudoLabelStore

if TYPE_CHECKING:
    from .config import Config
    from .losses.role_estimator import LabelEstimator


def label_table(cfg: "Config", loader: ShardLoader) -> PartialLabels | None:
    """The label setting of the training split (positives only, O(positives) memory); None =
    the shards' labels as they are."""
    data = cfg.data
    if data.label_setting == "fal":
        return None
    if not loader.train_split.fully_labelled:
        raise ManifestError(f"{data.shards}: split {data.train_split} is not fully labelled; "
                            f"label_setting={data.label_setting} is made from full labels")
    return PartialLabels.from_split(loader.local_files(data.train_split), data.train_split, loader.num_classes,
                                    data.label_setting, data.label_ratio, data.label_seed)


def build_loss(cfg: "Config", loader: ShardLoader) -> BoundLoss:
    params = dict(cfg.loss.params)
    if LOSSES[cfg.loss.name].uses_prior and params.get("expected_positives") is None:
        split = loader.train_split
        if not split.fully_labelled:
            raise ManifestError(f"loss {cfg.loss.name} needs loss.params.expected_positives: "
                                f"split {cfg.data.train_split} is not fully labelled")
        # Full-label statistics of the training split, as EPR prescribes.
        params["expected_positives"] = split.num_positives / split.num_samples
    return get_loss(cfg.loss.name, **params)


def build_estimator(cfg: "Config", loader: ShardLoader, labels: PartialLabels | None,
                    device: torch.device) -> "LabelEstimator":
    from .losses.role_estimator import LabelEstimator

    LabelEstimator.check_size(loader.train_split.num_samples, loader.num_classes)  # before the dense copy
    observed = labels.dense() if labels is not None else read_split_labels(
        loader.local_files(cfg.data.train_split), cfg.data.train_split, loader.num_classes)
    return LabelEstimator(observed, seed=cfg.train.seed).to(device)


def open_store(cfg: "Config", loader: ShardLoader, labels: PartialLabels | None,
               dist_info: DistInfo) -> PseudoLabelStore:
    """The run's pseudo-label store: rank 0 creates (or checks) it, the others open it."""
    path = Path(cfg.pseudo.path) if cfg.pseudo.path else Path(cfg.train.run_dir) / "pseudo_labels.zarr"
    identity = {"manifest": loader.manifest.fingerprint(), "split": cfg.data.train_split,
                "label_setting": labels.hash if labels is not None else "as built"}
    args = (path, loader.train_split.num_samples, loader.num_classes, loader.piece_rows, identity, cfg.pseudo)
    # Four shards' worth of chunks, or of the shuffle window if larger, decoded for reads.
    window = max(loader.manifest.shard_size, cfg.data.shuffle_buffer)
    cache = 4 * -(-window // loader.piece_rows)
    if dist_info.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        store = PseudoLabelStore(*args, cache_chunks=cache)
    barrier()
    return store if dist_info.is_main else PseudoLabelStore(*args, create=False, cache_chunks=cache)
