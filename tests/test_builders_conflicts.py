"""Issue 17: one conflict rule in every builder, NUS-WIDE's official test split, a build report
that keeps every split, and ``fully_labelled`` taken from the data."""

from __future__ import annotations

import csv
import itertools
import json
import re
from pathlib import Path

import pytest

from shard_tools.cli import main as shard_main
from shard_tools.manifest import load_manifest
from tests.test_builders import _build, _jpeg, _samples

# Every order of up to three rows for one (image, class): 1 = positive row, 0 = negative row.
SEQUENCES = [seq for n in (1, 2, 3) for seq in itertools.product((1, 0), repeat=n)]


def _report_rows(out: Path, split: str | None = None) -> list[dict]:
    with open(out / "build_report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if split is None or r.get("split") == split]


def _lines_named(detail: str) -> list[str]:
    return re.findall(r"[^\s,()]+:\d+", detail)


def _round_robin(cases: dict[str, tuple[int, ...]]):
    """(image, row number within its sequence, value) with the rows of different images
    interleaved, as label files from several sources are."""
    for k in range(3):
        for image, seq in cases.items():
            if k < len(seq):
                yield image, seq[k]


def _check_rule(out: Path, lines: dict[str, list[str]], cases: dict[str, tuple[int, ...]],
                key_of, class_label: str, class_name: str) -> None:
    """Both values among an (image, class)'s rows -> unknown and one conflict row naming every
    line; one value repeated -> that value and one duplicate row naming every line."""
    got = _samples(out)
    for image, seq in cases.items():  # values first: a wrong label is the worse failure
        labels = {k: got[key_of(image)][k] for k in ("pos", "neg")}
        if set(seq) == {0, 1}:
            assert class_name not in labels["pos"] | labels["neg"], (seq, labels)
        else:
            assert class_name in (labels["pos"] if seq[0] else labels["neg"]), (seq, labels)
    rows = _report_rows(out)
    for image, seq in cases.items():
        mine = [r for r in rows if f"image {key_of(image)} " in r["detail"]]
        expected = ["conflicting_labels"] if set(seq) == {0, 1} else ["duplicate_label"] if len(seq) > 1 else []
        assert [r["problem"] for r in mine] == expected, (seq, mine)
        for r in mine:
            assert r["where"] == lines[image][0]
            assert sorted(_lines_named(r["detail"])) == sorted(lines[image]), (seq, r["detail"])
            assert class_label in r["detail"] and r["split"] == "train"
    assert sum(r["problem"] == "conflicting_labels" for r in rows) == 8  # 2 of length 2, 6 of 3
    assert sum(r["problem"] == "duplicate_label" for r in rows) == 4


def _case_name(seq: tuple[int, ...]) -> str:
    return "s" + "".join(map(str, seq))


def test_openimages_conflict_rule_every_order(tmp_path, sample_data):
    fmt = sample_data / "openimages"
    cases = {_case_name(s): s for s in SEQUENCES}
    labels = tmp_path / "labels.csv"
    text, lines = ["ImageID,Source,LabelName,Confidence"], {i: [] for i in cases}
    sources = itertools.cycle(["crowdsource-verified", "verification", "human"])
    for image, value in _round_robin(cases):
        text.append(f"{image},{next(sources)},/m/011k07,{value}")  # Tortoise
        lines[image].append(f"{labels}:{len(text)}")
    for image in cases:
        text.append(f"{image},verification,/m/012074,0")  # Magpie: one row, untouched by the rule
        _jpeg(tmp_path / "images" / f"{image}.jpg")
    labels.write_text("\n".join(text) + "\n")
    out = tmp_path / "out"
    assert _build("openimages", "--images", tmp_path / "images", "--labels", labels,
                  "--classes", fmt / "class-descriptions-boxable.csv", "--out", out) == 0
    _check_rule(out, lines, cases, lambda i: i, "/m/011k07 (Tortoise)", "Tortoise")
    assert all(s["neg"] >= {"Magpie"} for s in _samples(out).values())


def test_voc_conflict_rule_every_order(tmp_path):
    root = tmp_path / "VOC2007"
    main = root / "ImageSets" / "Main"
    main.mkdir(parents=True)
    cases = {_case_name(s): s for s in SEQUENCES}
    cat, lines = [], {i: [] for i in cases}
    for image, value in _round_robin(cases):
        cat.append(f"{image} {' 1' if value else '-1'}")
        lines[image].append(f"{main / 'cat_trainval.txt'}:{len(cat)}")
    (main / "cat_trainval.txt").write_text("\n".join(cat) + "\n")
    (main / "dog_trainval.txt").write_text("".join(f"{i} -1\n" for i in cases))
    for image in cases:
        _jpeg(root / "JPEGImages" / f"{image}.jpg")
    out = tmp_path / "out"
    assert _build("voc", "--root", root, "--out", out) == 0
    _check_rule(out, lines, cases, lambda i: i, "class cat:", "cat")
    assert all(s["neg"] >= {"dog"} for s in _samples(out).values())
    assert not load_manifest(out).splits["train"].fully_labelled


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_list_conflict_rule_every_order(tmp_path, fmt):
    cases = {_case_name(s): s for s in SEQUENCES}
    listing = tmp_path / f"list.{fmt}"
    text, lines = ["path,labels,negatives"] if fmt == "csv" else [], {i: [] for i in cases}
    for image, value in _round_robin(cases):
        pos, neg = (["cat"], []) if value else ([], ["cat"])
        if fmt == "csv":
            text.append(f"{image}.jpg,{'|'.join(pos)},{'|'.join(neg)}")
        else:
            text.append(json.dumps({"path": f"{image}.jpg", "labels": pos, "negatives": neg}))
        lines[image].append(f"{listing}:{len(text)}")
    listing.write_text("\n".join(text) + "\n")
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    for image in cases:
        _jpeg(tmp_path / "imgs" / f"{image}.jpg")
    out = tmp_path / "out"
    # --absent negative: dog, never named, is a negative; a conflicting cat stays unknown, so
    # the split is not fully labelled.
    assert _build(fmt, "--list", listing, "--images", tmp_path / "imgs", "--classes", tmp_path / "classes.txt",
                  "--out", out) == 0
    _check_rule(out, lines, cases, lambda i: f"{i}.jpg", "class cat:", "cat")
    assert all("dog" in s["neg"] for s in _samples(out).values())
    assert not load_manifest(out).splits["train"].fully_labelled


def test_list_without_conflict_is_fully_labelled(tmp_path):
    for name in ("a", "b"):
        _jpeg(tmp_path / "imgs" / f"{name}.jpg")
    (tmp_path / "list.csv").write_text("path,labels\na.jpg,cat\nb.jpg,dog\n")
    out = tmp_path / "out"
    assert _build("csv", "--list", tmp_path / "list.csv", "--images", tmp_path / "imgs", "--out", out) == 0
    assert load_manifest(out).splits["train"].fully_labelled


# -- CUB: fully_labelled from the data, and the shared conflict rule ------------------------

def _cub(root: Path, label_lines: list[str]) -> None:
    (root / "attributes").mkdir(parents=True, exist_ok=True)
    (root / "attributes" / "attributes.txt").write_text(
        "1 has_bill_shape::dagger\n2 has_wing_color::blue\n3 has_size::small\n")
    (root / "images.txt").write_text("1 001.Albatross/a.jpg\n2 001.Albatross/b.jpg\n3 002.Auklet/c.jpg\n")
    (root / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n")
    for rel in ("001.Albatross/a.jpg", "001.Albatross/b.jpg", "002.Auklet/c.jpg"):
        _jpeg(root / "images" / rel)
    (root / "attributes" / "image_attribute_labels.txt").write_text("\n".join(label_lines) + "\n")


def test_cub_fully_labelled_follows_the_data(tmp_path):
    complete = [f"{i} {a} {(i + a) % 2} 3 1.0" for i in (1, 3) for a in (1, 2, 3)]
    root = tmp_path / "a" / "CUB_200_2011"
    _cub(root, complete + ["2 1 1 3 1.0", "2 2 0 3 1.0"])  # test image 2: no line for attribute 3
    out = tmp_path / "out_a"
    assert _build("cub", "--root", root, "--out", out) == 0
    splits = load_manifest(out).splits
    assert splits["train"].fully_labelled and not splits["test"].fully_labelled

    # Attribute 1 of image 1 given as 1, 0, 1: unknown, so train is no longer fully labelled.
    root = tmp_path / "b" / "CUB_200_2011"
    _cub(root, complete + ["1 1 0 3 1.0", "1 1 1 3 1.0", "2 1 1 3 1.0", "2 2 0 3 1.0", "2 3 0 3 1.0"])
    out = tmp_path / "out_b"
    assert _build("cub", "--root", root, "--out", out) == 0
    splits = load_manifest(out).splits
    assert not splits["train"].fully_labelled and splits["test"].fully_labelled
    train = _samples(out, "train")
    a = train["001.Albatross_a"]
    assert "has_bill_shape::dagger" not in a["pos"] | a["neg"]
    conflicts = [r for r in _report_rows(out) if r["problem"] == "conflicting_labels"]
    assert len(conflicts) == 1 and "1 (has_bill_shape::dagger)" in conflicts[0]["detail"]
    labels_file = root / "attributes" / "image_attribute_labels.txt"
    assert sorted(_lines_named(conflicts[0]["detail"])) == [f"{labels_file}:{n}" for n in (1, 7, 8)]
    assert conflicts[0]["split"] == "train+test"  # label lines are read before the split is known


# -- NUS-WIDE official train/test layout ---------------------------------------------------

CONCEPTS = ["airport", "animal", "beach"]
TRAIN = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
TEST = [[0, 1, 1], [1, 0, 1], [1, 1, 0]]


def _nuswide(tmp_path: Path, test_list_len: int = 3) -> Path:
    (tmp_path / "Concepts81.txt").write_text("\n".join(CONCEPTS) + "\n")
    lists = tmp_path / "ImageList"
    lists.mkdir()
    train = [f"C:\\ImageData\\Flickr\\train\\{i:04d}_1.jpg" for i in range(3)]
    test = [f"C:\\ImageData\\Flickr\\test\\{i:04d}_2.jpg" for i in range(test_list_len)]
    (lists / "TrainImagelist.txt").write_text("\n".join(train) + "\n")
    (lists / "TestImagelist.txt").write_text("\n".join(test) + "\n")
    for line in train + test:
        _jpeg(tmp_path / "img" / line.split("ImageData\\")[1].replace("\\", "/"))
    labels = tmp_path / "Groundtruth" / "TrainTestLabels"
    labels.mkdir(parents=True)
    for j, c in enumerate(CONCEPTS):
        (labels / f"Labels_{c}_Train.txt").write_text("".join(f"{row[j]}\n" for row in TRAIN))
        (labels / f"Labels_{c}_Test.txt").write_text("".join(f"{row[j]}\n" for row in TEST))
    return labels


def _nus_args(tmp_path: Path, which: str, *extra) -> list:
    return ["nuswide", "--images", tmp_path / "img", "--image-list", tmp_path / "ImageList" / f"{which}Imagelist.txt",
            "--concepts", tmp_path / "Concepts81.txt", "--labels-dir", tmp_path / "Groundtruth" / "TrainTestLabels",
            "--out", tmp_path / "out", *extra]


def test_nuswide_official_test_split_reads_test_labels(tmp_path):
    _nuswide(tmp_path)  # equal counts: taking _Train for the test list would pass unnoticed
    assert _build(*_nus_args(tmp_path, "Test", "--split", "test")) == 0
    assert _build(*_nus_args(tmp_path, "Train", "--split", "train")) == 0
    for split, which, matrix in (("test", "test", TEST), ("train", "train", TRAIN)):
        got = _samples(tmp_path / "out", split)
        for i, row in enumerate(matrix):
            key = f"Flickr/{which}/{i:04d}_{1 if which == 'train' else 2}.jpg"
            assert got[key]["pos"] == {c for c, v in zip(CONCEPTS, row) if v}, (split, key)
    # An explicit suffix serves a split named otherwise.
    assert _build(*_nus_args(tmp_path, "Test", "--split", "heldout", "--labels-suffix", "_Test")) == 0
    assert load_manifest(tmp_path / "out").splits["heldout"].num_samples == 3


def test_nuswide_count_mismatch_names_both_files(tmp_path, capsys):
    _nuswide(tmp_path, test_list_len=2)
    assert _build(*_nus_args(tmp_path, "Test", "--split", "test")) == 2
    err = capsys.readouterr().err.strip()
    assert "Labels_airport_Test.txt: 3 lines" in err and "TestImagelist.txt has 2" in err
    assert len(err.splitlines()) == 1
    # A split naming neither official file is refused, not guessed.
    assert _build(*_nus_args(tmp_path, "Test", "--split", "val")) == 2
    assert "--split train|test or --labels-suffix" in capsys.readouterr().err


# -- build report across splits ------------------------------------------------------------

def test_report_keeps_every_split_and_verify_prints_each(tmp_path, capsys):
    root = tmp_path / "VOC2007"
    main = root / "ImageSets" / "Main"
    main.mkdir(parents=True)
    for i in range(4):
        _jpeg(root / "JPEGImages" / f"00000{i}.jpg")
    good = (root / "JPEGImages" / "000003.jpg").read_bytes()
    (root / "JPEGImages" / "000003.jpg").write_bytes(good[: len(good) // 2])  # corrupt, in test
    (main / "cat_trainval.txt").write_text("000000 1\n000001 -1\n000009 1\n")  # 000009: no image
    (main / "cat_test.txt").write_text("000002 1\n000003 -1\nnot a line\n")
    out = tmp_path / "out"
    assert _build("voc", "--root", root, "--image-set", "trainval", "--split", "trainval", "--out", out) == 0
    assert _build("voc", "--root", root, "--image-set", "test", "--split", "test", "--out", out) == 0
    # Rebuilding a split replaces its own rows only.
    assert _build("voc", "--root", root, "--image-set", "trainval", "--split", "trainval", "--out", out) == 0

    def problems(split):
        return sorted((r["problem"], Path(r["where"]).name) for r in _report_rows(out, split))

    assert problems("trainval") == [("missing_image", "cat_trainval.txt:3")]
    assert problems("test") == [("bad_image", "000003.jpg"), ("malformed_line", "cat_test.txt:3")]
    capsys.readouterr()
    assert shard_main(["verify", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "build report, split trainval: 1 problems (missing_image 1)" in printed
    assert "build report, split test: 2 problems (bad_image 1, malformed_line 1)" in printed
