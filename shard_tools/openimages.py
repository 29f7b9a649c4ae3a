"""Open Images image-level labels: ``ImageID,Source,LabelName,Confidence`` CSVs.

Human-verified labels are natively partial: Confidence 1 = positive, 0 = verified negative,
absent = unknown. Machine-generated labels (fractional confidence, Source ``machine``) are
never mixed in silently: without ``--machine-threshold`` each such row is reported and
skipped; with it, confidence >= threshold is a positive and below is unknown.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from .label_columns import ColumnarLabels, read_hierarchy
from .manifest import sha256_file
from .sources import read_class_list, scan_images
from .writer import BuildSpec, Report

HEADER = ["ImageID", "Source", "LabelName", "Confidence"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, type=Path, help="<ImageID>.jpg files, subfolders allowed")
    p.add_argument("--labels", required=True, type=Path, nargs="+", help="image-level label CSV(s)")
    p.add_argument("--classes", required=True, type=Path,
                   help="class list: MID,DisplayName lines (boxable 600/601, trainable, or your own)")
    p.add_argument("--machine-threshold", type=float, default=None,
                   help="accept machine labels: confidence >= T is positive, below is unknown")
    p.add_argument("--hierarchy", type=Path, default=None,
                   help="class hierarchy JSON (bbox_labels_600_hierarchy.json): a positive also makes its "
                        "ancestors positive, a verified negative its descendants negative, as the official "
                        "evaluation expands them")


def read_labels(paths: list[Path], mids: list[str], report: Report,
                machine_threshold: float | None, names: list[str] | None = None) -> ColumnarLabels:
    """Every valid row of the CSVs into a columnar table (Open Images' 60M-row files would
    cost gigabytes as Python objects); a bad row is reported with its file and line."""
    class_of = {m: i for i, m in enumerate(mids)}
    table = ColumnarLabels(report, [f"{m} ({n})" for m, n in zip(mids, names or mids)])
    outside: dict[str, tuple[str, int]] = {}
    for path in paths:
        table.start_file(str(path))
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [h.strip() for h in header[:4]] != HEADER:
                raise ValueError(f"{path}:1: expected header {','.join(HEADER)}, found {header}")
            for n, row in enumerate(reader, 2):
                if len(row) != 4:
                    report.add("malformed_line", f"{path}:{n}", f"{len(row)} fields: {','.join(row)[:80]}",
                               "line skipped")
                    continue
                image_id, source, mid, conf_text = (v.strip() for v in row)
                cls = class_of.get(mid)
                if conf_text == "1" or conf_text == "0":
                    conf = 1.0 if conf_text == "1" else 0.0
                else:
                    try:
                        conf = float(conf_text)
                    except ValueError:
                        report.add("malformed_line", f"{path}:{n}", f"confidence {conf_text!r}", "line skipped")
                        continue
                if not 0.0 <= conf <= 1.0 or not image_id:
                    report.add("malformed_line", f"{path}:{n}", f"image {image_id!r} confidence {conf}", "line skipped")
                    continue
                if cls is None:
                    first, count = outside.get(mid, (f"{path}:{n}", 0))
                    outside[mid] = (first, count + 1)
                    continue
                if source == "machine" or conf not in (0.0, 1.0):
                    if machine_threshold is None:
                        report.add("machine_label", f"{path}:{n}", f"{source} confidence {conf}",
                                   "line skipped (pass --machine-threshold to use machine labels)")
                        continue
                    if conf < machine_threshold:
                        continue  # below the threshold: stays unknown
                    table.append(image_id, cls, True, n)
                else:
                    table.append(image_id, cls, conf == 1.0, n)
    # Labels outside the chosen vocabulary are expected (600 of ~20k classes): one report
    # row per class, with its first line and count, not one per line.
    for mid, (first, count) in sorted(outside.items()):
        report.add("unknown_class", first, f"class {mid} not in the class list ({count} rows)", "rows ignored")
    return table


def build_spec(args: argparse.Namespace, report: Report) -> BuildSpec:
    mids, names = read_class_list(args.classes)
    hierarchy = read_hierarchy(args.hierarchy, mids) if args.hierarchy else None
    if hierarchy is not None:
        for mid in hierarchy.not_in_hierarchy:
            report.add("class_not_in_hierarchy", str(args.hierarchy), f"class {mid} is no node of the hierarchy",
                       "its labels are not expanded")
    table = read_labels(args.labels, mids, report, args.machine_threshold, names)
    table.decide(hierarchy)
    images = scan_images(args.images, report)
    records = table.records(images)
    labels = {}
    if hierarchy is not None:
        labels["hierarchy"] = {"file": str(args.hierarchy), "sha256": sha256_file(args.hierarchy),
                               "relation": "Subcategory", "derived_rows": dict(table.expanded)}
    return BuildSpec("openimages", names, {args.split: records}, split_labels={args.split: labels},
                     source={"labels": [str(p) for p in args.labels], "classes": str(args.classes),
                             "class_ids": mids, "machine_threshold": args.machine_threshold,
                             "hierarchy": str(args.hierarchy) if args.hierarchy else None})
