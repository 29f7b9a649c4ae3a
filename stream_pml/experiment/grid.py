"""``python -m stream_pml.experiment --grid configs/experiments/X.yaml``: run a grid, resumably.

Every row of ``results.csv`` carries what its number depends on: the resolved loss
parameters (defaults included), the training and data settings, the label-mask generator
(hashed together as ``params_hash``) and the commit. A cell is done only when a row with the
same (dataset, method, setting, seed, params_hash) exists, so after a default changes a rerun
trains exactly the cells it changed, and tables are made from the rows of the current
parameters only. Each finished cell is appended at once, so an interrupted grid loses at
most the cell in progress.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import subprocess
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

from shard_tools.manifest import load_manifest

from ..labels import MASK_VERSION
from ..losses import LOSSES, get_loss
from .linear import VARIANTS, parse_setting, resolve_method, train_cell

SETTINGS = ["fal", "pal0.3", "pal0.6", "pal0.9", "ppl0.3", "ppl0.6", "ppl0.9", "spl"]
FIELDS = ["dataset", "method", "setting", "seed", "val_map", "test_map", "best_epoch", "setting_hash",
          "seconds", "final_pseudo_mean", "params_hash", "loss_params", "commit", "weight_decay"]


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
    # A smoke test: in the tables, never used to choose the default (leave-one-out table).
    smoke: bool = False


@dataclass
class CellTrainConfig:
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    # Non-empty: each cell trains once per value and keeps the run with the best validation
    # mAP (its value goes in the row's weight_decay column), so every method gets the
    # regularisation its own loss needs; ``weight_decay`` is then unused. npz/shards only.
    weight_decay_screen: List[float] = field(default_factory=list)


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
        if self.train.weight_decay_screen and any(ds.kind == "trainer" for ds in self.datasets):
            raise ValueError("train.weight_decay_screen: only for npz/shards datasets (trainer cells set optim.*)")


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


def cell_params(cfg: GridConfig, ds: DatasetConfig, method: str) -> dict:
    """What a cell's result depends on besides (setting, seed): resolved, defaults included."""
    name, extra = resolve_method(method)
    # What a result depends on: the data's content, not its name, its path (a moved copy is
    # the same data) or whether it is a smoke test.
    data = {k: v for k, v in dataclasses.asdict(ds).items() if k not in ("name", "smoke")}
    data["path"] = data_identity(ds)
    if ds.kind == "trainer":
        from ..config import load_config, to_dict

        resolved = to_dict(load_config(ds.config or None, [*ds.overrides, f"loss.name={name}",
                                                           *[f"loss.params.{k}={v}" for k, v in extra.items()]]))
        resolved["train"].pop("run_dir", None)
        return {"loss": name, "loss_params": get_loss(name, **resolved["loss"]["params"]).resolved(),
                "config": resolved, "data": data, "masks": MASK_VERSION}
    train = dataclasses.asdict(cfg.train)
    # Unscreened cells keep the hash they had before the screen existed; screened ones do
    # not depend on the single value.
    train.pop("weight_decay" if train["weight_decay_screen"] else "weight_decay_screen")
    return {"loss": name, "loss_params": get_loss(name, **extra).resolved(),
            "train": train, "data": data, "masks": MASK_VERSION}


def data_identity(ds: DatasetConfig) -> str:
    """The data a cell reads, by content: an npz file's sha256, a shard directory's manifest
    fingerprint. A path that does not exist (yet) stands for itself."""
    path = Path(ds.path)
    if ds.kind == "npz" and path.is_file():
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return "sha256:" + digest.hexdigest()
    if ds.kind in ("shards", "trainer") and (path / "manifest.json").is_file():
        return "manifest:" + load_manifest(path).fingerprint()
    return ds.path


def params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]


def current_commit() -> str:
    """The checkout's commit, ``+dirty`` with uncommitted changes to tracked files."""
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=repo).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _upgrade_header(path: Path) -> None:
    """Rows of an older results.csv (fewer columns) are rewritten under today's header with
    the new columns empty: kept as history, never matched as done."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        header = next(csv.reader(f), None)
    if header == FIELDS:
        return
    rows = read_results(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _row_key(row: dict) -> tuple:
    """What makes a results row the result of one cell under one parameter set."""
    return row["dataset"], row["method"], row["setting"], int(row["seed"]), row["params_hash"]


def read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def run_grid(cfg: GridConfig, report_only: bool = False) -> Path:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    results_path = out / "results.csv"
    _upgrade_header(results_path)
    done = {_row_key(r) for r in read_results(results_path)}
    methods = list(cfg.methods) + ([v for v in VARIANTS] if cfg.ablation else [])
    params = {(ds.name, m): cell_params(cfg, ds, m) for ds in cfg.datasets for m in methods}
    hashes = {key: params_hash(p) for key, p in params.items()}
    # Each cell with the key its row will carry.
    cells = [((ds, m, s, seed), (ds.name, m, s, seed, hashes[(ds.name, m)]))
             for ds in cfg.datasets for m in methods for s in cfg.settings for seed in cfg.seeds]
    current = {key for _, key in cells}
    todo = [] if report_only else [cell for cell, key in cells if key not in done]
    commit = current_commit()
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
                key = (ds_name, row["method"])
                writer.writerow({"dataset": ds_name, **{k: row[k] for k in FIELDS if k in row},
                                 "params_hash": hashes[key], "commit": commit,
                                 "loss_params": json.dumps(params[key]["loss_params"], sort_keys=True)})
                f.flush()
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    from .report import write_report

    # Only rows of today's parameters: a table never mixes two defaults.
    rows_now = [r for r in read_results(results_path) if _row_key(r) in current]
    write_report(rows_now, out, methods, list(cfg.settings), smoke={ds.name for ds in cfg.datasets if ds.smoke},
                 screened=bool(cfg.train.weight_decay_screen))
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
    best: dict = {}
    for weight_decay in cfg.train.weight_decay_screen or [cfg.train.weight_decay]:
        row = train_cell(_DATA_CACHE[ds.name], method, setting, seed, epochs=cfg.train.epochs,
                         lr=cfg.train.lr, batch_size=cfg.train.batch_size, weight_decay=weight_decay)
        if not best or row["val_map"] > best["val_map"]:  # validation decides, never test
            best = {**row, "weight_decay": weight_decay}
    return ds.name, best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stream_pml.experiment", description=__doc__)
    ap.add_argument("--grid", required=True, help="grid YAML (see configs/experiments/)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. seeds=[0]")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: rebuild the tables and plots from the rows of results.csv that "
                         "match today's parameters (cells without such a row are left out)")
    args = ap.parse_args(argv)
    try:
        cfg = load_grid(args.grid, args.overrides)
    except (ValueError, FileNotFoundError) as exc:
        print(f"grid error: {exc}", file=sys.stderr)
        return 2
    out = run_grid(cfg, report_only=args.report_only)
    print(f"results: {out / 'results.csv'}, table: {out / 'table.md'}, plots: {out}/*.png")
    return 0
