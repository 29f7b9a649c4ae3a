"""CUB-200-2011 attributes: 312 binary attributes per image, official train/test split.

``attributes/image_attribute_labels.txt`` lines are ``image attribute is_present certainty
time``; a few official lines carry an extra field, which is tolerated. is_present 1 =
positive, 0 = negative: fully labelled where every image has a line for every attribute
(the manifest says so only when the data does).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .sources import LabelTable
from .writer import BuildSpec, Record, Report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, type=Path, help="CUB_200_2011 directory")


def _find(root: Path, name: str) -> Path:
    for p in (root / name, root / "attributes" / name, root.parent / name):
        if p.is_file():
            return p
    raise FileNotFoundError(f"{root}: no {name}")


def _pairs(path: Path, report: Report) -> list[tuple[int, str, str]]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split(maxsplit=1)
        if not parts:
            continue
        if len(parts) != 2 or not parts[0].isdigit():
            report.add("malformed_line", f"{path}:{n}", line[:80], "line skipped")
            continue
        out.append((int(parts[0]), parts[1].strip(), f"{path}:{n}"))
    return out


def build_spec(args: argparse.Namespace, report: Report) -> BuildSpec:
    root = args.root
    attributes = _pairs(_find(root, "attributes.txt"), report)
    classes = [name for _, name, _ in attributes]
    attr_index = {a: i for i, (a, _, _) in enumerate(attributes)}
    images = {i: path for i, path, _ in _pairs(_find(root, "images.txt"), report)}
    split_of = {i: flag for i, flag, _ in _pairs(_find(root, "train_test_split.txt"), report)}
    table = LabelTable(report, [f"{a} ({name})" for a, name, _ in attributes])
    labels = _find(root, "image_attribute_labels.txt")
    for n, line in enumerate(labels.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{labels}:{n}"
        if len(parts) < 4 or not (parts[0].isdigit() and parts[1].isdigit()) or parts[2] not in ("0", "1"):
            report.add("malformed_line", where, line[:80], "line skipped")
            continue
        image, attr = int(parts[0]), int(parts[1])
        if attr not in attr_index:
            report.add("unknown_class", where, f"attribute {attr}", "line skipped")
            continue
        if image not in images:
            report.add("label_without_image", where, f"image {image} not in images.txt", "line skipped")
            continue
        table.add(str(image), attr_index[attr], parts[2] == "1", where)
    splits: dict[str, list[Record]] = {"train": [], "test": []}
    for image, rel in images.items():
        key = str(image)
        if key not in table.ids():
            report.add("image_without_labels", str(root / "images" / rel), "no attribute line",
                       "kept with every attribute unknown")
        split = "train" if split_of.get(image) == "1" else "test"
        splits[split].append(Record(key=rel.rsplit(".", 1)[0].replace("/", "_"),
                                    pos=sorted(table.pos.get(key, ())), neg=sorted(table.neg.get(key, ())),
                                    image_path=str(root / "images" / rel)))
    return BuildSpec("cub", classes, splits,
                     source={"root": str(root)})
