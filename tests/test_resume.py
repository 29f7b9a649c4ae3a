"""Long runs survive anything: SIGKILL at a random step, a kill during a checkpoint write,
a corrupt newest checkpoint, SIGTERM; the resumed run ends bitwise equal to an
uninterrupted one (model weights and pseudo-label store)."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stream_pml import checkpoint as ckpt
from stream_pml.train import main

from .conftest import REPO, tiny_overrides

pytestmark = pytest.mark.slow

# ema_decay: the weight average is state a resume must restore exactly, too.
RUN = {"train.epochs": 2, "train.checkpoint_every": 3, "loss.name": "pml",
       "data.label_setting": "pal", "data.label_ratio": 0.5, "train.ema_decay": 0.9}


def _final_state(run: Path) -> tuple[dict, np.ndarray]:
    import zarr

    last = ckpt.list_checkpoints(run)[-1]
    state = torch.load(last / ckpt.MAIN_FILE, weights_only=False)
    model = {**state["model"], **{f"ema.{k}": v for k, v in state["ema"]["module"].items()},
             "ema.updates": torch.tensor(state["ema"]["updates"])}
    store = zarr.open_array(str(run / "pseudo_labels.zarr"), mode="r")[:]
    return model, store


def _assert_same_run(a: Path, b: Path) -> None:
    model_a, store_a = _final_state(a)
    model_b, store_b = _final_state(b)
    assert model_a.keys() == model_b.keys()
    for k in model_a:
        assert torch.equal(model_a[k], model_b[k]), k
    assert np.array_equal(store_a, store_b)
    assert (store_a != 127).any(), "the store was written"


def _torchrun(shards: Path, run: Path, tmp: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "stream_pml.train", *tiny_overrides(shards, run, **RUN)]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _steps_logged(run: Path) -> int:
    log = run / "train_log.csv"
    if not log.exists():
        return 0
    with open(log) as f:
        rows = list(csv.DictReader(f))
    return int(rows[-1]["step"]) if rows else 0


@pytest.fixture(scope="module")
def reference_run(digits_shards, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("reference")
    run = tmp / "run"
    proc = subprocess.run(_torchrun(digits_shards, run, tmp), env=_env(), cwd=tmp,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(digits_shards, reference_run, tmp_path):
    run = tmp_path / "run"
    kill_at = random.Random(os.getpid()).randint(4, 10)  # 12 steps per epoch (2 ranks x 48 / 8... )
    proc = subprocess.Popen(_torchrun(digits_shards, run, tmp_path), env=_env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    while _steps_logged(run) < kill_at and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(_torchrun(digits_shards, run, tmp_path), env=_env(), cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    _assert_same_run(reference_run, run)


def _single(shards, run, **extra):
    return tiny_overrides(shards, run, **{**RUN, **extra})


def test_kill_during_checkpoint_write_or_store_apply_then_resume(digits_shards, tmp_path, monkeypatch):
    from stream_pml.pseudo_store import PseudoLabelStore

    reference = tmp_path / "reference"
    assert main(_single(digits_shards, reference)) == 0

    class Killed(BaseException):
        pass

    for target, which in ((ckpt, "publish"), (PseudoLabelStore, "_replace_chunk_file")):
        run = tmp_path / f"run_{which}"
        real = getattr(target, which)
        calls = {"n": 0}

        def dying(*args, _real=real, **kw):
            calls["n"] += 1
            if calls["n"] == 3:
                raise Killed(f"killed inside {which}")
            return _real(*args, **kw)

        monkeypatch.setattr(target, which, dying)
        with pytest.raises(Killed):
            main(_single(digits_shards, run))
        monkeypatch.setattr(target, which, real)
        assert main(_single(digits_shards, run)) == 0
        _assert_same_run(reference, run)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(digits_shards, tmp_path):
    reference = tmp_path / "reference"
    assert main(_single(digits_shards, reference)) == 0
    run = tmp_path / "run"
    assert main(_single(digits_shards, run)) == 0
    ckpts = ckpt.list_checkpoints(run)
    newest = ckpts[-1]
    (newest / ckpt.MAIN_FILE).write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match=newest.name):
        assert ckpt.load_newest(run, 0)[0] == len(ckpts) - 2
    # The run goes back to the previous checkpoint, undoes the newest one's pseudo-label
    # writes, retrains the last steps and ends where the undamaged run ended.
    with pytest.warns(UserWarning, match=newest.name):
        assert main(_single(digits_shards, run)) == 0
    _assert_same_run(reference, run)


def test_a_finished_run_extends_and_other_changes_are_refused(digits_shards, tmp_path, capsys):
    """train.epochs may grow at resume (the schedule follows the new total) and is recorded;
    a key outside the documented list is refused in one line naming it, old and new."""
    import json

    run = tmp_path / "run"
    assert main(_single(digits_shards, run, **{"train.epochs": 2})) == 0
    config_before = (run / "config.yaml").read_text()
    assert main(_single(digits_shards, run, **{"train.epochs": 4})) == 0
    assert [r["epoch"] for r in json.loads((run / "metrics.json").read_text())["history"]] == [1, 2, 3, 4]
    info = json.loads((run / "run_info.json").read_text())
    assert info["resumes"][-1]["changed"] == {"train.epochs": [2, 4]}
    assert (run / "config.yaml").read_text() == config_before  # the record as the run began
    capsys.readouterr()
    assert main(_single(digits_shards, run, **{"train.epochs": 4, "optim.lr": 2e-3})) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.lr was 0.001, now 0.002" in err[0]
    assert main(_single(digits_shards, run, **{"train.epochs": 3})) == 2
    assert "it trained 4 epochs, more than train.epochs=3" in capsys.readouterr().err


def test_sigterm_leaves_a_resumable_checkpoint(digits_shards, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "stream_pml.train", *_single(digits_shards, run)]
    proc = subprocess.Popen(cmd, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while _steps_logged(run) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]  # not finished, but stopped cleanly
    assert "stopped by a signal" in out
    state = torch.load(ckpt.list_checkpoints(run)[-1] / ckpt.MAIN_FILE, weights_only=False)
    assert 4 <= state["progress"]["step"] < 24
    reference = tmp_path / "reference"
    assert main(_single(digits_shards, reference)) == 0
    assert main(_single(digits_shards, run)) == 0
    _assert_same_run(reference, run)
