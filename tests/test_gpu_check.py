"""``bash bench/gpu_check.sh --dry-run``: the GPU check's plumbing on CPU (its files, wheel
list, arguments, every check at tiny sizes, the JSON schema), so a GPU call is not spent on
a typo. The checks themselves run where there is a GPU (BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_ends_with_a_complete_report(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    from bench.gpu_check import SCHEMA

    assert report["ok"] and report["dry_run"] and not report.get("failed")
    assert set(SCHEMA) <= set(report) and report["resume_bitwise_equal"] and report["trainer_loader"] == "device"
    assert {s["rc"] for s in report["steps"].values()} == {0}


def test_gpu_check_refuses_unknown_arguments_and_unpinned_wheels(tmp_path):
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dryrun"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument --dryrun" in proc.stderr
    from bench.gpu_check import check_wheels

    bad = tmp_path / "wheels.txt"
    bad.write_text("zarr>=3\n")
    assert check_wheels(bad, tmp_path / "none") == [f"{bad}: 'zarr>=3' is not pinned (name==version)"]
    assert check_wheels(REPO / "bench" / "gpu_wheels.txt", tmp_path / "none") == []
    house = tmp_path / "house"
    house.mkdir()
    (house / "zarr-3.1.5-py3-none-any.whl").write_bytes(b"")
    assert "no wheel for zarr==3.1.6" in "\n".join(check_wheels(REPO / "bench" / "gpu_wheels.txt", house))
