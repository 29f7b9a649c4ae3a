"""NUS-WIDE, the official 81-concept lists.

Inputs: the image list (``ImageList/Imagelist.txt`` or ``TrainImagelist.txt`` /
``TestImagelist.txt``; Windows paths such as ``C:\\ImageData\\Flickr\\actor\\0001_2124494179.jpg``),
``Concepts81.txt``, and labels either as a folder of per-concept files
(``Labels_<concept>.txt`` or ``Labels_<concept>_Train.txt`` / ``_Test.txt``, one 0/1 per
image-list line) or one all-labels file (a line of 81 0/1 values per image).

The official ``TrainTestLabels/`` folder holds both ``_Train`` and ``_Test`` files; which one
is read follows ``--split`` (``train`` / ``test``) or an explicit ``--labels-suffix``, never a
guess, since equal line counts would label test images with train labels without a word.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .writer import BuildSpec, Record, Report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, type=Path, help="folder holding the Flickr/ tree")
    p.add_argument("--image-list", required=True, type=Path)
    p.add_argument("--concepts", required=True, type=Path, help="Concepts81.txt")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--labels-dir", type=Path, help="folder of Labels_<concept>[_Train|_Test].txt")
    g.add_argument("--all-labels", type=Path, help="one line of 0/1 per image, a column per concept")
    p.add_argument("--labels-suffix", choices=["", "_Train", "_Test"], default=None,
                   help="which Labels_<concept><suffix>.txt to read (default: from --split: "
                        "train -> _Train, test -> _Test, when such files exist)")


def _relative(line: str) -> str:
    path = line.strip().replace("\\", "/")
    if "Flickr/" in path:
        path = path[path.index("Flickr/"):]
    return path


def _labels_suffix(folder: Path, split: str, suffix: str | None) -> str:
    if suffix is not None:
        return suffix
    official = {"train": "_Train", "test": "_Test"}.get(split.lower())
    if official and any(folder.glob(f"Labels_*{official}.txt")):
        return official
    if any(folder.glob("Labels_*_Train.txt")) or any(folder.glob("Labels_*_Test.txt")):
        raise ValueError(f"{folder}: holds Labels_<concept>_Train/_Test.txt; split {split!r} names "
                         "neither: pass --split train|test or --labels-suffix")
    return ""


def _concept_file(folder: Path, concept: str, suffix: str) -> Path:
    path = folder / f"Labels_{concept}{suffix}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (labels suffix {suffix!r})")
    return path


def _column(path: Path, image_list: Path, expected: int, report: Report) -> np.ndarray:
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if len(lines) != expected:
        raise ValueError(f"{path}: {len(lines)} lines, the image list {image_list} has {expected}")
    out = np.full(expected, -1, dtype=np.int8)
    for n, value in enumerate(lines):
        if value in ("0", "1"):
            out[n] = int(value)
        else:
            report.add("malformed_line", f"{path}:{n + 1}", value[:40], "entry unknown")
    return out


def build_spec(args: argparse.Namespace, report: Report) -> BuildSpec:
    concepts = [c.strip() for c in args.concepts.read_text().splitlines() if c.strip()]
    rel = [_relative(ln) for ln in args.image_list.read_text().splitlines() if ln.strip()]
    if args.labels_dir is not None:
        suffix = _labels_suffix(args.labels_dir, args.split, args.labels_suffix)
        labels = np.stack([_column(_concept_file(args.labels_dir, c, suffix), args.image_list, len(rel), report)
                           for c in concepts], 1)
    else:
        rows = [ln.split() for ln in args.all_labels.read_text().splitlines() if ln.strip()]
        if len(rows) != len(rel):
            raise ValueError(f"{args.all_labels}: {len(rows)} lines, the image list {args.image_list} "
                             f"has {len(rel)}")
        labels = np.full((len(rel), len(concepts)), -1, dtype=np.int8)
        for n, row in enumerate(rows):
            if len(row) != len(concepts) or any(v not in ("0", "1") for v in row):
                report.add("malformed_line", f"{args.all_labels}:{n + 1}", " ".join(row)[:80], "image's labels unknown")
                continue
            labels[n] = [int(v) for v in row]
    records, seen = [], set()
    for n, r in enumerate(rel):
        if r in seen:
            report.add("duplicate_image_id", f"{args.image_list}:{n + 1}", r, "later line ignored")
            continue
        seen.add(r)
        row = labels[n]
        records.append(Record(key=r, pos=np.nonzero(row == 1)[0].tolist(),
                              neg=np.nonzero(row == 0)[0].tolist(), image_path=str(args.images / r)))
    return BuildSpec("nuswide", concepts, {args.split: records},
                     source={"image_list": str(args.image_list)})
