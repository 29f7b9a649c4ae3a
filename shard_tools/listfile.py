"""Users' own data: a CSV (``path,labels[,negatives]``, names separated by ``|``) or JSON
lines (``{"path": ..., "labels": [...], "negatives": [...]}``).

Paths are relative to ``--images``. With ``--absent negative`` (default) a class not listed
for an image is a negative (full labels); with ``--absent unknown`` it is unknown and only
listed negatives are negatives. Several lines for one path are merged; a class listed both
as a label and as a negative for one path (on one line or across lines) is unknown.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from .sources import LabelTable
from .writer import BuildSpec, Record, Report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--list", required=True, type=Path, help=".csv or .jsonl")
    p.add_argument("--images", required=True, type=Path, help="folder the paths are relative to")
    p.add_argument("--classes", type=Path, help="one class name per line (default: every name seen, sorted)")
    p.add_argument("--absent", choices=["negative", "unknown"], default="negative")
    p.add_argument("--encoding", default="utf-8",
                   help="text encoding of --list (default %(default)s); a line that does not decode is "
                        "reported with its file and line and skipped")


def _lines(path: Path, encoding: str, report: Report) -> list[tuple[int, str]]:
    """(line number, text) of every line that decodes; the others are reported."""
    out = []
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            out.append((n, raw.decode(encoding)))
        except UnicodeDecodeError as exc:
            report.add("undecodable_line", f"{path}:{n}",
                       f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1} is not {encoding} "
                       "(see --encoding)", "line skipped")
    return out


def _entries(path: Path, report: Report, encoding: str = "utf-8"):
    """(where, image path, positive names, negative names) per usable line."""
    lines = _lines(path, encoding, report)
    if path.suffix == ".jsonl":
        for n, line in lines:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                yield f"{path}:{n}", str(obj["path"]), list(obj.get("labels", [])), list(obj.get("negatives", []))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                report.add("malformed_line", f"{path}:{n}", f"{type(exc).__name__}: {line[:60]}", "line skipped")
        return
    header = next(csv.reader([lines[0][1]]), None) if lines and lines[0][0] == 1 else None
    if not header or header[:2] != ["path", "labels"]:
        raise ValueError(f"{path}:1: expected a header path,labels[,negatives], found {header}")
    rows = [(n, line) for n, line in lines[1:] if line.strip()]
    if not rows:
        raise ValueError(f"{path}: the list has a header and no rows")
    names = lambda s: [x.strip() for x in s.split("|") if x.strip()]  # noqa: E731
    for n, line in rows:
        row = next(csv.reader([line]), [])
        if len(row) not in (2, 3) or not row[0]:
            report.add("malformed_line", f"{path}:{n}", ",".join(row)[:80], "line skipped")
            continue
        yield f"{path}:{n}", row[0], names(row[1]), names(row[2]) if len(row) == 3 else []


def build_spec(args: argparse.Namespace, report: Report) -> BuildSpec:
    entries = list(_entries(args.list, report, args.encoding))
    if not entries:
        raise ValueError(f"{args.list}: no usable line ({report.counts() or 'the file is empty'})")
    if args.classes:
        classes = [c.strip() for c in args.classes.read_text().splitlines() if c.strip()]
    else:
        classes = sorted({name for _, _, pos, neg in entries for name in pos + neg})
    class_of = {c: i for i, c in enumerate(classes)}
    # Lines naming one path are merged, like Open Images rows: each listed class is a row,
    # so one conflict rule holds across lines and within a line.
    table = LabelTable(report, classes)
    for where, rel, pos_names, neg_names in entries:
        table.mention(rel, where)
        for names, positive in ((pos_names, True), (neg_names, False)):
            for name in names:
                if name in class_of:
                    table.add(rel, class_of[name], positive, where)
                else:
                    report.add("unknown_class", where, f"class {name!r} not in the class list", "label ignored")
    records = []
    for rel in table.rows:  # first-appearance order, as the file lists them
        pos, neg = table.pos[rel], table.neg[rel]
        if args.absent == "negative":
            # Only a class no line names is an implied negative: a conflict stays unknown.
            named = set(table.rows[rel])
            neg = neg | (set(range(len(classes))) - named)
        records.append(Record(key=rel, pos=sorted(pos), neg=sorted(neg),
                              image_path=str(args.images / rel), source=table.where.get(rel, "")))
    return BuildSpec(args.list.suffix.lstrip("."), classes, {args.split: records},
                     source={"list": str(args.list)})
