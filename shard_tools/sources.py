"""Helpers the dataset modules share: image folder index, class lists, label assembly."""

from __future__ import annotations

import csv
from pathlib import Path

from .writer import Record, Report

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def index_images(root: Path, report: Report, recursive: bool = True) -> dict[str, Path]:
    """File stem -> path for every image under ``root``; a stem seen twice is reported and
    its later files ignored (an id must name one image)."""
    found: dict[str, Path] = {}
    paths = root.rglob("*") if recursive else root.iterdir()
    for p in sorted(paths):
        if p.suffix.lower() not in IMAGE_EXTS or not p.is_file():
            continue
        if p.stem in found:
            report.add("duplicate_image_id", str(p), f"same id as {found[p.stem]}", "later file ignored")
            continue
        found[p.stem] = p
    return found


def read_class_list(path: Path) -> tuple[list[str], list[str]]:
    """(ids, display names) from ``id,name`` lines, header optional, CSV quoting honoured;
    a one-column file gives names that are their own ids."""
    ids, names = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or not row[0].strip():
                continue
            if n == 1 and row[0].strip().lower() in ("labelname", "mid", "id", "class", "name"):
                continue  # header line
            ids.append(row[0].strip())
            names.append(row[1].strip() if len(row) > 1 else row[0].strip())
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: class ids repeat")
    if not ids:
        raise ValueError(f"{path}: no classes")
    return ids, names


class LabelTable:
    """Observed labels per image id, with conflicts (one class both positive and negative
    for one image) reported and turned into unknown."""

    def __init__(self, report: Report):
        self.report = report
        self.pos: dict[str, set[int]] = {}
        self.neg: dict[str, set[int]] = {}
        self.where: dict[str, str] = {}

    def add(self, image_id: str, cls: int, positive: bool, where: str) -> None:
        self.where.setdefault(image_id, where)
        self.pos.setdefault(image_id, set())
        self.neg.setdefault(image_id, set())
        mine, other = (self.pos, self.neg) if positive else (self.neg, self.pos)
        if cls in other[image_id]:
            self.report.add("conflicting_labels", where, f"image {image_id} class {cls} is both "
                            "positive and negative", "entry made unknown")
            other[image_id].discard(cls)
            return
        mine[image_id].add(cls)

    def ids(self) -> set[str]:
        return set(self.pos)

    def records(self, images: dict[str, Path], report_unlabelled: bool = True,
                missing: str = "label_without_image") -> list[Record]:
        """Records for every image found; label rows without an image are reported."""
        for image_id in sorted(self.ids() - set(images)):
            self.report.add(missing, self.where[image_id], f"image {image_id} not found",
                            "labels ignored")
        out = []
        for image_id, path in images.items():
            if image_id not in self.pos and report_unlabelled:
                self.report.add("image_without_labels", str(path), "no label row",
                                "kept with every class unknown")
            out.append(Record(key=image_id, pos=sorted(self.pos.get(image_id, ())),
                              neg=sorted(self.neg.get(image_id, ())), image_path=str(path)))
        return out
