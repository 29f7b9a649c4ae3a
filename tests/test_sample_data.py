"""The sample data in tests/data: intact, documented, and self-consistent."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from shard_tools.cli import main as shard_main
from shard_tools.manifest import load_manifest

from .test_shards import _read_back

DATA = Path(__file__).resolve().parent / "data"
REPO = DATA.parents[1]


def _listed() -> dict[str, str]:
    listed = {}
    for line in (DATA / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name.removeprefix("./")] = digest
    return listed


def test_every_sample_file_matches_its_recorded_checksum():
    listed = _listed()
    on_disk = {p.relative_to(DATA).as_posix() for p in DATA.rglob("*")
               if p.is_file() and p.suffix != ".md" and p.name != "SHA256SUMS"}
    assert on_disk == set(listed), f"unlisted: {sorted(on_disk - set(listed))}, missing: {sorted(set(listed) - on_disk)}"
    for name, digest in listed.items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest, f"tests/data/{name} changed"


def test_every_folder_has_a_provenance_note_naming_source_and_licence():
    for folder in sorted(p for p in DATA.iterdir() if p.is_dir()):
        note = (folder / "PROVENANCE.md").read_text()
        assert re.search(r"\b[0-9a-f]{40}\b", note), f"{folder.name}: no source commit"
        assert "## Licence" in note and "## Checks" in note, folder.name
    total_bytes = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert total_bytes < 20e6, "keep the sample data small"


def _yolo_labels(folder: Path) -> dict[str, set[int]]:
    return {p.stem: {int(line.split()[0]) for line in p.read_text().splitlines() if line.strip()}
            for p in folder.glob("*.txt")}


def test_coco_json_and_yolo_files_agree_on_every_train_image():
    root = DATA / "coco128"
    coco = json.loads((root / "annotations/instances_train2017.json").read_text())
    category_ids = sorted(c["id"] for c in coco["categories"])
    names = {c["id"]: c["name"] for c in coco["categories"]}
    # Sorted by COCO id, the categories are classes.txt's contiguous order.
    assert [names[i] for i in category_ids] == (root / "classes.txt").read_text().split("\n")[:80]
    stem = {img["id"]: img["file_name"][:-4] for img in coco["images"]}
    from_json: dict[str, set[int]] = {s: set() for s in stem.values()}
    for ann in coco["annotations"]:
        from_json[stem[ann["image_id"]]].add(category_ids.index(ann["category_id"]))
    images = {p.stem for p in (root / "images/train2017").glob("*.jpg")}
    assert set(from_json) == images and len(images) == 32
    yolo = _yolo_labels(root / "labels/train2017")
    for key in images:
        assert from_json[key] == yolo.get(key, set()), key
    assert set(yolo) - images == {"000000000656", "000000000659"}  # upstream: labels, no image


def test_yolo_build_of_the_real_val_images_keeps_their_labels(tmp_path):
    root = DATA / "coco128"
    out = tmp_path / "val"
    assert shard_main(["build", "yolo", "--images", str(root / "images/val2017"), "--labels",
                       str(root / "labels/val2017"), "--classes", str(root / "classes.txt"),
                       "--out", str(out), "--split", "test", "--shard-size", "6"]) == 0
    manifest, samples = _read_back(out, "test")
    assert manifest.splits["test"].num_samples == 16 and manifest.splits["test"].fully_labelled
    keys = (out / "test.keys.txt").read_text().split()
    expected = _yolo_labels(root / "labels/val2017")
    assert {keys[s["row"]]: set(s["pos"]) for s in samples} == expected
    for s in samples:
        assert s["jpg"] == (root / "images/val2017" / f"{keys[s['row']]}.jpg").read_bytes()
    assert load_manifest(out).classes[0] == "person"
