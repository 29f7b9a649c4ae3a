"""``python -m stream_pml.experiment --grid configs/experiments/X.yaml``: run a grid, resumably.

Cells already in ``results.csv`` are skipped on a rerun; each finished cell is appended at
once, so an interrupted grid loses at most the cell in progress.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from ..losses import LOSSES
from .linear import VARIANTS, parse_setting, resolve_method, train_cell

SETTINGS = ["fal", "pal0.3", "pal0.6", "pal0.9", "ppl0.3", "ppl0.6", "ppl0.9", "spl"]
FIELDS = ["dataset", "method", "setting", "seed", "val_map", "test_map", "best_epoch", "setting_hash",
          "seconds", "final_pseudo_mean"]


@dataclass
class DatasetConfig:
    name: str = "data"
    # npz (X_train, Y_train, X_test, Y_test) or shards: fixed features + linear heads;
    # trainer: the full end-to-end protocol, each cell a training run (for GPUs)
    kind: str = "npz"
    path: str = ""
    val_fraction: float = 0.2  # of the training rows, seeded, when there is no val split
    weights: str = "bundled"  # shards: torchvision mobilenet_v2 weights file, or bundled
    image_size: int = 224
    splits: Dict[str, str] = field(default_factory=lambda: {"train": "train", "val": "", "test": "test"})
    # kind=trainer: the run file and dotted overrides every cell starts from
    config: str = ""
    overrides: List[str] = field(default_factory=list)


@dataclass
class CellTrainConfig:
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 1e-4


@dataclass
class GridConfig:
    datasets: List[DatasetConfig] = field(default_factory=list)
    methods: List[str] = field(default_factory=lambda: list(LOSSES))
    settings: List[str] = field(default_factory=lambda: list(SETTINGS))
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    ablation: bool = True  # adds the pml variants of the paper's Table VII
    train: CellTrainConfig = field(default_factory=CellTrainConfig)
    out_dir: str = "results/grid"
    # Cells run in this many processes at once (fixed-features cells are single-threaded).
    workers: int = 1

    def __post_init__(self) -> None:
        for m in self.methods:
            resolve_method(m)
        for s in self.settings:
            parse_setting(s)
        if not self.datasets:
            raise ValueError("datasets: name at least one")
        if self.workers < 1:
            raise ValueError(f"workers: must be >= 1, got {self.workers}")


def load_grid(path: str, overrides: list[str] = ()) -> GridConfig:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(GridConfig), OmegaConf.load(path),
                                 OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def _load_data(ds: DatasetConfig, out_dir: Path):
    from .features import from_npz, from_shards

    if ds.kind == "npz":
        return from_npz(Path(ds.path), ds.val_fraction)
    if ds.kind == "shards":
        return from_shards(Path(ds.path), ds.weights, ds.image_size, out_dir / "features",
                           ds.val_fraction, dict(ds.splits))
    raise ValueError(f"dataset {ds.name}: kind {ds.kind!r} is not npz or shards")


def trainer_cell(ds: DatasetConfig, method: str, setting: str, seed: int, out: Path) -> dict:
    """The end-to-end protocol: one training run of the trainer per cell (resumable itself)."""
    import json
    import time

    from ..train import main as train_main

    name, extra = resolve_method(method)
    kind, ratio = parse_setting(setting)
    run_dir = out / "runs" / f"{ds.name}-{method}-{setting}-s{seed}"
    args = ([] if not ds.config else ["--config", ds.config]) + list(ds.overrides) + [
        f"data.shards={ds.path}", f"loss.name={name}", f"data.label_setting={kind}",
        f"train.seed={seed}", f"train.run_dir={run_dir}"]
    args += [f"loss.params.{k}={v}" for k, v in extra.items()]
    if ratio is not None:
        args.append(f"data.label_ratio={ratio}")
    t0 = time.perf_counter()
    if train_main(args) != 0:
        raise RuntimeError(f"cell {method} / {setting} / seed {seed} failed; see {run_dir}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    info = json.loads((run_dir / "run_info.json").read_text())
    return {"method": method, "setting": setting, "seed": seed,
            "val_map": metrics["selected"].get("val_map", float("nan")), "test_map": metrics["test"]["map"],
            "best_epoch": metrics["selected"]["epoch"], "setting_hash": info["label_setting_hash"],
            "seconds": time.perf_counter() - t0, "final_pseudo_mean": float("nan")}


def read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def run_grid(cfg: GridConfig) -> Path:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    results_path = out / "results.csv"
    done = {(r["dataset"], r["method"], r["setting"], int(r["seed"])) for r in read_results(results_path)}
    methods = list(cfg.methods) + ([v for v in VARIANTS] if cfg.ablation else [])
    cells = [(ds, m, s, seed) for ds in cfg.datasets for m in methods for s in cfg.settings for seed in cfg.seeds]
    todo = [c for c in cells if (c[0].name, c[1], c[2], c[3]) not in done]
    new_file = not results_path.exists()
    if cfg.workers > 1:  # features are extracted once, before the workers need them
        for ds in {ds.name: ds for ds, *_ in todo if ds.kind == "shards"}.values():
            _load_data(ds, out)
    jobs = [(cfg, ds, method, setting, seed, out) for ds, method, setting, seed in todo]
    with open(results_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        if cfg.workers > 1:
            # An executor, not a Pool: a worker that cannot start or dies fails the grid
            # (BrokenProcessPool) instead of being respawned forever.
            pool = ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn"),
                                       initializer=_worker_init, initargs=(cfg.workers,))
            rows = (fut.result() for fut in as_completed([pool.submit(_run_cell, job) for job in jobs]))
        else:
            pool, rows = None, map(_run_cell, jobs)
        try:
            for ds_name, row in tqdm(rows, total=len(jobs), desc="cells", unit="cell", dynamic_ncols=True):
                writer.writerow({"dataset": ds_name, **{k: row[k] for k in FIELDS if k in row}})
                f.flush()
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    from .report import write_report

    write_report(read_results(results_path), out, methods, list(cfg.settings))
    return out


_DATA_CACHE: dict = {}


def _worker_init(workers: int) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def _run_cell(job: tuple) -> tuple[str, dict]:
    cfg, ds, method, setting, seed, out = job
    if ds.kind == "trainer":
        return ds.name, trainer_cell(ds, method, setting, seed, out)
    if ds.name not in _DATA_CACHE:
        _DATA_CACHE[ds.name] = _load_data(ds, out)
    return ds.name, train_cell(_DATA_CACHE[ds.name], method, setting, seed, epochs=cfg.train.epochs,
                               lr=cfg.train.lr, batch_size=cfg.train.batch_size,
                               weight_decay=cfg.train.weight_decay)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stream_pml.experiment", description=__doc__)
    ap.add_argument("--grid", required=True, help="grid YAML (see configs/experiments/)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. seeds=[0]")
    args = ap.parse_args(argv)
    try:
        cfg = load_grid(args.grid, args.overrides)
    except (ValueError, FileNotFoundError) as exc:
        print(f"grid error: {exc}", file=sys.stderr)
        return 2
    out = run_grid(cfg)
    print(f"results: {out / 'results.csv'}, table: {out / 'table.md'}, plots: {out}/*.png")
    return 0
