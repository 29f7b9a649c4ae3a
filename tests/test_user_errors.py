"""What a new user meets in the first week, through the real entry points (subprocesses):
each case asserts the exit status and that the last line names the file, line, key or
sample, and that nothing of the run or build is lost or left stale."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def last_line(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.strip().splitlines()[-1]


def test_train_without_a_run_file_or_with_an_empty_one_does_not_start(tmp_path):
    proc = run("stream_pml.train")
    assert proc.returncode == 2 and "the defaults alone are not a run" in last_line(proc)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    proc = run("stream_pml.train", "--config", str(empty))
    assert proc.returncode == 2 and last_line(proc) == (
        f"config error: {empty}: the run file is empty; say at least where the shards are (data.shards) "
        "and what to train (see configs/demo.yaml)")


def test_config_errors_are_one_line_naming_file_line_column_or_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  shards: [a\n  batch_size: 2\n")
    proc = run("stream_pml.train", "--config", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"config error: {bad}:3:13: YAML syntax error: expected ',' or ']', but got ':'"
    typo = tmp_path / "typo.yaml"
    typo.write_text("data:\n  batchsize: 3\n")
    proc = run("stream_pml.train", "--config", str(typo))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "'data.batchsize'" in proc.stderr and "did you mean data.batch_size?" in proc.stderr


def test_a_resume_log_holds_each_step_once_and_run_info_records_threads(digits_shards, tmp_path):
    """Killed after a mid-epoch checkpoint and resumed: train_log.csv lists every step once."""
    run_dir = tmp_path / "run"
    argv = tiny_overrides(digits_shards, run_dir, **{"train.checkpoint_every": 4, "train.epochs": 2})
    # SIGTERM-free kill: stop at step 6 (after the step-4 checkpoint) with SIGKILL.
    code = ("import os, signal, sys; from stream_pml.trainer import Trainer; real = Trainer.train_step\n"
            "def step(self, b, e):\n"
            "    if self.step == 6: os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return real(self, b, e)\n"
            "Trainer.train_step = step\n"
            "from stream_pml.train import main; sys.exit(main(sys.argv[1:]))")
    killed = subprocess.run([sys.executable, "-c", code, *argv], env=ENV, capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert killed.returncode == -9
    with open(run_dir / "train_log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 7))
    proc = run("stream_pml.train", *argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(run_dir / "train_log.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == list(range(1, steps[-1] + 1)), "a step logged twice or missing"
    info = json.loads((run_dir / "run_info.json").read_text())
    assert {"compute_threads", "omp_threads", "decode_threads"} <= set(info)
    assert info["resumes"][0]["step"] == 4


def test_a_rebuild_into_a_used_directory_is_refused_and_overwrite_leaves_no_stale_shard(tmp_path):
    out = tmp_path / "digits"
    base = ["shard_tools", "build", "digits", "--out", str(out), "--num-val", "8", "--num-test", "8",
            "--shard-size", "20", "--image-size", "32"]
    assert run(*base, "--num-train", "100").returncode == 0
    assert (out / "train-000004.tar").exists()
    proc = run(*base, "--num-train", "60")
    assert proc.returncode == 2
    assert last_line(proc) == (f"shard-tools: error: {out}: holds another build of split train (5 shards, other "
                               "inputs or settings); use --overwrite to replace it or a new --out")
    proc = run(*base, "--num-train", "60", "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.glob("train-*")) == [f"train-00000{i}.{x}" for i in range(3) for x in ("idx", "tar")]
    assert run("shard_tools", "verify", str(out)).stdout.splitlines()[0].startswith("0 problems in")
    # A file no manifest lists (e.g. copied in by hand) is reported, and the count leads.
    shutil.copy(out / "train-000000.tar", out / "train-000009.tar")
    (out / "val-000000.tar").unlink()
    proc = run("shard_tools", "verify", str(out))
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 1 and lines[0].startswith("2 problems in")
    assert any("train-000009.tar: not listed in the manifest" in line for line in lines)


def _jpeg(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(path, "JPEG")


def test_a_label_list_with_a_bad_byte_builds_the_rest_and_names_the_line(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        _jpeg(images / name)
    listing = tmp_path / "list.csv"
    listing.write_bytes(b"path,labels\na.jpg,cat\nb.jpg,d\xf6g\nc.jpg,dog|cat\nmissing.jpg,dog\n")
    out = tmp_path / "shards"
    proc = run("shard_tools", "build", "csv", "--list", str(listing), "--images", str(images), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out / "build_report.csv") as f:
        report = list(csv.DictReader(f))
    undecodable = [r for r in report if r["problem"] == "undecodable_line"]
    assert len(undecodable) == 1 and undecodable[0]["where"] == f"{listing}:3"
    assert "0xf6 at column 8" in undecodable[0]["detail"]
    missing = [r for r in report if "missing.jpg" in r["where"]]
    assert missing and f"listed at {listing}:5" in missing[0]["detail"]
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["num_samples"] == 2

    header_only = tmp_path / "empty.csv"
    header_only.write_text("path,labels\n")
    proc = run("shard_tools", "build", "csv", "--list", str(header_only), "--images", str(images),
               "--out", str(tmp_path / "o2"))
    assert proc.returncode == 2 and last_line(proc) == f"shard-tools: error: {header_only}: the list has a header and no rows"


@pytest.fixture(scope="module")
def trained(digits_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("user-errors") / "run"
    proc = run("stream_pml.train", *tiny_overrides(digits_shards, run_dir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


def _corrupt_one_jpeg(src: Path, dst: Path) -> tuple[str, int]:
    """A copy of the shards with the first test sample's JPEG bytes overwritten."""
    shutil.copytree(src, dst)
    idx = (dst / "test-000000.idx").read_text().splitlines()[1].split()
    offset, size = int(idx[1]), int(idx[2])
    with open(dst / "test-000000.tar", "r+b") as f:
        f.seek(offset)
        f.write(b"\x00" * size)
    return str(dst / "test-000000.tar"), offset


def test_predict_and_evaluate_skip_a_corrupt_jpeg_and_name_it(trained, digits_shards, tmp_path):
    shard, offset = _corrupt_one_jpeg(digits_shards, tmp_path / "shards")
    proc = run("stream_pml.cli", "predict", "--checkpoint", str(trained), "--shards", str(tmp_path / "shards"),
               "--out", str(tmp_path / "p.jsonl"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    err = proc.stderr
    assert "1 unreadable samples skipped:" in err and f"{shard}: sample at byte {offset}" in err
    assert "bytes that are not a decodable image" in err and "BytesIO" not in err
    assert "39 of 40 images predicted" in proc.stdout
    proc = run("stream_pml.cli", "evaluate", "--checkpoint", str(trained), "--shards", str(tmp_path / "shards"),
               "--out", str(tmp_path / "eval"))
    assert proc.returncode == 0 and "1 unreadable samples skipped:" in proc.stderr


def test_evaluations_of_two_datasets_do_not_overwrite_each_other(trained, digits_shards, tmp_path):
    other = tmp_path / "other"
    assert run("shard_tools", "build", "digits", "--out", str(other), "--num-train", "24", "--num-val", "8",
               "--num-test", "16", "--shard-size", "24", "--image-size", "32", "--seed", "3").returncode == 0
    out = tmp_path / "eval"
    for shards in (digits_shards, other):
        assert run("stream_pml.cli", "evaluate", "--checkpoint", str(trained), "--shards", str(shards),
                   "--out", str(out)).returncode == 0
    reports = sorted(p.name for p in out.glob("evaluation_*.json"))
    assert len(reports) == 2
    assert sorted(json.loads((out / r).read_text())["num_images"] for r in reports) == [16, 40]


def test_export_onto_a_file_and_a_resume_of_another_dataset_are_one_line(trained, digits_shards, tmp_path):
    target = tmp_path / "model.bin"
    target.write_text("keep me")
    proc = run("stream_pml.cli", "export", "--checkpoint", str(trained), "--out", str(target))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert f"--out {target} is a file" in proc.stderr and target.read_text() == "keep me"
    other = tmp_path / "other"
    assert run("shard_tools", "build", "digits", "--out", str(other), "--num-train", "48", "--num-val", "8",
               "--num-test", "8", "--shard-size", "24", "--image-size", "32", "--seed", "5").returncode == 0
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    proc = run("stream_pml.train", *tiny_overrides(other, copy))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    # The store, opened first, is the first thing that is another dataset's.
    assert last_line(proc).startswith(f"store error: {copy}/pseudo_labels.zarr: this pseudo-label store belongs "
                                      "to another run or dataset")


def test_a_lost_or_altered_store_chunk_stops_the_resume_naming_it(digits_shards, tmp_path):
    """A deleted chunk file is found when the run resumes, an altered one when it is read;
    either stops in one line naming the file and its rows; accepting the loss is explicit."""
    run_dir = tmp_path / "run"
    extra = {"loss.name": "pml", "train.epochs": 1}
    assert run("stream_pml.train", *tiny_overrides(digits_shards, run_dir, **extra)).returncode == 0
    chunks = sorted((run_dir / "pseudo_labels.zarr" / "c").rglob("*"))
    chunks = [c for c in chunks if c.is_file()]
    assert len(chunks) >= 2, "the run wrote no pseudo labels"
    lost, altered = chunks[0], chunks[1]
    saved = altered.read_bytes()
    lost.unlink()
    more = tiny_overrides(digits_shards, run_dir, **{**extra, "train.epochs": 2})
    proc = run("stream_pml.train", *more)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert last_line(proc).startswith(f"store error: {lost} (pseudo labels of rows ") and "is missing" in last_line(proc)

    altered.write_bytes(saved[:-3] + b"abc")
    proc = run("stream_pml.train", *more, "pseudo.accept_lost_chunks=true")
    assert proc.returncode == 2
    assert last_line(proc).startswith(f"data error: {altered} (pseudo labels of rows ")
    assert "crc32 differs" in last_line(proc)

    altered.write_bytes(saved)
    proc = run("stream_pml.train", *more, "pseudo.accept_lost_chunks=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{lost} is missing: rows" in proc.stderr


def test_every_command_says_what_it_does_and_its_defaults():
    for args, shown in ((["stream_pml.cli", "predict", "--help"], "(default: 0.5)"),
                        (["stream_pml.cli", "evaluate", "--help"], "(default: test)"),
                        (["stream_pml.cli", "export", "--help"], "directory for the exported files"),
                        (["shard_tools", "build", "digits", "--help"], "(default: 1000)"),
                        (["shard_tools", "verify", "--help"], "holds manifest.json"),
                        (["stream_pml.train", "--help"], "config sections: data, model, loss, optim, pseudo, train")):
        proc = run(*args)
        assert proc.returncode == 0 and shown in " ".join(proc.stdout.split()), args


def test_a_resume_with_another_learning_rate_is_refused_and_the_record_kept(trained, digits_shards, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    before = (copy / "config.yaml").read_text()
    proc = run("stream_pml.train", *tiny_overrides(digits_shards, copy, **{"optim.lr": 3e-3}))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "optim.lr was 0.001, now 0.003" in last_line(proc)
    assert (copy / "config.yaml").read_text() == before


def test_a_truncated_shard_is_skipped_past_and_named(trained, digits_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(digits_shards, shards)
    tar = shards / "test-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    proc = run("stream_pml.cli", "predict", "--checkpoint", str(trained), "--shards", str(shards),
               "--out", str(tmp_path / "p.jsonl"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    skipped = int(proc.stderr.split(" unreadable samples skipped:")[0].split()[-1])
    assert 0 < skipped <= 8 and f"{tar}: sample at byte" in proc.stderr and "truncated shard" in proc.stderr


def test_a_second_ctrl_c_stops_at_once(digits_shards, tmp_path):
    """The first SIGINT asks for a checkpoint after the step; a second one does not wait."""
    import signal
    import time

    code = ("import sys, time; from stream_pml.trainer import Trainer; real = Trainer.train_step\n"
            "def step(self, b, e):\n"
            "    print('step', flush=True); time.sleep(30); return real(self, b, e)\n"
            "Trainer.train_step = step\n"
            "from stream_pml.train import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, *tiny_overrides(digits_shards, tmp_path / "run")],
                            env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while "step" not in proc.stdout.readline():
            pass
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=20)
        assert time.monotonic() - t0 < 10 and rc == 128 + signal.SIGINT
        assert "second signal: stopping now" in proc.stderr.read()
    finally:
        proc.kill()
