from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Real sample data, inside the repository (tests/data/README.md says what and where from).
SAMPLE_DATA = Path(__file__).resolve().parent / "data"

# Tests run on 2 cores; keep every process to its share so parallel workers do not thrash.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def sample_data() -> Path:
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """Tiny embedded-dataset shards: 4 train shards of 24, 1 val, 2 test shards."""
    from shard_tools.cli import main

    out = tmp_path_factory.mktemp("digits")
    rc = main(["build", "digits", "--out", str(out), "--num-train", "96", "--num-val", "16",
               "--num-test", "40", "--shard-size", "24", "--image-size", "32"])
    assert rc == 0
    return out


def tiny_overrides(shards: Path, run_dir: Path, **extra: object) -> list[str]:
    base = {
        "data.shards": shards, "data.image_size": 32, "data.batch_size": 8,
        "data.eval_batch_size": 16, "data.num_threads": 1, "data.shuffle_buffer": 8,
        "model.arch": "mobilenet_v3_small", "optim.lr": 1e-3, "train.epochs": 1,
        "train.run_dir": run_dir, "train.log_every": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
