"""Image-level label rows at Open Images size, held as columns of integers.

The official label files have tens of millions of rows (about 60M for 9M training images).
Holding them as Python objects (a dict per image, an int per row) costs gigabytes, so each
row is kept as a few bytes in typed arrays: the image's run number, the class id, the line
and a flag byte. Image ids are kept once per run of consecutive rows naming the same image
(the official files are sorted by image), as fixed-width bytes, and turned into image
indices by one ``numpy.unique``. Nothing here is (images x classes).

The value of an (image, class) is decided from all its rows together, as in
:class:`~shard_tools.sources.LabelTable`: rows that agree give the value (repeated rows of a
file are reported once as ``duplicate_label``), a positive and a negative make it unknown
(``conflicting_labels``, every line named). With a class hierarchy, every positive row also
stands for a positive row of each ancestor class, and every negative row for a negative row
of each descendant (the expansion of the official Open Images evaluation); those derived
rows enter the same rule, and repeat other rows silently.
"""

from __future__ import annotations

import json
import os
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .sources import ImageFiles
from .writer import Record, Report

_POSITIVE = 1
_DERIVED = 2
_FLUSH_RUNS = 1 << 20
_BLOCK_ROWS = 1 << 22


@dataclass(frozen=True)
class Hierarchy:
    """Transitive ancestors and descendants of every class of a class list (CSR over class
    ids), from the ``Subcategory`` relation of an Open Images hierarchy JSON."""

    path: str
    ancestors_indptr: np.ndarray
    ancestors: np.ndarray
    descendants_indptr: np.ndarray
    descendants: np.ndarray
    not_in_hierarchy: tuple[str, ...]

    def ancestors_of(self, cls: int) -> np.ndarray:
        return self.ancestors[self.ancestors_indptr[cls]:self.ancestors_indptr[cls + 1]]

    def descendants_of(self, cls: int) -> np.ndarray:
        return self.descendants[self.descendants_indptr[cls]:self.descendants_indptr[cls + 1]]


def read_hierarchy(path: Path, class_ids: list[str]) -> Hierarchy:
    """Parse ``bbox_labels_600_hierarchy.json``-style trees: nodes ``{"LabelName",
    "Subcategory": [...], "Part": [...]}``. Only ``Subcategory`` is an is-a relation (a wheel
    is part of a car, not a car), so ``Part`` is not followed, as in the official expansion.
    The root (a node above every class, "Entity") is not a class. A node may sit under
    several parents; closures go through nodes outside the class list."""
    try:
        tree = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable hierarchy JSON ({exc})") from None
    parents: dict[str, set[str]] = {}

    def walk(node: dict, where: str) -> None:
        if not isinstance(node, dict) or "LabelName" not in node:
            raise ValueError(f"{path}: {where}: a node without LabelName")
        for child in node.get("Subcategory", []):
            parents.setdefault(child.get("LabelName", ""), set()).add(node["LabelName"])
            walk(child, f"{where} > {node['LabelName']}")
        for part in node.get("Part", []):
            walk(part, f"{where} > {node['LabelName']} (part)")

    walk(tree, "root")
    root = tree["LabelName"]
    index = {c: i for i, c in enumerate(class_ids)}
    closure: dict[str, set[str]] = {}

    def up(mid: str, seen: tuple[str, ...] = ()) -> set[str]:
        if mid in closure:
            return closure[mid]
        if mid in seen:
            raise ValueError(f"{path}: the hierarchy has a cycle through {mid}")
        out: set[str] = set()
        for p in parents.get(mid, ()):
            if p != root:
                out |= {p} | up(p, seen + (mid,))
        closure[mid] = out
        return out

    anc = [sorted(index[a] for a in up(c) if a in index) for c in class_ids]
    desc: list[list[int]] = [[] for _ in class_ids]
    for c, ancestors in enumerate(anc):
        for a in ancestors:
            desc[a].append(c)
    missing = tuple(c for c in class_ids if c not in parents and c != root)
    return Hierarchy(str(path), *_csr(anc), *_csr([sorted(d) for d in desc]), missing)


def _csr(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.zeros(len(lists) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(x) for x in lists])
    return indptr, np.asarray([c for x in lists for c in x], dtype=np.int64)


class ColumnarLabels:
    """Label rows of (image id, class, positive?, file:line), appended one at a time."""

    def __init__(self, report: Report, class_labels: list[str]):
        if len(class_labels) >= 1 << 16:
            raise ValueError(f"{len(class_labels)} classes: at most 65,535 are supported")
        self.report = report
        self.class_labels = class_labels
        self._files: list[str] = []
        self._run = array("i")      # per row: its run of one image id
        self._cls = array("H")
        self._line = array("I")
        self._flags = array("B")    # file index << 1 | positive
        self._run_ids: list[bytes] = []
        self._run_chunks: list[np.ndarray] = []
        self._num_runs = 0
        self._last_id: str | None = None
        self._file = 0
        self.expanded = {"positive_rows": 0, "negative_rows": 0}
        self._image = np.zeros(0, dtype=np.uint32)  # per row: its image index, once decided
        self._decided: _Decided | None = None
        self._hierarchy: Hierarchy | None = None

    def start_file(self, path: str) -> None:
        if len(self._files) >= 127:
            raise ValueError("at most 127 label files per build")
        self._files.append(path)
        self._file = len(self._files) - 1
        self._last_id = None

    def append(self, image_id: str, cls: int, positive: bool, line: int) -> None:
        if self._decided is not None:
            raise RuntimeError(f"{self._files[self._file]}:{line}: label row added after the labels were decided")
        if image_id != self._last_id:
            self._last_id = image_id
            self._run_ids.append(image_id.encode())
            self._num_runs += 1
            if len(self._run_ids) >= _FLUSH_RUNS:
                self._flush_runs()
        self._run.append(self._num_runs - 1)
        self._cls.append(cls)
        self._line.append(line)
        self._flags.append(self._file << 1 | positive)

    def _flush_runs(self) -> None:
        if self._run_ids:
            self._run_chunks.append(np.array(self._run_ids, dtype=bytes))
            self._run_ids = []

    @property
    def num_rows(self) -> int:
        return len(self._cls)

    def decide(self, hierarchy: Hierarchy | None = None) -> "_Decided":
        """Apply the one rule (after the hierarchy's expansion, when given); report every
        conflict and duplicate; afterwards no row may be added.

        Memory: besides the rows' own 11 bytes, one uint64 sort key per row (and per
        derived row) and a few bytes of temporaries; each column is freed once used."""
        if self._decided is not None:
            if hierarchy is not None and hierarchy is not self._hierarchy:
                raise RuntimeError("the labels were already decided with another hierarchy")
            return self._decided
        self._hierarchy = hierarchy
        self._flush_runs()
        runs = np.concatenate(self._run_chunks) if self._run_chunks else np.zeros(0, dtype="S1")
        self._run_chunks = []
        image_ids, run_image = np.unique(runs, return_inverse=True)
        del runs
        run_image = run_image.astype(np.uint32)
        run_N = np.frombuffer(self._run, dtype=np.int32)
        # Each image's first row (named by "label_without_image"): the earliest of its runs'.
        run_first = np.flatnonzero(np.r_[True, run_N[1:] != run_N[:-1]]) if len(run_N) else run_N
        first_row = np.full(len(image_ids), np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(first_row, run_image[run_N[run_first]], run_first)
        del run_first
        self._image = run_image[run_N]
        self._run = array("i")      # the run numbers are spent: image indices replace them
        del run_N, run_image
        cls_N = np.frombuffer(self._cls, dtype=np.uint16)
        positive_N = (np.frombuffer(self._flags, dtype=np.uint8) & _POSITIVE).astype(bool)
        num_rows = len(cls_N)
        derived = self._derived_counts(cls_N, positive_N, hierarchy)
        key = np.empty(num_rows + sum(int(c.sum(dtype=np.int64)) for c in derived), dtype=np.uint64)
        head = key[:num_rows]
        head[:] = self._image
        head <<= np.uint64(16)
        head |= cls_N
        head <<= np.uint64(2)
        head |= positive_N
        if hierarchy is not None:
            self._expand(key, num_rows, positive_N, derived, hierarchy)
        del positive_N, derived, head
        key.sort()
        # Handed over in a list so that _decide can free it mid-way (a named argument
        # would stay referenced from this frame).
        box = [key]
        del key
        self._decided = _decide(self, box, image_ids, first_row, hierarchy)
        return self._decided

    @staticmethod
    def _derived_counts(cls_N: np.ndarray, positive_N: np.ndarray, h: Hierarchy | None) -> list[np.ndarray]:
        """Per positive row its class's ancestor count; per negative row its descendants'."""
        if h is None:
            return []
        # uint16: a class has fewer than 65,536 relatives (the class count's own limit).
        return [np.diff(h.ancestors_indptr).astype(np.uint16)[cls_N[positive_N]],
                np.diff(h.descendants_indptr).astype(np.uint16)[cls_N[~positive_N]]]

    def _expand(self, key: np.ndarray, at: int, positive_N: np.ndarray, counts: list[np.ndarray],
                h: Hierarchy) -> None:
        """Write the derived rows' sort keys into ``key[at:]``: ancestors of positives, then
        descendants of negatives; in blocks of rows, so temporaries stay small."""
        cls_N = np.frombuffer(self._cls, dtype=np.uint16)
        for want, c, indptr, targets, name in ((True, counts[0], h.ancestors_indptr, h.ancestors, "positive_rows"),
                                               (False, counts[1], h.descendants_indptr, h.descendants,
                                                "negative_rows")):
            self.expanded[name] = int(c.sum(dtype=np.int64))
            rows = np.flatnonzero(positive_N == want)
            for b in range(0, len(rows), _BLOCK_ROWS):
                block, cb = rows[b:b + _BLOCK_ROWS], c[b:b + _BLOCK_ROWS].astype(np.int64)
                total = int(cb.sum())
                # Row by row, its class's slice of ``targets``.
                starts = np.repeat(indptr[cls_N[block].astype(np.int64)] - (np.cumsum(cb) - cb), cb)
                starts += np.arange(total)
                out = key[at:at + total]
                out[:] = np.repeat(self._image[block], cb)
                out <<= np.uint64(16)
                out |= targets[starts].astype(np.uint64)
                out <<= np.uint64(2)
                out |= np.uint64(_DERIVED | want)
                at += total

    def records(self, images: ImageFiles, report_unlabelled: bool = True,
                missing: str = "label_without_image") -> "LazyRecords":
        """Records for every image found (in ``images``' order); label rows without an image
        and images without a label row are reported."""
        d = self.decide()
        stems = images.stems
        at = np.searchsorted(d.image_ids, stems) if len(d.image_ids) else np.zeros(len(stems), dtype=np.int64)
        found = at < len(d.image_ids)
        found[found] = d.image_ids[at[found]] == stems[found]
        index = np.where(found, at, -1)
        # Image ids with a file: the ones the search hit (stems are unique), no second search.
        has_file = np.zeros(len(d.image_ids), dtype=bool)
        has_file[at[found]] = True
        for k in np.flatnonzero(~has_file).tolist():
            self.report.add(missing, self.where(int(d.first_row[k])),
                            f"image {d.image_ids[k].decode()} not found", "labels ignored")
        if report_unlabelled:
            for i in np.flatnonzero(~found).tolist():
                self.report.add("image_without_labels", images.path(i), "no label row",
                                "kept with every class unknown")
        return LazyRecords(d, index, images)

    def where(self, row: int) -> str:
        return f"{self._files[self._flags[row] >> 1]}:{self._line[row]}"


@dataclass
class _Decided:
    image_ids: np.ndarray       # sorted unique ids (bytes)
    pos_indptr: np.ndarray      # CSR over image index
    pos: np.ndarray
    neg_indptr: np.ndarray
    neg: np.ndarray
    first_row: np.ndarray       # per image: its first label row (for the report)


def _decide(table: ColumnarLabels, box: list[np.ndarray], image_ids: np.ndarray, first_row: np.ndarray,
            hierarchy: Hierarchy | None) -> _Decided:
    """``box``: [sorted keys], consumed; a key is (image << 16 | class) << 2 | derived << 1
    | positive."""
    key = box.pop()
    n = len(key)
    low = key.view(np.uint8)[::8] if np.little_endian else key.view(np.uint8)[7::8]  # the flag bits, no copy
    # Equal keys are adjacent: two explicit rows with one value repeat each other.
    repeat_N = np.zeros(n, dtype=bool)
    if n:
        np.equal(key[1:], key[:-1], out=repeat_N[1:])
        repeat_N &= (low & _DERIVED) == 0
    positive_N = (low & _POSITIVE).astype(bool)
    del low
    key >>= np.uint64(2)
    # Groups: runs of one (image, class).
    new_N = np.ones(n, dtype=bool)
    if n:
        np.not_equal(key[1:], key[:-1], out=new_N[1:])
    uniq = key[new_N]
    del key
    start = np.flatnonzero(new_N)
    del new_N
    if n:
        pos_any = np.logical_or.reduceat(positive_N, start)
        neg_any = ~np.logical_and.reduceat(positive_N, start)
        duplicate = np.logical_or.reduceat(repeat_N, start)
    else:
        pos_any = neg_any = duplicate = np.zeros(0, dtype=bool)
    del positive_N, repeat_N, start
    conflict = pos_any & neg_any
    duplicate &= ~conflict
    _report(table, image_ids, uniq[conflict], uniq[duplicate], hierarchy)
    out = []
    for sel in (pos_any & ~conflict, neg_any & ~conflict):
        out += _csr_of(uniq, sel, len(image_ids))
    return _Decided(image_ids, out[0], out[1], out[2], out[3], first_row)


def _csr_of(pair: np.ndarray, sel: np.ndarray, num_images: int) -> list[np.ndarray]:
    """Indptr over images and class ids (uint16) of the sorted pairs ``pair[sel]``, in
    blocks so that no 64-bit temporary of the whole selection is made."""
    counts = np.zeros(num_images, dtype=np.int64)
    classes = []
    for b in range(0, len(pair), _BLOCK_ROWS):
        chosen = pair[b:b + _BLOCK_ROWS][sel[b:b + _BLOCK_ROWS]]
        counts += np.bincount((chosen >> np.uint64(16)).astype(np.int64), minlength=num_images)
        classes.append((chosen & np.uint64(0xFFFF)).astype(np.uint16))
    indptr = np.zeros(num_images + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return [indptr, np.concatenate(classes) if classes else np.zeros(0, dtype=np.uint16)]


def _report(table: ColumnarLabels, image_ids: np.ndarray, conflicts: np.ndarray, duplicates: np.ndarray,
            hierarchy: Hierarchy | None) -> None:
    """One report row per conflicting or repeated (image, class), naming every line."""
    groups = np.concatenate([conflicts, duplicates])
    if not len(groups):
        return
    # Rows naming the same images (a conflict's derived rows come from other classes).
    images = np.unique((groups >> np.uint64(16)).astype(np.uint32))
    rows = np.flatnonzero(np.isin(table._image, images))
    cls_N = np.frombuffer(table._cls, dtype=np.uint16)
    by_image: dict[int, list[int]] = {}
    for r in rows.tolist():
        by_image.setdefault(int(table._image[r]), []).append(r)
    names = table.class_labels
    for kind, chosen in (("conflicting_labels", conflicts), ("duplicate_label", duplicates)):
        for g in chosen.tolist():
            img, cls = g >> 16, g & 0xFFFF
            image_id = image_ids[img].decode()
            parts = []
            for r in by_image[img]:
                c = int(cls_N[r])
                sign = "+" if table._flags[r] & _POSITIVE else "-"
                if c == cls:
                    parts.append((r, f"{sign} {table.where(r)}"))
                elif hierarchy is not None and kind == "conflicting_labels":
                    if sign == "+" and cls in hierarchy.ancestors_of(c):
                        parts.append((r, f"+ {table.where(r)} ({names[c]}, via the hierarchy)"))
                    elif sign == "-" and cls in hierarchy.descendants_of(c):
                        parts.append((r, f"- {table.where(r)} ({names[c]}, via the hierarchy)"))
            parts.sort()
            lines = ", ".join(p for _, p in parts)
            first = table.where(parts[0][0])
            if kind == "conflicting_labels":
                table.report.add(kind, first, f"image {image_id} class {names[cls]}: positive and negative "
                                 f"rows at {lines}", "entry made unknown")
            else:
                count = len(parts)
                table.report.add(kind, first, f"image {image_id} class {names[cls]}: {count} identical rows "
                                 f"at {lines}", "counted once")


class LazyRecords(Sequence):
    """The records of the images that have a file, built one at a time on access: a list of
    9M :class:`Record` objects would cost gigabytes before the first shard is written."""

    def __init__(self, decided: _Decided, image_index: np.ndarray, images: ImageFiles):
        self._d = decided
        self._index = image_index   # per record: index into decided.image_ids, or -1
        self._images = images

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        d, k = self._d, int(self._index[i])
        path = self._images.path(i)
        if k < 0:
            return Record(key=os.fsdecode(self._images.stems[i]), pos=[], neg=[], image_path=path)
        return Record(key=d.image_ids[k].decode(), pos=d.pos[d.pos_indptr[k]:d.pos_indptr[k + 1]].tolist(),
                      neg=d.neg[d.neg_indptr[k]:d.neg_indptr[k + 1]].tolist(), image_path=path)

    def __iter__(self) -> Iterator[Record]:
        for i in range(len(self)):
            yield self[i]
