"""What a run writes beside its checkpoints: resolved config, run info, metric logs, plots."""

from __future__ import annotations

import csv
import json
import platform
import sys
from pathlib import Path


def versions() -> dict[str, str]:
    import numpy
    import torch
    import torchvision

    out = {"python": sys.version.split()[0], "platform": platform.platform(),
           "torch": torch.__version__, "torchvision": torchvision.__version__,
           "numpy": numpy.__version__, "cuda": str(torch.version.cuda)}
    try:
        import nvidia.dali

        out["nvidia-dali"] = nvidia.dali.__version__
    except ImportError:
        out["nvidia-dali"] = "absent"
    return out


_HELD_LOCKS: dict[Path, int] = {}


def lock(run_dir: Path) -> str | None:
    """Take ``run_dir/.lock`` for this process's life; the reason when another run holds it.

    A second run in the same directory would interleave logs and overwrite checkpoints, best.pt
    and the store. ``flock`` is released by the kernel however the holder ends (SIGKILL
    included), so a crashed run never leaves a stale lock behind.
    """
    import fcntl
    import os

    run_dir = Path(run_dir).resolve()
    if run_dir in _HELD_LOCKS:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        return f"{run_dir} is in use by a run still going ({holder}); wait for it or use another train.run_dir"
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {platform.node()}".encode(), 0)
    _HELD_LOCKS[run_dir] = fd
    return None


def unlock(run_dir: Path) -> None:
    import os

    fd = _HELD_LOCKS.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)


def start(run_dir: Path, config_yaml: str, info: dict, resume: dict | None = None) -> None:
    """A new run writes its resolved config and ``run_info.json`` (seed, world size, device,
    versions, ...). A resumed run leaves both as the run began and appends ``resume`` (step,
    world sizes, the keys that changed, the command line) to ``run_info.json``'s
    ``resumes``, so the record says how every part of the run was trained."""
    run_dir.mkdir(parents=True, exist_ok=True)
    info_path = run_dir / "run_info.json"
    if resume is None or not info_path.exists():
        (run_dir / "config.yaml").write_text(config_yaml)
        record = {**info, "versions": versions(), "resumes": []}
    else:
        record = json.loads(info_path.read_text())
    if resume is not None:
        record.setdefault("resumes", []).append({**resume, "argv": sys.argv, "versions": versions()})
    write_json(info_path, record)


class CsvLog:
    """Append rows to a CSV, writing the header once; columns fixed by the first row."""

    def __init__(self, path: Path):
        self.path = path
        self.fields: list[str] | None = None
        if path.exists() and path.stat().st_size > 0:
            with open(path) as f:
                self.fields = next(csv.reader(f), None)

    def write(self, row: dict) -> None:
        new = self.fields is None
        if new:
            self.fields = list(row)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


def truncate_log(path: Path, last_step: int) -> None:
    """Drop the rows of steps after ``last_step``: a run resumed from that step trains them
    again, so the log holds each step once."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or "step" not in rows[0]:
        return
    col = rows[0].index("step")
    kept = [rows[0]] + [r for r in rows[1:] if len(r) > col and r[col].isdigit() and int(r[col]) <= last_step]
    if len(kept) == len(rows):
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(kept)
    tmp.replace(path)


class StepLog:
    """Rank 0's metric sinks: ``train_log.csv`` per logged step and TensorBoard. Given the
    step a run resumed from, both forget what was logged after it (TensorBoard's purge)."""

    def __init__(self, run_dir: Path, resumed_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        if resumed_step is not None:
            truncate_log(run_dir / "train_log.csv", resumed_step)
        self.csv = CsvLog(run_dir / "train_log.csv")
        self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                purge_step=None if resumed_step is None else resumed_step + 1)

    def step(self, row: dict) -> None:
        self.csv.write(row)
        for key, value in row.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)):
                self.tb.add_scalar(f"train/{key}", value, row["step"])

    def epoch(self, result: dict) -> None:
        for key, value in result.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)):
                self.tb.add_scalar(f"val/{key}", value, result["step"])

    def test(self, result: dict, step: int) -> None:
        for key, value in result.items():
            if isinstance(value, (int, float)):
                self.tb.add_scalar(f"test/{key}", value, step)

    def close(self) -> None:
        self.tb.close()


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rewrite a whole CSV (the per-epoch metrics, from the checkpointed history)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def plot_map_curve(metrics_csv: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    epochs = [int(r["epoch"]) for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(epochs, [100 * float(r["map"]) for r in rows], marker="o", label="validation mAP")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mAP (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
