"""PASCAL VOC classification lists: ``ImageSets/Main/<class>_<set>.txt`` with 1 / -1 / 0.

1 = positive, -1 = negative, 0 = "difficult" (present but hard): unknown here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .sources import LabelTable, index_images
from .writer import BuildSpec, Report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, type=Path, help="VOCdevkit/VOC20XX")
    p.add_argument("--image-set", default="trainval", help="trainval, train, val or test")


def build_spec(args: argparse.Namespace, report: Report) -> BuildSpec:
    main = args.root / "ImageSets" / "Main"
    suffix = f"_{args.image_set}.txt"
    files = sorted(p for p in main.glob(f"*{suffix}") if p.name != f"{args.image_set}.txt")
    if not files:
        raise FileNotFoundError(f"{main}: no <class>{suffix} files")
    classes = [p.name[: -len(suffix)] for p in files]
    table = LabelTable(report, classes)
    for c, path in enumerate(files):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("1", "-1", "0"):
                report.add("malformed_line", f"{path}:{n}", line[:80], "line skipped")
                continue
            if parts[1] == "0":
                table.mention(parts[0], f"{path}:{n}")  # difficult: listed, value unknown
                continue
            table.add(parts[0], c, parts[1] == "1", f"{path}:{n}")
    all_images = index_images(args.root / "JPEGImages", report, recursive=False)
    # Only the images this image set lists; a listed image that is absent is missing.
    images = {k: v for k, v in all_images.items() if k in table.ids()}
    records = table.records(images, missing="missing_image")
    return BuildSpec("voc", classes, {args.split: records},
                     source={"root": str(args.root), "image_set": args.image_set})
