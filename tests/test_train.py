"""Training end to end on tiny shards: one process via main(), two via torchrun (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stream_pml.train import main

from .conftest import REPO, tiny_overrides


@pytest.mark.slow
def test_main_trains_evaluates_and_writes_the_run_dir(digits_shards, tmp_path):
    run = tmp_path / "run"
    assert main(tiny_overrides(digits_shards, run, **{"train.epochs": 2})) == 0
    for name in ("config.yaml", "run_info.json", "metrics.csv", "train_log.csv", "metrics.json",
                 "map_curve.png", "best.pt"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    metrics = json.loads((run / "metrics.json").read_text())
    # Validation (16 images) every epoch, selection on it, test (40 images) once.
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert all(h["num_eval"] == 16 for h in metrics["history"])
    best = max(metrics["history"], key=lambda h: h["map"])
    assert metrics["selected"]["epoch"] == best["epoch"]
    assert 0.0 < metrics["test"]["map"] <= 1.0 and metrics["test"]["num_eval"] == 40
    log_header = (run / "train_log.csv").read_text().splitlines()[0].split(",")
    for column in ("loss", "loss_known", "loss_pseudo", "alpha", "beta", "d", "p2_share", "lr",
                   "images_per_s", "data_wait_share"):
        assert column in log_header, column
    info = json.loads((run / "run_info.json").read_text())
    assert info["seed"] == 0 and "torch" in info["versions"]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["ckpt-e0001-s000000012", "ckpt-e0002-s000000024"]
    assert (run / "pseudo_labels.zarr" / "zarr.json").is_file()
    # A finished run resumes to nothing left to do and keeps its results.
    assert main(tiny_overrides(digits_shards, run, **{"train.epochs": 2})) == 0
    assert json.loads((run / "metrics.json").read_text())["test"] == metrics["test"]


@pytest.mark.slow
def test_resume_refuses_a_different_model(digits_shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny_overrides(digits_shards, run)) == 0
    assert main(tiny_overrides(digits_shards, run, **{"model.arch": "resnet18", "train.epochs": 2})) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("resume error: cannot resume") and \
        "model.arch was 'mobilenet_v3_small', now 'resnet18'" in err[-1]


@pytest.mark.slow
def test_torchrun_two_gloo_processes(digits_shards, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "stream_pml.train", *tiny_overrides(digits_shards, run, **{"train.epochs": 2})]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2" in proc.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    # Both ranks' eval shards are gathered: all 40 test images are scored.
    assert metrics["test"]["num_eval"] == 40
    info = json.loads((run / "run_info.json").read_text())
    assert info["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("loss, setting", [
    *[(name, "spl") for name in ("pml", "bce", "bce_ls", "focal", "asl", "an", "an_ls", "wan",
                                  "epr", "role", "iun", "hill", "splc", "ll_r", "ll_ct")],
    ("pml", "fal"), ("pml", "pal"), ("pml", "ppl"),
])
def test_config_selects_any_loss_and_setting(digits_shards, tmp_path, loss, setting):
    from stream_pml.losses import LOSSES

    assert loss in LOSSES
    extra = {"loss.name": loss, "data.label_setting": setting, "train.epochs": 2}
    if setting in ("pal", "ppl"):
        extra["data.label_ratio"] = 0.5
    run = tmp_path / "run"
    assert main(tiny_overrides(digits_shards, run, **extra)) == 0
    info = json.loads((run / "run_info.json").read_text())
    assert info["label_setting"] == setting and loss in info["loss"]
    if setting != "fal":
        assert len(info["label_setting_hash"]) == 16
    log = (run / "train_log.csv").read_text().splitlines()
    assert len(log) > 2


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_message_and_a_good_checkpoint(digits_shards, tmp_path, capsys,
                                                                     monkeypatch):
    import torch

    from stream_pml import checkpoint as ckpt
    from stream_pml.losses import BoundLoss

    real = BoundLoss.sparse
    calls = {"n": 0}

    def nan_at_step_5(self, *args, **kw):
        calls["n"] += 1
        loss = real(self, *args, **kw)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(BoundLoss, "sparse", nan_at_step_5)
    run = tmp_path / "run"
    assert main(tiny_overrides(digits_shards, run)) == 3
    err = capsys.readouterr().err
    assert "non-finite loss at epoch 1, step 5" in err and "last good state is saved" in err
    state = torch.load(ckpt.list_checkpoints(run)[-1] / ckpt.MAIN_FILE, weights_only=False)
    assert state["progress"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_corrupt_jpeg_mid_run_is_skipped_and_the_run_ends_normally(digits_shards, tmp_path):
    import shutil

    from shard_tools.manifest import load_manifest, shard_paths
    from stream_pml.data.torch_stream import read_index

    shards = tmp_path / "shards"
    shutil.copytree(digits_shards, shards)
    tars, idxs = shard_paths(shards, load_manifest(shards).splits["train"])
    offset, size = read_index(idxs[2])[7, 0]
    with open(tars[2], "r+b") as f:
        f.seek(int(offset))
        f.write(b"\0" * int(size))
    with pytest.warns(UserWarning, match=rf"{Path(tars[2]).name}: sample at byte {offset}"):
        assert main(tiny_overrides(shards, tmp_path / "run", **{"data.backend": "torch"})) == 0


@pytest.mark.slow
def test_two_thousand_shards_train_under_a_256_file_limit(tmp_path):
    import resource

    from shard_tools.cli import main as build

    shards = tmp_path / "many"
    assert build(["build", "digits", "--out", str(shards), "--num-train", "2000", "--num-val", "200",
                  "--num-test", "200", "--shard-size", "1", "--image-size", "32"]) == 0
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "stream_pml.train",
           *tiny_overrides(shards, run, **{"data.backend": "torch", "data.batch_size": 50})]
    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))  # noqa: E731
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path, preexec_fn=limit,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test mAP" in proc.stdout


def test_a_second_run_in_the_same_directory_is_refused(digits_shards, tmp_path):
    """While a run holds its directory (here: another process holding the lock), a second
    start exits 2 with one line and writes nothing; once the first is gone, it runs."""
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from stream_pml.run_dir import lock; assert lock(Path(sys.argv[1])) is None; "
                               "print('held', flush=True); time.sleep(120)", str(run)],
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = subprocess.run([sys.executable, "-m", "stream_pml.train", *tiny_overrides(digits_shards, run)],
                              env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1].startswith(f"run error: {run.resolve()} is in use by a run "
                                                                f"still going (pid {holder.pid}")
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    assert main(tiny_overrides(digits_shards, run)) == 0  # the lock went with its holder


def test_checkpoint_minutes_saves_by_wall_time(digits_shards, tmp_path, monkeypatch):
    """With train.checkpoint_minutes=1 and a clock that moves 40 s per reading, a checkpoint
    comes every other step or so, besides the epoch end; the steps are rank 0's clock's."""
    import itertools

    from stream_pml import checkpoint as ckpt
    from stream_pml import trainer

    ticks = itertools.count()
    monkeypatch.setattr(trainer.time, "monotonic", lambda: 40.0 * next(ticks))
    run = tmp_path / "run"
    assert main(tiny_overrides(digits_shards, run, **{"train.checkpoint_minutes": 1,
                                                        "train.keep_checkpoints": 100})) == 0
    steps = [int(ckpt.PATTERN.match(p.name).group(2)) for p in ckpt.list_checkpoints(run)]
    num_steps = steps[-1]
    assert num_steps >= 10 and len(steps) >= num_steps // 3, steps
    # Off by default: only the epoch end.
    plain = tmp_path / "plain"
    assert main(tiny_overrides(digits_shards, plain)) == 0
    assert len(ckpt.list_checkpoints(plain)) == 1
