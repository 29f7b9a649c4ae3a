"""COCO instances JSON (2014 and 2017 share the format) and YOLO label folders -> records.

COCO is fully labelled: a class absent from an image's annotations is a negative. Class
order is the categories sorted by COCO id (the contiguous order of ``classes.txt`` files).
"""

from __future__ import annotations

import json
from pathlib import Path

from .writer import Record, Report


def read_coco(images_dir: Path, annotations: Path, report: Report) -> tuple[list[str], list[Record]]:
    with open(annotations) as f:
        data = json.load(f)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{annotations}: no {key!r} list; is this a COCO instances JSON?")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    classes = [c["name"] for c in categories]
    class_of_cat = {c["id"]: i for i, c in enumerate(categories)}
    images = {}
    for img in data["images"]:
        if img["id"] in images:
            report.add("duplicate_image", f"{annotations}: image id {img['id']}", img["file_name"],
                       "later entry ignored")
            continue
        images[img["id"]] = img
    positives: dict[int, set[int]] = {i: set() for i in images}
    for k, ann in enumerate(data["annotations"]):
        where = f"{annotations}: annotations[{k}] (id {ann.get('id')})"
        if ann["image_id"] not in images:
            report.add("label_without_image", where, f"image_id {ann['image_id']}", "annotation ignored")
        elif ann["category_id"] not in class_of_cat:
            report.add("unknown_class", where, f"category_id {ann['category_id']}", "annotation ignored")
        else:
            positives[ann["image_id"]].add(class_of_cat[ann["category_id"]])
    all_classes = set(range(len(classes)))
    records = [
        Record(key=img["file_name"].rsplit(".", 1)[0], pos=sorted(positives[i]),
               neg=sorted(all_classes - positives[i]),
               image_path=str(images_dir / img["file_name"]))
        for i, img in images.items()
    ]
    return classes, records


def read_yolo(images_dir: Path, labels_dir: Path, classes_file: Path,
              report: Report) -> tuple[list[str], list[Record]]:
    """YOLO ``class cx cy w h`` label files; an image without a label file has no object."""
    classes = [line.strip() for line in classes_file.read_text().splitlines() if line.strip()]
    images = {p.stem: p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
    for label_file in sorted(labels_dir.glob("*.txt")):
        if label_file.stem not in images:
            report.add("label_without_image", str(label_file), "no image with this name", "labels ignored")
    records = []
    all_classes = set(range(len(classes)))
    for stem, image_path in images.items():
        pos: set[int] = set()
        label_file = labels_dir / f"{stem}.txt"
        if label_file.is_file():
            for n, line in enumerate(label_file.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    c = int(line.split()[0])
                except ValueError:
                    report.add("malformed_line", f"{label_file}:{n}", line[:80], "line ignored")
                    continue
                if c not in all_classes:
                    report.add("unknown_class", f"{label_file}:{n}", f"class id {c}", "line ignored")
                    continue
                pos.add(c)
        records.append(Record(key=stem, pos=sorted(pos), neg=sorted(all_classes - pos),
                              image_path=str(image_path)))
    return classes, records


class Coco:
    """``shard-tools build coco``."""

    @staticmethod
    def add_arguments(p) -> None:
        p.add_argument("--images", required=True, type=Path)
        p.add_argument("--annotations", required=True, type=Path)

    @staticmethod
    def build_spec(args, report: Report):
        from .writer import BuildSpec

        classes, records = read_coco(args.images, args.annotations, report)
        return BuildSpec("coco", classes, {args.split: records},
                         source={"annotations": str(args.annotations), "images": str(args.images)})


class Yolo:
    """``shard-tools build yolo`` (e.g. the coco128 val2017 half, which has no JSON)."""

    @staticmethod
    def add_arguments(p) -> None:
        p.add_argument("--images", required=True, type=Path)
        p.add_argument("--labels", required=True, type=Path)
        p.add_argument("--classes", required=True, type=Path)

    @staticmethod
    def build_spec(args, report: Report):
        from .writer import BuildSpec

        classes, records = read_yolo(args.images, args.labels, args.classes, report)
        return BuildSpec("yolo", classes, {args.split: records},
                         source={"labels": str(args.labels), "images": str(args.images)})
