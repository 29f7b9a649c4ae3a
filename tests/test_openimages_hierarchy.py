"""Open Images labels expanded along the official class hierarchy, with the builder's one
conflict rule, on the real 601-class list and the real hierarchy file."""

from __future__ import annotations

import csv
import json
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from shard_tools.label_columns import read_hierarchy
from shard_tools.manifest import load_manifest
from shard_tools.sources import read_class_list
from tests.test_builders import _build, _jpeg, _samples

DATA = Path(__file__).resolve().parent / "data" / "openimages"
HIERARCHY = DATA / "bbox_labels_600_hierarchy.json"
CLASSES = DATA / "class-descriptions-boxable.csv"


def is_a_closure() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Ancestors and descendants of every MID by breadth-first search over the JSON's
    Subcategory edges (Part is not is-a), the root left out: written apart from the builder."""
    tree = json.loads(HIERARCHY.read_text())
    parents: dict[str, set[str]] = {}
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in node.get("Subcategory", []):
            parents.setdefault(child["LabelName"], set()).add(node["LabelName"])
            stack.append(child)
        stack.extend(node.get("Part", []))
    root = tree["LabelName"]
    up: dict[str, set[str]] = {}
    for mid in parents:
        seen, queue = set(), deque(parents[mid])
        while queue:
            p = queue.popleft()
            if p != root and p not in seen:
                seen.add(p)
                queue.extend(parents.get(p, ()))
        up[mid] = seen
    down: dict[str, set[str]] = {m: set() for m in up}
    for mid, ancestors in up.items():
        for a in ancestors:
            down.setdefault(a, set()).add(mid)
    return up, down


def test_hierarchy_closure_follows_subcategory_only():
    mids, _ = read_class_list(CLASSES)
    h = read_hierarchy(HIERARCHY, mids)
    up, down = is_a_closure()
    assert len(mids) == 601 and not h.not_in_hierarchy
    for c, mid in enumerate(mids):
        assert {mids[a] for a in h.ancestors_of(c)} == up[mid], mid
        assert {mids[d] for d in h.descendants_of(c)} == down.get(mid, set()), mid
    # Some classes have several parents and some chains are deep: the test means something.
    assert max(len(v) for v in up.values()) >= 3
    assert sum(len(h.ancestors_of(c)) for c in range(len(mids))) > 601


def _write_labels(path: Path, rows: list[tuple[str, str, int]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageID", "Source", "LabelName", "Confidence"])
        for image, mid, conf in rows:
            w.writerow([image, "verification", mid, conf])


def test_build_with_hierarchy_equals_the_closure_and_reports_its_conflicts(tmp_path):
    mids, names = read_class_list(CLASSES)
    up, down = is_a_closure()
    name_of = dict(zip(mids, names))
    rng = np.random.default_rng(0)
    deep = [m for m in mids if len(up[m]) >= 2]
    rows, expected = [], {}
    for i in range(30):
        image = f"{i:016x}"
        chosen = rng.choice(len(mids), size=6, replace=False)
        pos = {deep[i % len(deep)], mids[chosen[0]], mids[chosen[1]]}
        neg = {mids[c] for c in chosen[2:]} - pos
        rows += [(image, m, 1) for m in sorted(pos)] + [(image, m, 0) for m in sorted(neg)]
        exp_pos = pos | {a for m in pos for a in up[m]}
        exp_neg = neg | {d for m in neg for d in down.get(m, ())}
        expected[image] = ({name_of[m] for m in exp_pos - exp_neg}, {name_of[m] for m in exp_neg - exp_pos})
        _jpeg(tmp_path / "images" / f"{image}.jpg")
    # A positive child under a verified-negative parent: both entries are in conflict.
    child = deep[0]
    parent = sorted(up[child])[0]
    rows += [("ffffffffffffffff", child, 1), ("ffffffffffffffff", parent, 0)]
    _jpeg(tmp_path / "images" / "ffffffffffffffff.jpg")
    labels = tmp_path / "labels.csv"
    _write_labels(labels, rows)
    out = tmp_path / "out"
    assert _build("openimages", "--images", tmp_path / "images", "--labels", labels, "--classes", CLASSES,
                  "--hierarchy", HIERARCHY, "--out", out) == 0
    got = _samples(out)
    for image, (pos, neg) in expected.items():
        assert got[image]["pos"] == pos and got[image]["neg"] == neg, image
    conflict = got["ffffffffffffffff"]
    assert name_of[child] not in conflict["pos"] | conflict["neg"]
    assert name_of[parent] not in conflict["pos"] | conflict["neg"]
    with open(out / "build_report.csv") as f:
        report = [r for r in csv.DictReader(f) if "ffffffffffffffff" in r["detail"]]
    assert {r["problem"] for r in report} == {"conflicting_labels"} and len(report) >= 2
    assert any("via the hierarchy" in r["detail"] for r in report)
    info = load_manifest(out).splits["train"].labels["hierarchy"]
    assert info["relation"] == "Subcategory" and info["file"] == str(HIERARCHY)
    assert info["derived_rows"]["positive_rows"] > 0 and info["derived_rows"]["negative_rows"] > 0
    # Without --hierarchy the same files give the rows as they are, and say nothing of one.
    plain = tmp_path / "plain"
    assert _build("openimages", "--images", tmp_path / "images", "--labels", labels, "--classes", CLASSES,
                  "--out", plain) == 0
    assert load_manifest(plain).splits["train"].labels == {}
    first = rows[0][0]
    assert _samples(plain)[first]["pos"] < got[first]["pos"]


def test_a_hierarchy_that_is_not_one_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "h.json"
    bad.write_text('{"Subcategory": []}')
    (tmp_path / "labels.csv").write_text("ImageID,Source,LabelName,Confidence\n")
    rc = _build("openimages", "--images", tmp_path, "--labels", tmp_path / "labels.csv", "--classes", CLASSES,
                "--hierarchy", bad, "--out", tmp_path / "out")
    assert rc == 2 and "h.json: root: a node without LabelName" in capsys.readouterr().err
    rc = _build("openimages", "--images", tmp_path, "--labels", tmp_path / "labels.csv", "--classes", CLASSES,
                "--hierarchy", tmp_path / "missing.json", "--out", tmp_path / "out")
    assert rc == 2 and "missing.json does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("num_classes", [601, 600])
def test_the_601_row_list_and_a_600_class_variant_both_build(tmp_path, num_classes):
    mids, names = read_class_list(CLASSES)
    lines = CLASSES.read_text().splitlines()[:num_classes]
    classes = tmp_path / "classes.csv"
    classes.write_text("\n".join(lines) + "\n")
    dropped = mids[num_classes:]
    rows = [("00000000000000aa", mids[0], 1), ("00000000000000aa", mids[-1], 1)]
    _write_labels(tmp_path / "labels.csv", rows)
    _jpeg(tmp_path / "images" / "00000000000000aa.jpg")
    out = tmp_path / "out"
    assert _build("openimages", "--images", tmp_path / "images", "--labels", tmp_path / "labels.csv",
                  "--classes", classes, "--hierarchy", HIERARCHY, "--out", out) == 0
    manifest = load_manifest(out)
    assert len(manifest.classes) == num_classes
    with open(out / "build_report.csv") as f:
        problems = [r for r in csv.DictReader(f)]
    # A label of a class outside the list is counted, never silently mapped to another.
    assert [r["problem"] for r in problems if r["problem"] == "unknown_class"] == ["unknown_class"] * len(dropped)
