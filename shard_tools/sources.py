"""Helpers the dataset modules share: image folder index, class lists, label assembly."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .writer import Record, Report

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_IMAGE_EXTS_B = tuple(e.encode() for e in IMAGE_EXTS)


@dataclass(frozen=True)
class ImageFiles:
    """Every image file under a folder as two byte-string arrays, in path order: its stem
    (the image id) and its path relative to the folder. Open Images' 9M files would cost
    gigabytes as a dict of Path objects; these cost the bytes of the names."""

    root: Path
    stems: np.ndarray
    rel: np.ndarray

    def __len__(self) -> int:
        return len(self.stems)

    def path(self, i: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.rel[i]))


def scan_images(root: Path, report: Report, recursive: bool = True) -> ImageFiles:
    """The image files under ``root`` (by extension); a stem seen twice is reported and its
    later files (in path order) ignored, since an id must name one image."""
    stems: list[bytes] = []
    rels: list[bytes] = []
    chunks: list[tuple[np.ndarray, np.ndarray]] = []
    base = os.fsencode(root)

    def flush() -> None:
        if stems:
            chunks.append((np.array(stems, dtype=bytes), np.array(rels, dtype=bytes)))
            stems.clear()
            rels.clear()

    pending = [base]
    while pending:
        folder = pending.pop()
        with os.scandir(folder) as entries:
            for e in entries:
                # A linked folder is listed, not entered (as Path.rglob on 3.11): no loops.
                if recursive and e.is_dir(follow_symlinks=False):
                    pending.append(e.path)
                elif os.path.splitext(e.name)[1].lower() in _IMAGE_EXTS_B and e.is_file():
                    stems.append(os.path.splitext(e.name)[0])
                    rels.append(e.path[len(base) + 1:])
                    if len(stems) >= 1 << 20:
                        flush()
    flush()
    if not chunks:
        return ImageFiles(Path(root), np.zeros(0, dtype="S1"), np.zeros(0, dtype="S1"))
    stem_N = np.concatenate([c[0] for c in chunks])
    rel_N = np.concatenate([c[1] for c in chunks])
    del chunks
    # Path order, as sorted(Path.rglob) gives it: part by part, so the separator must sort
    # before every character (\x01: numpy's byte strings end at \x00).
    order = np.argsort(np.char.replace(rel_N, os.sep.encode(), b"\x01"), kind="stable")
    stem_N, rel_N = stem_N[order], rel_N[order]
    _, first = np.unique(stem_N, return_index=True)
    keep = np.zeros(len(stem_N), dtype=bool)
    keep[first] = True
    if not keep.all():
        first_of = dict(zip(stem_N[first].tolist(), rel_N[first].tolist()))
        for i in np.flatnonzero(~keep).tolist():
            report.add("duplicate_image_id", os.path.join(root, os.fsdecode(rel_N[i])),
                       f"same id as {os.path.join(root, os.fsdecode(first_of[stem_N[i]]))}", "later file ignored")
    return ImageFiles(Path(root), stem_N[keep], rel_N[keep])


def index_images(root: Path, report: Report, recursive: bool = True) -> dict[str, Path]:
    """File stem -> path for every image under ``root`` (:func:`scan_images`)."""
    files = scan_images(root, report, recursive)
    return {os.fsdecode(stem): Path(files.path(i)) for i, stem in enumerate(files.stems.tolist())}


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
    """Observed labels per image id, built from rows of (image, class, positive?).

    The value of an (image, class) is decided from all its rows together, after the last
    one: rows that all agree give that value (repeats are reported as duplicates); a
    positive and a negative row, in any order and any number, make it unknown, reported
    once with every line involved. Deciding row by row instead let a third row bring back
    a value a conflict had removed (issue 17).
    """

    def __init__(self, report: Report, class_labels: list[str]):
        self.report = report
        self.class_labels = class_labels  # how the report names a class: id and name
        # Open Images has tens of millions of rows: each is kept as one int (file, line,
        # value), the first row of an (image, class) in ``rows``, any further ones in ``more``.
        self.rows: dict[str, dict[int, int]] = {}
        self.more: dict[tuple[str, int], list[int]] = {}
        self.where: dict[str, str] = {}
        self._files: list[str] = []
        self._file_index: dict[str, int] = {}
        self._decided: tuple[dict[str, set[int]], dict[str, set[int]]] | None = None

    def _code(self, where: str, positive: bool) -> int:
        path, _, line = where.rpartition(":")
        if not (path and line.isdigit()):
            path, line = where, "-1"  # not file:line; kept whole
        f = self._file_index.setdefault(path, len(self._files))
        if f == len(self._files):
            self._files.append(path)
        return ((f << 40 | (int(line) + 1)) << 1) | positive

    def _decode(self, code: int) -> tuple[bool, str]:
        line = (code >> 1 & (1 << 40) - 1) - 1
        path = self._files[code >> 41]
        return bool(code & 1), path if line < 0 else f"{path}:{line}"

    def add(self, image_id: str, cls: int, positive: bool, where: str) -> None:
        self.mention(image_id, where)
        code = self._code(where, positive)
        row = self.rows[image_id]
        if cls in row:
            self.more.setdefault((image_id, cls), []).append(code)
        else:
            row[cls] = code

    def mention(self, image_id: str, where: str) -> None:
        """List an image without giving it a value (e.g. VOC "difficult")."""
        if self._decided is not None:
            # The report already holds the decisions; a late row would go unchecked.
            raise RuntimeError(f"{where}: label row added after the labels were decided")
        self.where.setdefault(image_id, where)
        self.rows.setdefault(image_id, {})

    def ids(self) -> set[str]:
        return set(self.rows)

    def _decide(self) -> tuple[dict[str, set[int]], dict[str, set[int]]]:
        if self._decided is not None:
            return self._decided
        pos: dict[str, set[int]] = {}
        neg: dict[str, set[int]] = {}
        for image_id in sorted(self.rows):
            pos[image_id], neg[image_id] = set(), set()
            for cls, first in sorted(self.rows[image_id].items()):
                if (image_id, cls) not in self.more:
                    (pos if first & 1 else neg)[image_id].add(cls)
                    continue
                rows = [self._decode(c) for c in [first, *self.more[(image_id, cls)]]]
                values = {v for v, _ in rows}
                lines = ", ".join(w for _, w in rows)
                name = self.class_labels[cls]
                if len(values) == 2:
                    signs = " ".join("+" if v else "-" for v, _ in rows)
                    self.report.add("conflicting_labels", rows[0][1],
                                    f"image {image_id} class {name}: positive and negative rows "
                                    f"({signs}) at {lines}", "entry made unknown")
                    continue
                if len(rows) > 1:
                    self.report.add("duplicate_label", rows[0][1],
                                    f"image {image_id} class {name}: {len(rows)} identical rows at {lines}",
                                    "counted once")
                (pos if rows[0][0] else neg)[image_id].add(cls)
        self._decided = (pos, neg)
        return self._decided

    @property
    def pos(self) -> dict[str, set[int]]:
        return self._decide()[0]

    @property
    def neg(self) -> dict[str, set[int]]:
        return self._decide()[1]

    def records(self, images: dict[str, Path], report_unlabelled: bool = True,
                missing: str = "label_without_image") -> list[Record]:
        """Records for every image found; label rows without an image are reported."""
        pos, neg = self._decide()
        for image_id in sorted(self.ids() - set(images)):
            self.report.add(missing, self.where[image_id], f"image {image_id} not found",
                            "labels ignored")
        out = []
        for image_id, path in images.items():
            if image_id not in self.rows and report_unlabelled:
                self.report.add("image_without_labels", str(path), "no label row",
                                "kept with every class unknown")
            out.append(Record(key=image_id, pos=sorted(pos.get(image_id, ())),
                              neg=sorted(neg.get(image_id, ())), image_path=str(path)))
        return out
