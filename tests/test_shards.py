"""Shard format: written by our writer, read back by independent tools."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import webdataset as wds

from shard_tools.cli import main as shard_main
from shard_tools.manifest import ManifestError, load_manifest


def _read_back(out, split):
    """Every sample of a split via the `webdataset` library (not our reader)."""
    manifest = load_manifest(out)
    urls = [str(out / s.name) for s in manifest.splits[split].shards]
    samples = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        samples.append({
            "row": int(np.frombuffer(sample["row"], "<i8")[0]),
            "pos": np.frombuffer(sample["pos"], "<i4").tolist(),
            "neg": np.frombuffer(sample["neg"], "<i4").tolist(),
            "meta": json.loads(sample["json"]),
            "jpg": sample["jpg"],
        })
    return manifest, samples


@pytest.fixture(scope="module")
def coco128_shards(sample_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("coco128")
    root = sample_data / "coco128"
    rc = shard_main(["build", "coco", "--images", str(root / "images/train2017"),
                     "--annotations", str(root / "annotations/instances_train2017.json"),
                     "--out", str(out), "--split", "train", "--shard-size", "12"])
    assert rc == 0
    return out


def test_coco_shards_hold_the_json_labels(coco128_shards, sample_data):
    root = sample_data / "coco128"
    coco = json.loads((root / "annotations/instances_train2017.json").read_text())
    cats = sorted(c["id"] for c in coco["categories"])
    expected: dict[str, set[int]] = {img["file_name"][:-4]: set() for img in coco["images"]}
    by_id = {img["id"]: img["file_name"][:-4] for img in coco["images"]}
    for ann in coco["annotations"]:
        expected[by_id[ann["image_id"]]].add(cats.index(ann["category_id"]))

    manifest, samples = _read_back(coco128_shards, "train")
    assert manifest.classes == (root / "classes.txt").read_text().split("\n")[:80]
    assert len(samples) == len(expected) == 32
    keys = (coco128_shards / "train.keys.txt").read_text().split()
    got = {}
    for s in samples:
        key = keys[s["row"]]
        assert s["meta"]["key"] == key
        assert set(s["pos"]) | set(s["neg"]) == set(range(80)), "COCO is fully labelled"
        assert not set(s["pos"]) & set(s["neg"])
        got[key] = set(s["pos"])
        # Images pass through byte-identical when no re-encoding is asked for.
        assert s["jpg"] == (root / "images/train2017" / f"{key}.jpg").read_bytes()
    assert got == expected
    # 000000000250 and 000000000508 have no objects: kept, with every class negative.
    assert got["000000000250"] == set() and got["000000000508"] == set()


def test_rows_follow_shard_order(coco128_shards):
    manifest, samples = _read_back(coco128_shards, "train")
    assert [s["row"] for s in samples] == list(range(32))
    assert [s.num_samples for s in manifest.splits["train"].shards] == [12, 12, 8]
    assert [s.row_start for s in manifest.splits["train"].shards] == [0, 12, 24]


def test_index_files_equal_dali_wds2idx(coco128_shards, tmp_path):
    manifest = load_manifest(coco128_shards)
    for shard in manifest.splits["train"].shards:
        ref = tmp_path / "ref.idx"
        subprocess.run([sys.executable, "-m", "wds2idx", str(coco128_shards / shard.name), str(ref)],
                       check=True, capture_output=True)
        assert ref.read_text() == (coco128_shards / shard.index).read_text()


def test_build_is_deterministic(sample_data, tmp_path):
    root = sample_data / "coco128"
    args = ["build", "coco", "--images", str(root / "images/train2017"), "--annotations",
            str(root / "annotations/instances_train2017.json"), "--shard-size", "64"]
    assert shard_main(args + ["--out", str(tmp_path / "a")]) == 0
    assert shard_main(args + ["--out", str(tmp_path / "b")]) == 0
    a, b = load_manifest(tmp_path / "a"), load_manifest(tmp_path / "b")
    assert a.fingerprint() == b.fingerprint()


def test_missing_image_is_reported_not_fatal(sample_data, tmp_path):
    root = sample_data / "coco128"
    coco = json.loads((root / "annotations/instances_train2017.json").read_text())
    coco["images"].append({"id": 999999999, "file_name": "does_not_exist.jpg"})
    coco["annotations"].append({"id": 1, "image_id": 5, "category_id": 1})  # no such image
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco))
    out = tmp_path / "out"
    assert shard_main(["build", "coco", "--images", str(root / "images/train2017"),
                       "--annotations", str(ann), "--out", str(out)]) == 0
    report = (out / "build_report.csv").read_text()
    assert "missing_image" in report and "does_not_exist.jpg" in report
    assert "label_without_image" in report
    assert load_manifest(out).splits["train"].num_samples == 32
    # --strict turns the same input into an error.
    assert shard_main(["build", "coco", "--images", str(root / "images/train2017"),
                       "--annotations", str(ann), "--out", str(tmp_path / "strict"), "--strict"]) == 2


def test_corrupt_image_is_skipped_and_named(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    labels = tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 50, 0, 0)).save(images / f"im{i}.jpg")
        (labels / f"im{i}.txt").write_text("1 0.5 0.5 0.1 0.1\n")
    good = (images / "im2.jpg").read_bytes()
    (images / "im2.jpg").write_bytes(good[: len(good) // 2])  # truncated
    classes = tmp_path / "classes.txt"
    classes.write_text("a\nb\n")
    out = tmp_path / "out"
    assert shard_main(["build", "yolo", "--images", str(images), "--labels", str(labels),
                       "--classes", str(classes), "--out", str(out)]) == 0
    assert load_manifest(out).splits["train"].num_samples == 2
    assert "im2.jpg" in (out / "build_report.csv").read_text()


def test_manifest_errors_name_the_file(tmp_path, digits_shards):
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(ManifestError, match="manifest.json"):
        load_manifest(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    data = json.loads((digits_shards / "manifest.json").read_text())
    data["splits"]["train"]["num_samples"] += 1
    (bad / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"bad/manifest.json: split train shards hold 96"):
        load_manifest(bad)


def test_digits_labels_are_multi_label_and_uneven(digits_shards):
    _, samples = _read_back(digits_shards, "train")
    counts = np.zeros(10)
    for s in samples:
        counts[s["pos"]] += 1
        assert 1 <= len(s["pos"]) <= 4
    assert np.mean([len(s["pos"]) for s in samples]) > 1.5
    assert counts.max() > 2 * counts.min()
