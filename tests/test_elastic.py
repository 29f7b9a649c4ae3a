"""Elastic resume with gloo processes: a run killed on one world size resumes on another.

Each case kills a recorded run (every pseudo-label write of every rank, which is every row
trained, dumped at each checkpoint, so the killed run's records reach exactly the checkpoint
it resumes from), resumes it on another number of processes, and checks per epoch: every
sample trained exactly once across the interruption (all but at most one batch per rank),
each rank wrote only chunks it owned and no chunk had two writers, the store after every
hand-over and at the end equals the replay of the owners' writes, and the run ends with
finite metrics. Same-shape resumes stay bitwise: tests/test_epochs_ddp.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stream_pml.data.deal import default_piece_rows
from stream_pml.pseudo_store import decode

from .conftest import tiny_overrides
from .ranks import free_port, run_ranks
from .test_epochs_ddp import NUM_CLASSES, NUM_SHARDS, PML_PAPER, SHARD_SIZE, _assert_bitwise_equal

pytestmark = pytest.mark.slow

EPOCHS = 4
BATCH = 4  # per rank, at every world size (a resume keeps the config)
NUM_ROWS = NUM_SHARDS * SHARD_SIZE


@pytest.fixture(scope="module")
def shards8(tmp_path_factory) -> Path:
    from shard_tools.cli import main

    out = tmp_path_factory.mktemp("digits8e")
    assert main(["build", "digits", "--out", str(out), "--num-train", str(NUM_ROWS), "--num-val", "8",
                 "--num-test", "8", "--shard-size", str(SHARD_SIZE), "--image-size", "32"]) == 0
    return out


def _argv(shards: Path, run: Path, **extra) -> list[str]:
    return tiny_overrides(shards, run, **{
        "train.epochs": EPOCHS, "data.val_split": "''", "data.test_split": "test",
        "data.label_setting": "pal", "data.label_ratio": 0.5, "train.checkpoint_every": 2,
        "data.batch_size": BATCH, "pseudo.cache_chunks": 64, **PML_PAPER, **extra})


def _records(record: Path, world_size: int) -> tuple[list[dict], list[dict]]:
    writes, owned = [], []
    for r in range(world_size):
        with np.load(record / f"writes-rank{r}.npz") as f:
            writes.append({k: f[k] for k in f.files})
        owned.append(np.load(record / f"owned-rank{r}.npy", allow_pickle=True))
    return writes, owned


def _check(before: Path, w_before: int, after: Path, w_after: int, run: Path, resumed_epoch: int) -> None:
    """Replays both segments' writes epoch by epoch (the killed run's up to its checkpoint)."""
    import zarr

    segments = [(_records(before, w_before), w_before, 1), (_records(after, w_after), w_after, resumed_epoch)]
    expected = np.full((NUM_ROWS, NUM_CLASSES), 0.5, dtype=np.float32)
    for epoch in range(1, EPOCHS + 1):
        trained, writers = [], {}
        for segment, ((writes, owned), world, first) in enumerate(segments):
            snapshot = after / f"store-before-e{epoch}.npy"
            if segment == 1 and epoch >= resumed_epoch and snapshot.exists():
                # The resumed run's hand-over into this epoch: all earlier writes in Zarr.
                on_disk = decode(np.load(snapshot), "uint8")
                assert np.array_equal(on_disk, expected), f"store after the hand-over into epoch {epoch}"
            for r in range(world):
                sel = writes[r]["epoch"] == epoch
                rows = writes[r]["rows"][sel]
                if not len(rows):
                    continue
                mine = owned[r][epoch - first] if epoch - first < len(owned[r]) else []
                piece_rows = default_piece_rows(BATCH, SHARD_SIZE)
                assert set((rows // piece_rows).tolist()) <= set(mine), f"rank {r} wrote outside its chunks"
                for chunk in set((rows // piece_rows).tolist()):
                    assert writers.setdefault((chunk, segment), r) == r, f"chunk {chunk}: two writers"
                trained.append(rows)
                expected[rows] = writes[r]["values"][sel]
        rows = np.concatenate(trained)
        assert len(np.unique(rows)) == len(rows), f"epoch {epoch}: a sample trained twice"
        bound = max(w_before, w_after) * BATCH
        assert len(rows) >= NUM_ROWS - bound, f"epoch {epoch}: {NUM_ROWS - len(rows)} samples left out"
    final = decode(zarr.open_array(str(run / "pseudo_labels.zarr"), mode="r")[:], "uint8")
    assert np.array_equal(final, expected), "store at the end of the run"
    test = json.loads((run / "metrics.json").read_text())["test"]
    assert math.isfinite(test["map"])
    info = json.loads((run / "run_info.json").read_text())
    change = info["resumes"][-1]
    assert (change["from_world_size"], change["world_size"]) == (w_before, w_after)


CASES = {  # (world before, world after, stop at (epoch, batch), epoch the resumed run starts in)
    "2-to-3-mid-epoch-2": (2, 3, (2, 5), 2),
    "4-to-2-mid-epoch-2": (4, 2, (2, 3), 2),
    "2-to-3-at-epoch-boundary": (2, 3, (3, 0), 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_on_another_world_size_trains_every_sample_once(shards8, tmp_path, case, capfd):
    w_before, w_after, stop_at, resumed_epoch = CASES[case]
    run, before, after = tmp_path / "run", tmp_path / "before", tmp_path / "after"
    before.mkdir(), after.mkdir()
    argv = _argv(shards8, run)
    assert run_ranks(w_before, argv, record_dir=before, stop_at=stop_at) == [-9] * w_before
    capfd.readouterr()
    assert run_ranks(w_after, argv, record_dir=after) == [0] * w_after
    out = capfd.readouterr().out
    assert f"resumed on {w_after} processes a checkpoint of {w_before}" in out
    assert ("re-dealt" in out) == (stop_at[1] > 0)
    _check(before, w_before, after, w_after, run, resumed_epoch)


def _torchrun(argv: list[str], env_extra: dict) -> subprocess.CompletedProcess:
    # docs/distributed.md's command: without it the restarted group reads the failed attempt's addresses
    # from torchrun's shared store (pytorch#135712; measured here: "connection refused").
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **env_extra}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--monitor-interval=0.5",
           str(Path(__file__).with_name("kill_once.py")), *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parents[1])


def test_torchrun_restarts_a_killed_worker_and_the_run_ends_bitwise_equal(shards8, tmp_path):
    """torchrun --max-restarts=1: rank 1 SIGKILLs itself once mid-epoch 2; the restarted group
    resumes from the newest checkpoint by itself and ends equal to an uninterrupted run."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    extra = {"train.epochs": 3, "data.test_split": "''"}
    done = _torchrun(_argv(shards8, reference, **extra), {})
    assert done.returncode == 0, done.stderr[-3000:]
    marker = tmp_path / "killed-once"
    got = _torchrun(_argv(shards8, killed, **extra),
                    {"STREAM_PML_TEST_KILL": f"{marker}:1:2:5"})  # marker, rank, epoch, batch
    assert got.returncode == 0, got.stderr[-3000:]
    assert marker.exists(), "the worker was never killed"
    assert "resumed from" in got.stdout
    _assert_bitwise_equal(reference, killed)
