"""``shard-tools``: build datasets into shards, verify and inspect them."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import coco, cub, digits, listfile, nuswide, openimages, voc
from .manifest import MANIFEST_NAME, ManifestError, load_manifest
from .writer import REPORT_NAME, BadInput, EncodeOptions, Report, build

# name -> (module-like with add_arguments / build_spec, help, has a --split option)
DATASETS = {
    "openimages": (openimages, "Open Images image-level label CSVs", True),
    "coco": (coco.Coco, "COCO instances JSON (2014/2017)", True),
    "yolo": (coco.Yolo, "YOLO label folder + classes.txt", True),
    "nuswide": (nuswide, "NUS-WIDE 81 concepts", True),
    "cub": (cub, "CUB-200-2011 312 attributes (train and test splits)", False),
    "voc": (voc, "PASCAL VOC ImageSets/Main lists", True),
    "csv": (listfile, "your own data: path,labels CSV", True),
    "jsonl": (listfile, "your own data: JSON lines", True),
    "digits": (digits, "embedded sample: scikit-learn digit mosaics (train/val/test)", False),
}


def _common(p: argparse.ArgumentParser, has_split: bool) -> None:
    p.add_argument("--out", required=True,
                   help="output directory (shards + manifest), or a URL (s3://, gs://, file://): built in a local "
                        "staging directory, then uploaded, manifest last")
    p.add_argument("--stage", type=Path, default=None,
                   help="staging directory of a remote --out (default: under ~/.cache/stream-pml/staging); "
                        "kept, so a rerun after an interruption uploads only what is missing")
    if has_split:
        p.add_argument("--split", default="train", help="split name written (default %(default)s)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--max-side", type=int, default=0, help="re-encode with the longest side capped")
    p.add_argument("--quality", type=int, default=0, help="re-encode at this JPEG quality")
    p.add_argument("--strict", action="store_true", help="stop at the first bad input")
    p.add_argument("--overwrite", action="store_true",
                   help="replace another build found in --out (its files that the new manifest does not "
                        "list are deleted); without it such a build is refused")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes for decoding and writing (the default is this machine's core count)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="shard-tools", description=__doc__, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a dataset into shards")
    bsub = b.add_subparsers(dest="dataset", required=True)
    for name, (module, help_text, has_split) in DATASETS.items():
        p = bsub.add_parser(name, help=help_text, formatter_class=fmt)
        module.add_arguments(p)
        _common(p, has_split)
    v = sub.add_parser("verify", help="checksums, counts, every sample decodes, labels in range", formatter_class=fmt)
    v.add_argument("dir", help="built shard directory (holds manifest.json) or its URL")
    i = sub.add_parser("inspect", help="class frequencies, labels per image, a contact sheet PNG", formatter_class=fmt)
    i.add_argument("dir", type=Path, help="built shard directory (holds manifest.json)")
    i.add_argument("--split", default=None, help="default: the first split")
    i.add_argument("--num-images", type=int, default=16)
    return parser.parse_args(argv)


def _staging(url: str, stage: Path | None) -> Path:
    import hashlib

    if stage is not None:
        return stage
    return Path.home() / ".cache" / "stream-pml" / "staging" / hashlib.sha1(url.encode()).hexdigest()[:12]


def cmd_build(args: argparse.Namespace) -> int:
    from .remote import is_remote, upload_tree

    remote = str(args.out) if is_remote(args.out) else None
    args.out = _staging(remote, args.stage) if remote else Path(args.out)
    rc = _build_local(args)
    if remote:
        names = [p.name for p in sorted(args.out.iterdir())
                 if p.is_file() and not p.name.endswith(".build_state.json")]
        sent = upload_tree(args.out, remote, names)
        print(f"uploaded {len(sent)} of {len(names)} files to {remote} (the others were there already); "
              f"staging kept in {args.out}")
    return rc


def _build_local(args: argparse.Namespace) -> int:
    for name in ("images", "annotations", "labels", "classes", "root", "list", "image_list", "concepts", "hierarchy"):
        paths = getattr(args, name, None)
        for path in paths if isinstance(paths, list) else [paths]:
            if isinstance(path, Path) and not path.exists():
                raise FileNotFoundError(f"--{name.replace('_', '-')} {path} does not exist")
    report = Report(strict=args.strict)
    module = DATASETS[args.dataset][0]
    spec = module.build_spec(args, report)
    existing = None
    if (args.out / MANIFEST_NAME).exists():
        existing = load_manifest(args.out)
        if existing.classes != spec.classes or existing.shard_size != args.shard_size:
            if not args.overwrite:
                raise ManifestError(f"{args.out / MANIFEST_NAME}: holds a dataset with other classes or "
                                    "shard size; use --overwrite to replace it or a new --out directory")
            _remove_build(args.out, existing)
            existing = None
    enc = EncodeOptions(max_side=args.max_side, quality=args.quality)
    manifest = build(spec, args.out, args.shard_size, args.seed, enc, report, workers=args.workers,
                     overwrite=args.overwrite)
    if existing is not None:
        for name, split in existing.splits.items():
            manifest.splits.setdefault(name, split)
        manifest.save(args.out)
    for name, split in manifest.splits.items():
        print(f"{name}: {split.num_samples} samples in {len(split.shards)} shards")
    counts = report.counts()
    print(f"problems: {counts or 'none'} (details in {args.out / REPORT_NAME}, "
          f"split {'+'.join(spec.splits)})")
    print(f"wrote {args.out / MANIFEST_NAME}")
    return 0


def _remove_build(out: Path, manifest) -> None:
    """Every file of the build ``manifest`` describes (shards, indexes, per-split files)."""
    for name in manifest.splits:
        for pattern in (f"{name}-*.tar", f"{name}-*.idx", f"{name}.*"):
            for path in out.glob(pattern):
                path.unlink()
    for path in (out / MANIFEST_NAME, out / REPORT_NAME):
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "build":
            return cmd_build(args)
        from .check import inspect, verify

        if args.command == "verify":
            return verify(args.dir)
        return inspect(args.dir, args.split, args.num_images)
    except (BadInput, ManifestError, FileNotFoundError, ValueError) as exc:
        print(f"shard-tools: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
