"""Using a trained model: load it, evaluate it on shards, predict labels, export it."""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .data.batch import IMAGENET_MEAN, IMAGENET_STD, Normalizer, dense_labels
from .class_table import ClassCounts, table_tag, write_class_table
from .metrics import mean_average_precision_detail, threshold_metrics


@dataclass
class LoadedModel:
    model: torch.nn.Module
    classes: list[str]  # names
    image_size: int
    arch: str
    thresholds: np.ndarray | None  # per class, calibrated on validation (best F1)
    source: Path
    # The run's data.eval_batch_size: scoring in the trainer's batches gives bit-identical
    # scores, so evaluate reproduces the recorded mAP even where a barely trained model ties
    # many scores (another batch size changes the last float bits, and with them tie order).
    eval_batch_size: int = 64
    class_ids: list[str] | None = None  # the source's ids (Open Images' MIDs), when not the names
    options: dict | None = None  # the constructor's keyword arguments (model.options)


def resolve_checkpoint(path: Path) -> Path:
    """A run directory means its ``best.pt`` (chosen on validation), else its newest checkpoint."""
    from . import checkpoint as ckpt

    path = Path(path)
    if path.is_file():
        return path
    if (path / "best.pt").is_file():
        return path / "best.pt"
    found = ckpt.list_checkpoints(path)
    if found:
        return found[-1] / ckpt.MAIN_FILE
    raise FileNotFoundError(f"{path}: no best.pt and no checkpoint")


def load_model(path: Path, device: torch.device | None = None) -> LoadedModel:
    from .model import ModelConfig, build_model

    source = resolve_checkpoint(path)
    state = torch.load(source, map_location="cpu", weights_only=False)
    if "run" in state:  # a training checkpoint's trainer.pt: config and classes under "run"
        state = {**state, **state["run"]}
    if "classes" not in state or "config" not in state:
        raise ValueError(f"{source}: not a stream-pml model checkpoint (no classes/config)")
    cfg = state["config"]
    model = build_model(ModelConfig(arch=cfg["model"]["arch"], options=dict(cfg["model"].get("options") or {})),
                        len(state["classes"]))
    # A training checkpoint of a run with train.ema_decay: the average is the run's model.
    model.load_state_dict(state["ema"]["module"] if state.get("ema") else state["model"])
    model.eval().to(device or torch.device("cpu"))
    thresholds = state.get("thresholds")
    ids = state.get("class_ids")
    lm_options = dict(cfg["model"].get("options") or {})
    return LoadedModel(model, list(state["classes"]), int(cfg["data"]["image_size"]), cfg["model"]["arch"],
                       None if thresholds is None else np.asarray(thresholds), source,
                       int(cfg["data"].get("eval_batch_size", 64)),
                       list(ids) if ids is not None and list(ids) != list(state["classes"]) else None,
                       lm_options)


@torch.no_grad()
def score_shards(lm: LoadedModel, shards: Path, split: str, batch_size: int = 64, skipped: list | None = None):
    """(rows, scores, targets, known) of every readable sample of a split; the unreadable
    ones (shard, byte offset, why) are appended to ``skipped``."""
    from .data.config import DataConfig
    from .data.loader import ShardLoader

    cfg = DataConfig(shards=str(shards), train_split=split, val_split="", test_split=split,
                     image_size=lm.image_size, eval_batch_size=batch_size)
    loader = ShardLoader(cfg)
    if loader.num_classes != len(lm.classes):
        raise ValueError(f"{shards}: {loader.num_classes} classes, the model has {len(lm.classes)}")
    device = next(lm.model.parameters()).device
    rows, scores, targets, known = [], [], [], []
    normalize = Normalizer()
    for batch in loader.eval_batches(split):
        batch = batch.to(device)
        scores.append(torch.sigmoid(lm.model(normalize(batch.images_BCHW)).float()).cpu().numpy())
        t, k = dense_labels(batch.pos_BP, batch.neg_BN, len(lm.classes))
        rows.append(batch.rows_B.cpu().numpy())
        targets.append(t.cpu().numpy())
        known.append(k.cpu().numpy())
    if skipped is not None:
        skipped += loader.skipped.get(split, [])
    if not rows:
        raise ValueError(f"{shards}: no sample of split {split} could be read ({len(loader.skipped.get(split, []))} "
                         "unreadable)")
    rows_N = np.concatenate(rows)
    _, first = np.unique(rows_N, return_index=True)
    return (rows_N[first], np.concatenate(scores)[first], np.concatenate(targets)[first],
            np.concatenate(known)[first])


def calibrate_thresholds(scores: np.ndarray, targets: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Per class, the score threshold with the best F1 on these (validation) labels; 0.5
    where a class has no known positive."""
    out = np.full(scores.shape[1], 0.5)
    for c in range(scores.shape[1]):
        k = known[:, c]
        y, s = targets[k, c] > 0.5, scores[k, c]
        if not y.any():
            continue
        order = np.argsort(-s, kind="stable")
        tp = np.cumsum(y[order])
        precision = tp / np.arange(1, len(order) + 1)
        recall = tp / y.sum()
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        out[c] = s[order][int(np.argmax(f1))]
    return out


def evaluation_name(shards: Path, split: str) -> str:
    """The tag of a split's evaluation files (:func:`~stream_pml.class_table.table_tag`)."""
    from shard_tools.manifest import load_manifest

    manifest = load_manifest(shards)
    return table_tag(manifest.dataset, manifest.fingerprint(), split)


def evaluate(lm: LoadedModel, shards: Path, split: str, out_dir: Path) -> dict:
    """Writes ``evaluation_<name>.md/.json`` and the per-class table
    (:func:`~stream_pml.class_table.write_class_table`) in ``out_dir``, ``<name>`` from
    :func:`evaluation_name`; unreadable samples are skipped and listed in the result."""
    from shard_tools.manifest import load_manifest

    skipped: list[str] = []
    _, scores, targets, known = score_shards(lm, shards, split, lm.eval_batch_size, skipped)
    manifest = load_manifest(shards)
    tag = table_tag(manifest.dataset, manifest.fingerprint(), split)
    detail = mean_average_precision_detail(scores, targets, known)
    result = {"split": split, "map": detail.map, "num_images": len(scores), "skipped": skipped,
              "skipped_classes": detail.num_skipped, **threshold_metrics(scores, targets, known)}
    write_class_table(out_dir, tag, f"{split}: {lm.source}", ClassCounts.of(detail, targets, known),
                      manifest.class_ids, lm.classes, {**result, "num_eval": len(scores)})
    (out_dir / f"evaluation_{tag}.json").write_text(json.dumps(result, indent=1))
    return result


def _image_files(images: Iterable[str], folder: Path | None) -> list[Path]:
    paths = [Path(p) for p in images]
    if folder is not None:
        from shard_tools.sources import IMAGE_EXTS

        paths += sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    return paths


def _load_image(path: Path, size: int) -> torch.Tensor:
    from .data.torch_stream import decode_resize

    # The training loader's own decode + resize (PIL for what libjpeg-turbo refuses), so a
    # prediction sees what training saw; a corrupt file raises and is reported.
    return decode_resize(path.read_bytes(), size)


@torch.no_grad()
def predict_files(lm: LoadedModel, paths: list[Path], batch_size: int = 32) -> Iterator[dict]:
    """One record per image: scores of every class, or the error that made it unreadable."""
    device = next(lm.model.parameters()).device
    normalize = Normalizer()
    for i in range(0, len(paths), batch_size):
        good, images = [], []
        for p in paths[i:i + batch_size]:
            try:
                images.append(_load_image(p, lm.image_size))
                good.append(p)
            except Exception as exc:  # a corrupt or missing file is reported, never fatal
                print(f"predict: skipping {p}: {exc}", file=sys.stderr)
                yield {"image": str(p), "error": str(exc)}
        if not images:
            continue
        scores = torch.sigmoid(lm.model(normalize(torch.stack(images).to(device))).float()).cpu().numpy()
        for p, s in zip(good, scores):
            yield {"image": str(p), "scores": s}


def predict_shards(lm: LoadedModel, shards: Path, split: str, batch_size: int = 64,
                   skipped: list | None = None) -> tuple[list[dict], int]:
    """Records for every readable sample of a built split, named by their source keys, and
    the split's sample count; unreadable samples are appended to ``skipped``."""
    from shard_tools.manifest import load_manifest

    from shard_tools.remote import is_remote, join, read_text

    info = load_manifest(shards).split(split, shards)
    keys = (read_text(join(str(shards), info.keys_file)) if is_remote(shards)
            else (Path(shards) / info.keys_file).read_text()).splitlines()
    rows, scores, _, _ = score_shards(lm, shards, split, batch_size, skipped)
    return [{"image": keys[int(r)], "scores": s} for r, s in zip(rows, scores)], info.num_samples


def write_predictions(records: Iterable[dict], lm: LoadedModel, out: Path, threshold: str,
                      echo: int = 0) -> int:
    """JSONL or CSV (by suffix) of labels above the threshold: a number, or ``calibrated``;
    labels by name, and by the source's class id (``ids``) where the dataset has its own
    (Open Images' MIDs). The first ``echo`` images are also printed, with class names."""
    if threshold == "calibrated":
        if lm.thresholds is None:
            raise ValueError(f"{lm.source}: no calibrated thresholds (train with a validation split)")
        thr = lm.thresholds
    else:
        thr = np.full(len(lm.classes), float(threshold))
    n = shown = 0
    with open(out, "w", newline="") as f:
        writer = csv.writer(f) if out.suffix == ".csv" else None
        if writer:
            writer.writerow(["image", "labels", "scores", "error"] + (["ids"] if lm.class_ids else []))
        for rec in records:
            if "error" in rec:
                row = {"image": rec["image"], "labels": [], "scores": [], "error": rec["error"]}
                idx = np.zeros(0, dtype=np.int64)
            else:
                idx = np.nonzero(rec["scores"] >= thr)[0]
                idx = idx[np.argsort(-rec["scores"][idx])]
                row = {"image": rec["image"], "labels": [lm.classes[c] for c in idx],
                       "scores": [round(float(rec["scores"][c]), 4) for c in idx]}
                n += 1
            if lm.class_ids:
                row["ids"] = [lm.class_ids[c] for c in idx]
            if writer:
                writer.writerow([row["image"], "|".join(row["labels"]), "|".join(map(str, row["scores"])),
                                 row.get("error", "")] + (["|".join(row["ids"])] if lm.class_ids else []))
            else:
                f.write(json.dumps(row) + "\n")
            if shown < echo:
                shown += 1
                text = ", ".join(f"{name} {score:.2f}" for name, score in zip(row["labels"], row["scores"]))
                print(f"{row['image']}: {text or row.get('error') or 'no label above the threshold'}")
    return n


# Run by export() in a fresh interpreter that imports torch and torchvision (or timm), not
# stream-pml: what a user's serving code has. Prints the largest score difference of each format.
_CHECK_EXPORT = """
import json, sys, torch, torchvision
from safetensors.torch import load_file
out = sys.argv[1]
meta = json.load(open(out + "/model.json"))
x, ref = torch.load(out + "/check.pt").values()
program = torch.export.load(out + "/model.pt2").module()
if meta["arch"].startswith("timm:"):
    import timm
    net = timm.create_model(meta["arch"][5:], num_classes=meta["num_classes"], **meta["options"]).eval()
else:
    net = torchvision.models.get_model(meta["arch"], weights=None, num_classes=meta["num_classes"],
                                       **meta["options"]).eval()
net.load_state_dict(load_file(out + "/model.safetensors"))
with torch.no_grad():
    print(json.dumps({"pt2": float((torch.sigmoid(program(x)) - ref).abs().max()),
                      "safetensors": float((torch.sigmoid(net(x)) - ref).abs().max())}))
"""


def export(lm: LoadedModel, out_dir: Path) -> dict:
    """safetensors weights (torchvision's or timm's architecture, ``model.json`` names it) + a JSON of
    classes and preprocessing + a ``torch.export`` program (``model.pt2``, any batch size),
    each checked to score like this model in a fresh process that does not import stream-pml."""
    import subprocess

    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    model = lm.model.cpu().eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"))
    timm_arch = lm.arch.startswith("timm:")
    net = (f"timm.create_model({lm.arch[5:]!r}, num_classes=num_classes, **options)" if timm_arch else
           "torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **options)")
    meta = {"arch": lm.arch, "options": lm.options or {}, "classes": lm.classes,
            "class_ids": lm.class_ids or lm.classes, "num_classes": len(lm.classes),
            "input": {"size": [lm.image_size, lm.image_size], "resize": "squash, bilinear antialiased",
                      "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "layout": "NCHW RGB float32 in [0,1] then normalised"},
            "output": "logits; sigmoid gives per-class probabilities",
            "load": {"model.pt2": "torch.export.load(path).module()",
                     "model.safetensors": f"{net}.load_state_dict(safetensors.torch.load_file(path))"},
            "thresholds": None if lm.thresholds is None else [float(t) for t in lm.thresholds]}
    (out_dir / "model.json").write_text(json.dumps(meta, indent=1))
    sample = torch.randn(4, 3, lm.image_size, lm.image_size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (sample,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(out_dir / "model.pt2"))
    with torch.no_grad():
        torch.save({"x": sample[:3], "scores": torch.sigmoid(model(sample[:3]))}, out_dir / "check.pt")
    try:
        proc = subprocess.run([sys.executable, "-c", _CHECK_EXPORT, str(out_dir)], capture_output=True, text=True,
                              cwd=out_dir, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    finally:
        (out_dir / "check.pt").unlink()
    if proc.returncode != 0:
        raise RuntimeError(f"the exported files do not load in a fresh process: {proc.stderr.strip().splitlines()[-1]}")
    diffs = json.loads(proc.stdout.strip().splitlines()[-1])
    worst = max(diffs.values())
    if worst > 1e-4:
        raise RuntimeError(f"an exported format scores differently from PyTorch: {diffs} on a sample batch")
    return {"max_abs_score_diff": diffs, "files": sorted(p.name for p in out_dir.iterdir())}
