"""``stream-pml``: train, evaluate, predict, export, experiment, demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stream-pml", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error (also STREAM_PML_DEBUG=1); default: one line")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train (same arguments as python -m stream_pml.train)", add_help=False)
    sub.add_parser("experiment", help="run a grid (same arguments as python -m stream_pml.experiment)",
                   add_help=False)
    e = sub.add_parser("evaluate", help="mAP, CP/CR/CF1/OP/OR/OF1 and per-class AP on a split",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--checkpoint", required=True, type=Path, help="run directory or checkpoint file")
    e.add_argument("--shards", required=True, help="built shard directory (holds manifest.json) or its URL")
    e.add_argument("--split", default="test", help="split of --shards to evaluate")
    e.add_argument("--out", type=Path, default=None, help="default: <checkpoint dir>/evaluation")
    r = sub.add_parser("predict", help="labels with scores for images, a folder or a shard split",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--checkpoint", required=True, type=Path, help="run directory or checkpoint file")
    r.add_argument("images", nargs="*", help="image files")
    r.add_argument("--folder", type=Path, help="every image in this folder")
    r.add_argument("--shards", help="predict every sample of a built split instead (directory or URL)")
    r.add_argument("--split", default="test", help="with --shards")
    r.add_argument("--out", type=_predictions_path, default=Path("predictions.jsonl"), help=".jsonl or .csv")
    r.add_argument("--threshold", type=_threshold, default="0.5",
                   help="a number in [0, 1], or 'calibrated' (per class, from validation)")
    r.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    r.add_argument("--show", type=int, default=20, help="print the labels (class names) of the first N images")
    x = sub.add_parser("export", help="safetensors + JSON (classes, preprocessing) + a torch.export program (.pt2)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    x.add_argument("--checkpoint", required=True, type=Path, help="run directory or checkpoint file")
    x.add_argument("--out", required=True, type=Path, help="directory for the exported files")
    d = sub.add_parser("demo", help="build the embedded digits dataset if needed, train the demo",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--data", type=Path, default=Path("data/digits"), help="where the demo shards are (built if absent)")
    d.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.epochs=2")
    return p


def _threshold(value: str) -> str:
    """argparse names the flag in its message: 'argument --threshold: ...'."""
    if value == "calibrated":
        return value
    try:
        if 0.0 <= float(value) <= 1.0:
            return value
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{value!r} is not a number in [0, 1] or 'calibrated'")


def _predictions_path(value: str) -> Path:
    path = Path(value)
    if path.suffix not in (".jsonl", ".csv"):
        raise argparse.ArgumentTypeError(f"{value}: the format is chosen by suffix, .jsonl or .csv")
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from .train import main as train_main

        return train_main(argv[1:])
    if argv and argv[0] == "experiment":
        from .experiment.grid import main as grid_main

        return grid_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (OSError, ValueError, RuntimeError) as exc:  # user errors: paths, files, formats
        import os

        if args.debug or os.environ.get("STREAM_PML_DEBUG") == "1":
            raise
        print(f"stream-pml {args.command}: error: {exc}".splitlines()[0], file=sys.stderr)
        return 2


def _report_skipped(skipped: list[str]) -> None:
    """The count first, then each unreadable sample (shard, byte offset, why)."""
    if skipped:
        print(f"{len(skipped)} unreadable samples skipped:", file=sys.stderr)
        for line in skipped:
            print(f"  {line}", file=sys.stderr)


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _run(args: argparse.Namespace) -> int:
    from . import inference

    if args.command == "demo":
        from shard_tools.cli import main as shard_main

        from .train import main as train_main

        if not (args.data / "manifest.json").exists():
            if shard_main(["build", "digits", "--out", str(args.data)]) != 0:
                return 2
        return train_main(["--config", str(REPO_CONFIGS / "demo.yaml"), f"data.shards={args.data}", *args.overrides])
    if args.command == "export" and args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file; export writes a directory (model files and JSON)")
    lm = inference.load_model(args.checkpoint, _device())
    if args.command == "evaluate":
        out = args.out or lm.source.parent / "evaluation"
        result = inference.evaluate(lm, args.shards, args.split, out)
        _report_skipped(result["skipped"])
        print(json.dumps(result, indent=1))
        tag = inference.evaluation_name(args.shards, args.split)
        print(f"wrote {out}/evaluation_{tag}.md and .json, per_class_ap_{tag}.csv and .png")
        return 0
    if args.command == "predict":
        t0 = time.perf_counter()
        if args.shards is not None:
            skipped: list[str] = []
            records, total = inference.predict_shards(lm, args.shards, args.split, args.batch_size, skipped)
            _report_skipped(skipped)
        else:
            paths = inference._image_files(args.images, args.folder)
            if not paths:
                raise ValueError("no images given (files, --folder or --shards)")
            records, total = inference.predict_files(lm, paths, args.batch_size), len(paths)
        n = inference.write_predictions(records, lm, args.out, args.threshold, echo=args.show)
        more = f" (the first {args.show} shown above)" if total > args.show > 0 else ""
        print(f"{n} of {total} images predicted in {time.perf_counter() - t0:.1f} s -> {args.out}{more}")
        if n == 0:  # nothing usable came out: not a success, whatever was written
            print(f"stream-pml predict: error: none of the {total} images could be read (each one's "
                  f"error is in {args.out})", file=sys.stderr)
            return 2
        return 0
    result = inference.export(lm, args.out)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
