"""The main job end to end at Open Images' shape, on CPU: the real 601-class list and the
real hierarchy, label CSVs in the official format (a long-tailed class frequency, verified
negatives), generated images; ``shard-tools build openimages --hierarchy`` for train,
validation and test into one output, ``torchrun --nproc_per_node=2`` with
configs/openimages.yaml and small overrides, then ``stream-pml evaluate`` and ``predict``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shard_tools.manifest import load_manifest
from shard_tools.sources import read_class_list
from stream_pml.cli import main as cli

from .conftest import REPO
from .test_builders import _build, _samples
from .test_openimages_hierarchy import CLASSES, HIERARCHY, is_a_closure

pytestmark = pytest.mark.slow

SPLITS = {"train": 96, "validation": 32, "test": 32}


def _generate(root: Path, mids: list[str]) -> dict[str, dict[str, tuple[set, set]]]:
    """Images and one label CSV per split; returns the explicit (positives, negatives) per
    image. Class frequencies follow a Zipf law over a shuffled class list, so a few classes
    are in most images and most classes in none, as in Open Images."""
    rng = np.random.default_rng(5)
    weights = 1.0 / np.arange(1, len(mids) + 1) ** 1.1
    weights = (weights / weights.sum())[rng.permutation(len(mids))]
    explicit: dict[str, dict[str, tuple[set, set]]] = {}
    start = 0
    for split, n in SPLITS.items():
        folder = root / "images" / split
        folder.mkdir(parents=True)
        rows, explicit[split] = [], {}
        for i in range(start, start + n):
            image = f"{i * 7919:016x}"
            drawn = rng.choice(len(mids), size=10, replace=False, p=weights)
            num_pos = 1 + int(rng.integers(0, 4))
            pos, neg = {mids[c] for c in drawn[:num_pos]}, {mids[c] for c in drawn[num_pos:num_pos + 5]}
            explicit[split][image] = (pos, neg)
            rows += [(image, m, 1) for m in sorted(pos)] + [(image, m, 0) for m in sorted(neg)]
            pixels = rng.integers(0, 255, size=(48 + i % 17, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{image}.jpg", quality=85)
        with open(root / f"{split}-annotations-human-imagelabels.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ImageID", "Source", "LabelName", "Confidence"])
            w.writerows((image, "verification", m, c) for image, m, c in sorted(rows))
        start += n
    return explicit


def test_open_images_build_train_evaluate_predict(tmp_path, capsys):
    mids, names = read_class_list(CLASSES)
    assert len(mids) == 601
    name_of = dict(zip(mids, names))
    explicit = _generate(tmp_path, mids)
    out = tmp_path / "shards"
    for split in SPLITS:
        assert _build("openimages", "--split", split, "--images", tmp_path / "images" / split,
                      "--labels", tmp_path / f"{split}-annotations-human-imagelabels.csv",
                      "--classes", CLASSES, "--hierarchy", HIERARCHY, "--out", out, "--shard-size", 16) == 0

    # Every stored label is the closure of the explicit ones along the hierarchy, computed
    # here apart from the builder: a positive's ancestors positive, a negative's descendants
    # negative, an entry that ends both ways unknown.
    up, down = is_a_closure()
    manifest = load_manifest(out)
    assert set(manifest.splits) == set(SPLITS) and len(manifest.classes) == 601
    num_derived = 0
    for split, images in explicit.items():
        got = _samples(out, split)
        assert set(got) == set(images)
        for image, (pos, neg) in images.items():
            exp_pos = pos | {a for m in pos for a in up[m]}
            exp_neg = neg | {d for m in neg for d in down.get(m, ())}
            assert got[image]["pos"] == {name_of[m] for m in exp_pos - exp_neg}, (split, image)
            assert got[image]["neg"] == {name_of[m] for m in exp_neg - exp_pos}, (split, image)
            num_derived += len(exp_pos | exp_neg) - len(pos | neg)
        assert manifest.splits[split].labels["hierarchy"]["relation"] == "Subcategory"
    assert num_derived > 100, "the hierarchy added labels"

    # Train with the recipe: two ranks, gloo; a small backbone, 64 px, one epoch. Pieces of
    # 8 rows: the recipe's 250 exceed this 96-image split.
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "stream_pml.train", "--config", str(REPO / "configs" / "openimages.yaml"),
           f"data.shards={out}", f"train.run_dir={run}", "model.arch=mobilenet_v3_small", "data.image_size=64",
           "train.epochs=1", "data.batch_size=8", "data.eval_batch_size=16", "data.piece_rows=8",
           "data.num_threads=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test mAP" in proc.stdout

    # The run directory's per-class table: a row per class, in class order, with its MID and
    # name and the verified counts of the test split.
    tables = sorted((run / "evaluation").glob("per_class_ap_openimages-*_test.csv"))
    assert len(tables) == 1
    with open(tables[0]) as f:
        rows = list(csv.DictReader(f))
    assert [(r["class_id"], r["name"]) for r in rows] == list(zip(mids, names))
    test_pos = {m: 0 for m in mids}
    for image in explicit["test"]:
        for name in _samples(out, "test")[image]["pos"]:
            test_pos[mids[names.index(name)]] += 1
    assert {r["class_id"]: int(r["verified_positives"]) for r in rows} == test_pos
    scored = [r for r in rows if r["ap"]]
    assert all(int(r["verified_positives"]) and int(r["verified_negatives"]) for r in scored)
    recorded = json.loads((run / "metrics.json").read_text())["test"]
    assert np.mean([float(r["ap"]) for r in scored]) == pytest.approx(recorded["map"], abs=1e-5)
    table = tables[0].read_text()

    capsys.readouterr()
    assert cli(["evaluate", "--checkpoint", str(run), "--shards", str(out), "--split", "test",
                "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / tables[0].name).read_text() == table
    assert cli(["predict", "--checkpoint", str(run), "--folder", str(tmp_path / "images" / "test"),
                "--threshold", "0.0", "--out", str(tmp_path / "pred.jsonl"), "--show", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "32 of 32 images predicted" in printed[-1]
    shown = [line for line in printed if line.split(":")[0].endswith(".jpg")]
    assert len(shown) == 3 and any(name in " ".join(shown) for name in names)
    records = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert len(records) == 32
    for rec in records:
        assert [name_of[m] for m in rec["ids"]] == rec["labels"]
