"""``shard-tools``: build datasets into shards (one subcommand per dataset)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .manifest import MANIFEST_NAME, ManifestError, load_manifest
from .writer import BadInput, BuildSpec, EncodeOptions, Report, build


def _common(p: argparse.ArgumentParser, default_split: str | None = "train") -> None:
    p.add_argument("--out", required=True, type=Path, help="output directory (shards + manifest)")
    if default_split is not None:
        p.add_argument("--split", default=default_split, help="split name written (default %(default)s)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--max-side", type=int, default=0, help="re-encode with the longest side capped")
    p.add_argument("--quality", type=int, default=0, help="re-encode at this JPEG quality")
    p.add_argument("--strict", action="store_true", help="stop at the first bad input")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="shard-tools", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a dataset into shards")
    bsub = b.add_subparsers(dest="dataset", required=True)

    p = bsub.add_parser("coco", help="COCO instances JSON (2014/2017)")
    p.add_argument("--images", required=True, type=Path)
    p.add_argument("--annotations", required=True, type=Path)
    _common(p)

    p = bsub.add_parser("yolo", help="YOLO label folder + classes.txt (e.g. coco128 val2017)")
    p.add_argument("--images", required=True, type=Path)
    p.add_argument("--labels", required=True, type=Path)
    p.add_argument("--classes", required=True, type=Path)
    _common(p)

    p = bsub.add_parser("digits", help="embedded sample: mosaics of scikit-learn digits")
    p.add_argument("--num-train", type=int, default=3000)
    p.add_argument("--num-val", type=int, default=500)
    p.add_argument("--num-test", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=64)
    _common(p, default_split=None)
    return parser.parse_args(argv)


def _spec(args: argparse.Namespace, report: Report) -> BuildSpec:
    if args.dataset == "digits":
        from .digits import CLASSES, make_records

        sizes = {"train": args.num_train, "val": args.num_val, "test": args.num_test}
        records = make_records(sizes, image_size=args.image_size, seed=args.seed)
        return BuildSpec("digits", CLASSES, records, {k: True for k in records},
                         source={"generator": "sklearn.datasets.load_digits mosaics",
                                 "image_size": args.image_size})
    for name in ("images", "annotations", "labels", "classes"):
        path = getattr(args, name, None)
        if path is not None and not path.exists():
            raise FileNotFoundError(f"--{name} {path} does not exist")
    from .coco import read_coco, read_yolo

    if args.dataset == "coco":
        classes, records = read_coco(args.images, args.annotations, report)
        source = {"annotations": str(args.annotations), "images": str(args.images)}
    else:
        classes, records = read_yolo(args.images, args.labels, args.classes, report)
        source = {"labels": str(args.labels), "images": str(args.images)}
    return BuildSpec(args.dataset, classes, {args.split: records}, {args.split: True}, source)


def cmd_build(args: argparse.Namespace) -> int:
    report = Report(strict=args.strict)
    spec = _spec(args, report)
    existing = None
    if (args.out / MANIFEST_NAME).exists():
        existing = load_manifest(args.out)
        if existing.classes != spec.classes or existing.shard_size != args.shard_size:
            raise ManifestError(f"{args.out / MANIFEST_NAME}: holds a dataset with other classes or "
                                "shard size; use a new --out directory")
    enc = EncodeOptions(max_side=args.max_side, quality=args.quality)
    manifest = build(spec, args.out, args.shard_size, args.seed, enc, report)
    if existing is not None:
        for name, split in existing.splits.items():
            manifest.splits.setdefault(name, split)
        manifest.save(args.out)
    for name, split in manifest.splits.items():
        print(f"{name}: {split.num_samples} samples in {len(split.shards)} shards")
    counts = report.counts()
    print(f"problems: {counts or 'none'} (details in {args.out / 'build_report.csv'})")
    print(f"wrote {args.out / MANIFEST_NAME}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return cmd_build(args)
    except (BadInput, ManifestError, FileNotFoundError, ValueError) as exc:
        print(f"shard-tools: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
