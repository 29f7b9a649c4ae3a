"""Every dataset builder on real format files or generated look-alikes, and every bad input."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from shard_tools.cli import main as shard_main
from shard_tools.manifest import load_manifest
from shard_tools.sources import index_images, read_class_list
from shard_tools.writer import Report


def _jpeg(path: Path, color=(200, 30, 30), size=(24, 20), fmt="JPEG", mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(path, format=fmt)
    return path


def _samples(out: Path, split: str = "train") -> dict[str, dict]:
    """key -> {pos, neg} read back with the webdataset library."""
    manifest = load_manifest(out)
    keys = (out / f"{split}.keys.txt").read_text().splitlines()
    got = {}
    for shard in manifest.splits[split].shards:
        for s in wds.WebDataset(str(out / shard.name), shardshuffle=False, empty_check=False):
            row = int(np.frombuffer(s["row"], "<i8")[0])
            names = manifest.classes
            got[keys[row]] = {"pos": {names[c] for c in np.frombuffer(s["pos"], "<i4")},
                              "neg": {names[c] for c in np.frombuffer(s["neg"], "<i4")},
                              "jpg": s["jpg"]}
    return got


def _report(out: Path) -> list[dict]:
    with open(out / "build_report.csv") as f:
        return list(csv.DictReader(f))


def _problems(out: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in _report(out):
        counts[row["problem"]] = counts.get(row["problem"], 0) + 1
    return counts


def _build(*args) -> int:
    return shard_main(["build", *map(str, args), "--workers", "1"])


# -- Open Images -------------------------------------------------------------------------

def test_real_class_lists_parse(sample_data):
    fmt = sample_data / "openimages"
    ids, names = read_class_list(fmt / "class-descriptions-boxable.csv")
    assert len(ids) == 601 and ids[0] == "/m/011k07" and names[0] == "Tortoise"
    ids, names = read_class_list(fmt / "oidv6-class-descriptions.csv")
    assert len(ids) == 19994
    assert names[ids.index("/m/01c_0l")] == "Ducks, geese and swans"


def test_class_list_with_header(tmp_path, sample_data):
    src = (sample_data / "openimages/class-descriptions-boxable.csv").read_text()
    f = tmp_path / "with_header.csv"
    f.write_text("LabelName,DisplayName\n" + src)
    assert len(read_class_list(f)[0]) == 601


def test_machine_labels_are_never_mixed_in_silently(tmp_path, sample_data):
    fmt = sample_data / "openimages"
    images = tmp_path / "images"
    _jpeg(images / "a" / "000026e7ee790996.jpg")
    _jpeg(images / "b" / "000062a39995e348.jpg")  # subfolders are searched
    out = tmp_path / "out"
    assert _build("openimages", "--images", images, "--labels", fmt / "annotations-machine-imagelabels-sample.csv",
                  "--classes", fmt / "oidv6-class-descriptions.csv", "--out", out) == 0
    assert _problems(out)["machine_label"] == 26
    assert all(not s["pos"] and not s["neg"] for s in _samples(out).values())
    assert not load_manifest(out).splits["train"].fully_labelled

    out2 = tmp_path / "out2"
    assert _build("openimages", "--images", images, "--labels", fmt / "annotations-machine-imagelabels-sample.csv",
                  "--classes", fmt / "oidv6-class-descriptions.csv", "--out", out2,
                  "--machine-threshold", "0.8") == 0
    rows = list(csv.DictReader(open(fmt / "annotations-machine-imagelabels-sample.csv")))
    ids, names = read_class_list(fmt / "oidv6-class-descriptions.csv")
    name_of = dict(zip(ids, names))
    got = _samples(out2)
    for image in ("000026e7ee790996", "000062a39995e348"):
        expected = {name_of[r["LabelName"]] for r in rows if r["ImageID"] == image and float(r["Confidence"]) >= 0.8}
        assert got[image]["pos"] == expected and got[image]["neg"] == set()
    assert "machine_label" not in _problems(out2)


def test_openimages_human_labels_and_every_bad_input(tmp_path, sample_data):
    fmt = sample_data / "openimages"
    images = tmp_path / "images"
    for name in ("img1", "img2", "img3", "img4"):
        _jpeg(images / f"{name}.jpg")
    _jpeg(images / "other" / "img1.jpg", color=(0, 0, 255))  # duplicate ImageID
    good = (images / "img4.jpg").read_bytes()
    (images / "img4.jpg").write_bytes(good[:len(good) // 2])  # truncated
    _jpeg(images / "nolabel.jpg")  # image with no row in the label CSV
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join([
        "ImageID,Source,LabelName,Confidence",
        "img1,verification,/m/011k07,1",      # Tortoise positive
        "img1,verification,/m/012074,0",      # Magpie verified negative
        "img2,verification,/m/011k07,1",
        "img2,verification,/m/011k07,0",      # conflicting with the line above
        "img3,verification,/m/0notaclass,1",  # unknown class
        "img3,verification,/m/011q46kg,1,extra",  # malformed: 5 fields
        "img3,verification,/m/011q46kg,yes",  # malformed confidence
        "img3,verification,/m/011q46kg,1",
        "img4,verification,/m/011k07,1",
        "ghost,verification,/m/011k07,1",     # label row with no image
    ]) + "\n")
    out = tmp_path / "out"
    assert _build("openimages", "--images", images, "--labels", labels,
                  "--classes", fmt / "class-descriptions-boxable.csv", "--out", out) == 0
    problems = _problems(out)
    assert problems == {"duplicate_image_id": 1, "conflicting_labels": 1, "malformed_line": 2,
                        "unknown_class": 1, "label_without_image": 1, "image_without_labels": 1,
                        "bad_image": 1}
    report = _report(out)
    by = {r["problem"]: r for r in report}
    assert by["malformed_line"]["where"].endswith("labels.csv:7") or any(
        r["where"].endswith("labels.csv:7") for r in report if r["problem"] == "malformed_line")
    assert "img4.jpg" in by["bad_image"]["where"]
    # One row per conflict, at its first line, naming every line and the class by id and name.
    conflict = by["conflicting_labels"]
    assert conflict["where"].endswith("labels.csv:4")
    assert "labels.csv:5" in conflict["detail"] and "/m/011k07 (Tortoise)" in conflict["detail"]
    got = _samples(out)
    assert set(got) == {"img1", "img2", "img3", "nolabel"}  # img4 corrupt, ghost has no image
    assert got["img1"] == {"pos": {"Tortoise"}, "neg": {"Magpie"}, "jpg": got["img1"]["jpg"]}
    assert got["img2"]["pos"] == set() and got["img2"]["neg"] == set()  # conflict -> unknown
    assert got["img3"]["pos"] == {"Container"}
    assert got["nolabel"]["pos"] == got["nolabel"]["neg"] == set()
    # The first of the two img1 files is used (subfolder files sort after top-level ones).
    assert Image.open(io.BytesIO(got["img1"]["jpg"])).getpixel((0, 0))[0] > 150
    # --strict stops at the first problem.
    assert _build("openimages", "--images", images, "--labels", labels, "--classes",
                  fmt / "class-descriptions-boxable.csv", "--out", tmp_path / "strict", "--strict") == 2


# -- other datasets ----------------------------------------------------------------------

def test_voc_difficult_is_unknown(tmp_path):
    root = tmp_path / "VOC2007"
    for i in range(3):
        _jpeg(root / "JPEGImages" / f"00000{i}.jpg")
    main = root / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (main / "cat_trainval.txt").write_text("000000  1\n000001 -1\n000002  0\n")
    (main / "dog_trainval.txt").write_text("000000 -1\n000001  1\n000002 -1\n000009 1\n")
    (main / "trainval.txt").write_text("000000\n000001\n000002\n")
    out = tmp_path / "out"
    assert _build("voc", "--root", root, "--out", out) == 0
    got = _samples(out)
    assert got["000000"]["pos"] == {"cat"} and got["000000"]["neg"] == {"dog"}
    assert got["000002"]["pos"] == set() and got["000002"]["neg"] == {"dog"}  # cat difficult
    assert _problems(out) == {"missing_image": 1}


def test_cub_attributes_and_official_split(tmp_path):
    root = tmp_path / "CUB_200_2011"
    (root / "attributes").mkdir(parents=True)
    (root / "attributes" / "attributes.txt").write_text("1 has_bill_shape::dagger\n2 has_wing_color::blue\n3 has_size::small\n")
    (root / "images.txt").write_text("1 001.Albatross/a.jpg\n2 001.Albatross/b.jpg\n3 002.Auklet/c.jpg\n")
    (root / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n")
    for rel in ("001.Albatross/a.jpg", "001.Albatross/b.jpg", "002.Auklet/c.jpg"):
        _jpeg(root / "images" / rel)
    (root / "attributes" / "image_attribute_labels.txt").write_text("\n".join([
        "1 1 1 3 27.7", "1 2 0 3 0.9", "1 3 1 4 0 2.5",  # the official file has such 6-field lines
        "2 1 0 2 1.0", "2 2 1 3 1.0", "2 3 0 1 1.0",
        "3 1 1 4 2.0", "3 2 x 3 1.0",                    # malformed
        "3 9 1 3 1.0",                                   # unknown attribute
    ]) + "\n")
    out = tmp_path / "out"
    assert _build("cub", "--root", root, "--out", out) == 0
    manifest = load_manifest(out)
    assert set(manifest.splits) == {"train", "test"} and manifest.num_classes == 3
    train, test = _samples(out, "train"), _samples(out, "test")
    assert set(train) == {"001.Albatross_a", "002.Auklet_c"} and set(test) == {"001.Albatross_b"}
    assert train["001.Albatross_a"]["pos"] == {"has_bill_shape::dagger", "has_size::small"}
    assert test["001.Albatross_b"]["pos"] == {"has_wing_color::blue"}
    assert _problems(out) == {"malformed_line": 1, "unknown_class": 1}


@pytest.mark.parametrize("form", ["per_concept", "all_labels"])
def test_nuswide_official_lists(tmp_path, form):
    concepts = ["animal", "beach", "sky"]
    (tmp_path / "Concepts81.txt").write_text("\n".join(concepts) + "\n")
    rel = ["actor\\0001_1.jpg", "beach\\0002_2.jpg", "sky\\0003_3.jpg"]
    (tmp_path / "Imagelist.txt").write_text("".join(f"C:\\ImageData\\Flickr\\{r}\n" for r in rel))
    for r in rel:
        _jpeg(tmp_path / "img" / "Flickr" / r.replace("\\", "/"))
    matrix = [[1, 0, 1], [0, 1, 1], [0, 0, 0]]
    args = ["nuswide", "--images", tmp_path / "img", "--image-list", tmp_path / "Imagelist.txt",
            "--concepts", tmp_path / "Concepts81.txt", "--out", tmp_path / "out"]
    if form == "per_concept":
        (tmp_path / "labels").mkdir()
        for j, c in enumerate(concepts):
            (tmp_path / "labels" / f"Labels_{c}.txt").write_text("".join(f"{row[j]}\n" for row in matrix))
        args += ["--labels-dir", tmp_path / "labels"]
    else:
        (tmp_path / "all.txt").write_text("".join(" ".join(map(str, row)) + "\n" for row in matrix))
        args += ["--all-labels", tmp_path / "all.txt"]
    assert _build(*args) == 0
    got = _samples(tmp_path / "out")
    assert got["Flickr/actor/0001_1.jpg"]["pos"] == {"animal", "sky"}
    assert got["Flickr/beach/0002_2.jpg"]["neg"] == {"animal"}
    assert got["Flickr/sky/0003_3.jpg"]["pos"] == set()
    assert load_manifest(tmp_path / "out").splits["train"].fully_labelled


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_own_list_files(tmp_path, fmt):
    for name in ("a", "b", "c"):
        _jpeg(tmp_path / "imgs" / f"{name}.jpg")
    _jpeg(tmp_path / "imgs" / "p.png", fmt="PNG", mode="RGB")  # PNG is re-encoded to JPEG
    (tmp_path / "classes.txt").write_text("cat\ndog\nfox\n")
    rows = [("a.jpg", ["cat"], ["dog"]), ("b.jpg", ["dog", "wolf"], []), ("b.jpg", ["cat"], []),
            ("c.jpg", ["fox"], ["fox"]), ("p.png", ["cat"], [])]
    if fmt == "csv":
        text = "path,labels,negatives\n" + "".join(f"{p},{'|'.join(l)},{'|'.join(n)}\n" for p, l, n in rows)
        text += "broken line with,too,many,fields\n"
    else:
        text = "".join(json.dumps({"path": p, "labels": l, "negatives": n}) + "\n" for p, l, n in rows)
        text += "{not json\n"
    (tmp_path / f"list.{fmt}").write_text(text)
    out = tmp_path / "out"
    assert _build(fmt, "--list", tmp_path / f"list.{fmt}", "--images", tmp_path / "imgs",
                  "--classes", tmp_path / "classes.txt", "--out", out, "--absent", "unknown") == 0
    assert _problems(out) == {"unknown_class": 1, "conflicting_labels": 1, "malformed_line": 1}
    got = _samples(out)
    assert got["a.jpg"]["pos"] == {"cat"} and got["a.jpg"]["neg"] == {"dog"}
    assert got["b.jpg"]["pos"] == {"dog", "cat"}  # lines naming one path are merged
    assert got["c.jpg"]["pos"] == got["c.jpg"]["neg"] == set()
    assert Image.open(io.BytesIO(got["p.png"]["jpg"])).format == "JPEG"


# -- build mechanics -------------------------------------------------------------------------

def _coco_args(sample_data, out, *extra):
    root = sample_data / "coco128"
    return ["coco", "--images", root / "images/train2017", "--annotations",
            root / "annotations/instances_train2017.json", "--out", out, "--shard-size", "10", *extra]


def test_parallel_build_equals_serial(sample_data, tmp_path):
    assert _build(*_coco_args(sample_data, tmp_path / "serial")) == 0
    assert shard_main(["build", *map(str, _coco_args(sample_data, tmp_path / "par")), "--workers", "2"]) == 0
    assert load_manifest(tmp_path / "serial").fingerprint() == load_manifest(tmp_path / "par").fingerprint()


def test_rerun_skips_complete_shards_and_redoes_damaged_ones(sample_data, tmp_path):
    out = tmp_path / "out"
    assert _build(*_coco_args(sample_data, out)) == 0
    before = load_manifest(out)
    tars = sorted(out.glob("train-*.tar"))
    mtimes = {t.name: t.stat().st_mtime_ns for t in tars}
    tars[1].write_bytes(tars[1].read_bytes()[:5000])  # an interrupted write
    tars[2].unlink()
    assert _build(*_coco_args(sample_data, out)) == 0
    after = load_manifest(out)
    assert after.fingerprint() == before.fingerprint()
    for t in sorted(out.glob("train-*.tar")):
        if t.name in (tars[1].name, tars[2].name):
            continue
        assert t.stat().st_mtime_ns == mtimes[t.name], f"{t.name} was rewritten"


def test_reencoding_caps_the_side_and_applies_exif(tmp_path):
    img = Image.new("RGB", (400, 200), (10, 200, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "imgs" / "r.jpg"
    path.parent.mkdir()
    img.save(path, exif=exif)
    (tmp_path / "list.csv").write_text("path,labels\nr.jpg,x\n")
    out = tmp_path / "out"
    assert _build("csv", "--list", tmp_path / "list.csv", "--images", tmp_path / "imgs", "--out", out,
                  "--max-side", "100", "--quality", "85") == 0
    stored = Image.open(io.BytesIO(_samples(out)["r.jpg"]["jpg"]))
    assert stored.size == (50, 100)  # upright after EXIF, longest side 100
    assert load_manifest(out).image_encoding["max_side"] == 100


def test_verify_finds_damage_and_inspect_writes_its_files(digits_shards, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(digits_shards, copy)
    assert shard_main(["verify", str(copy)]) == 0
    assert shard_main(["inspect", str(copy), "--num-images", "4"]) == 0
    assert (copy / "contact_train.png").stat().st_size > 1000
    assert "digit_0" in (copy / "inspect_train.md").read_text()
    tar = copy / "train-000001.tar"
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF
    tar.write_bytes(bytes(data))
    assert shard_main(["verify", str(copy)]) == 1
    assert "train-000001.tar: checksum differs" in capsys.readouterr().out


def test_digits_builds_tiny_splits_beside_a_large_one(tmp_path):
    """A split of a few images once drew its source digits from a pool lacking classes."""
    from shard_tools.cli import main

    out = tmp_path / "d"
    assert main(["build", "digits", "--out", str(out), "--num-train", "3000", "--num-val", "2",
                 "--num-test", "2", "--shard-size", "1000", "--image-size", "16", "--workers", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [manifest["splits"][s]["num_samples"] for s in ("train", "val", "test")] == [3000, 2, 2]


def test_image_scan_keeps_path_order_and_reports_repeated_ids(tmp_path):
    """The columnar scan (9M Open Images files in a few hundred MB) lists the images in the
    order of sorted(Path.rglob), part by part, and keeps the first file of a repeated id."""
    from shard_tools.sources import IMAGE_EXTS, scan_images

    names = ["a/y.jpg", "a-b/x.jpg", "a/c/z.png", "a/b.jpg", "a.b/q.JPG", "top.jpg", "a/c.jpg", "n/top.jpg",
             "z/readme.txt", "é/u.jpg", "a/c/d/e.webp", "a b/c.gif", "z/noext"]
    for rel in names:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    expected, seen = [], set()
    for p in sorted(tmp_path.rglob("*")):
        if p.suffix.lower() in IMAGE_EXTS and p.is_file() and p.stem not in seen:
            seen.add(p.stem)
            expected.append(str(p))
    report = Report()
    files = scan_images(tmp_path, report)
    assert [files.path(i) for i in range(len(files))] == expected
    assert report.counts() == {"duplicate_image_id": 2}  # top.jpg after n/top.jpg, a/c/ ... c.gif
    assert index_images(tmp_path, Report()) == {Path(p).stem: Path(p) for p in expected}


def test_image_scan_lists_a_linked_folder_without_entering_it(tmp_path):
    """As Path.rglob on Python 3.11: a symlink loop neither hangs nor fails the build."""
    from shard_tools.sources import scan_images

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"")
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a", target_is_directory=True)
    files = scan_images(tmp_path, Report())
    assert [files.path(i) for i in range(len(files))] == [str(tmp_path / "a" / "x.jpg")]
