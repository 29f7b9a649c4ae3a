"""Positive-only labels (PPL, SPL): how much should an unknown label weigh? (issue 18's study)

    OMP_NUM_THREADS=1 python -m bench.positive_only [--seeds 0 1 2] [--workers 2]

Linear heads on the sample feature datasets (tests/data/features) (the grid's cell protocol: Adam, lr 1e-3, weight
decay 1e-4, 20 epochs, the epoch chosen on validation mAP), settings PPL 0.3/0.6/0.9 and SPL,
methods: ``pml`` (default: under positive-only labels its ``unknown_weight`` "auto" is WAN's
1/(C-1)), ``pml-w1`` (AN's weight 1), ``pml-wsqrt`` (1/sqrt(C-1), the geometric middle), and
AN, WAN, ASL. Appends one JSON line per cell to bench/results/positive_only.jsonl (cells
already there are skipped) and writes the tables, with leave-one-dataset-out choices among
the three pml weights (chosen on the other datasets' validation mAP margins over the best of
AN, ASL, WAN), to docs/results/positive_only.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FEATURES = REPO / "tests/data/features"
DATASETS = {"bibtex": "bibtex/bibtex", "corel16k001": "corel16k/corel16k001",
            "corel16k002": "corel16k/corel16k002", "corel5k-densehue": "corel5k-densehue/corel5k-densehue",
            "scene": "scene/scene", "yeast": "yeast/yeast"}
DECIDING = ["bibtex", "corel16k001", "corel16k002", "corel5k-densehue"]  # scene, yeast: smoke tests
SETTINGS = ["ppl0.3", "ppl0.6", "ppl0.9", "spl"]
CANDIDATES = ["pml", "pml-w1", "pml-wsqrt"]
BASELINES = ["an", "asl", "wan"]
_DATA: dict = {}


def weight_options(method: str, num_classes: int) -> dict | None:
    return {"pml-w1": {"unknown_weight": 1.0},
            "pml-wsqrt": {"unknown_weight": (num_classes - 1) ** -0.5}}.get(method)


def cell(job: tuple) -> dict:
    import torch

    from stream_pml.experiment import linear
    from stream_pml.experiment.features import from_npz

    ds, method, setting, seed = job
    torch.set_num_threads(1)
    if ds not in _DATA:
        _DATA[ds] = from_npz(FEATURES / f"{DATASETS[ds]}.npz", 0.2)
    data = _DATA[ds]
    options = weight_options(method, data.Y["train"].shape[1])
    if options is not None:
        linear.VARIANTS[method] = ("pml", options)
    r = linear.train_cell(data, method, setting, seed)
    return {"ds": ds, "method": method, "setting": setting, "seed": seed, "options": options,
            "val": r["val_map"], "test": r["test_map"], "best_epoch": r["best_epoch"]}


def tables(rows: list[dict]) -> str:
    cells = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in rows:
        cells[(r["ds"], r["setting"])][r["method"]].append((100 * r["val"], 100 * r["test"]))
    mean = lambda xs, i: sum(x[i] for x in xs) / len(xs)  # noqa: E731
    methods = CANDIDATES + BASELINES
    out = ["Test mAP (%), mean over the seeds run (n); linear heads, the grid's cell protocol.", "",
           "| data | setting | n | " + " | ".join(methods) + " | pml - best of AN/ASL/WAN |",
           "|---|---|---|" + "---|" * (len(methods) + 1)]
    for (ds, st), m in sorted(cells.items()):
        if not all(k in m for k in methods):
            continue
        best = max(mean(m[b], 1) for b in BASELINES)
        out.append(f"| {ds} | {st} | {len(m['pml'])} | " + " | ".join(f"{mean(m[k], 1):.2f}" for k in methods)
                   + f" | {mean(m['pml'], 1) - best:+.2f} |")

    def margin(c: str, dss: list[str]) -> float:
        v = [mean(m[c], 0) - max(mean(m[b], 0) for b in BASELINES)
             for (ds, _), m in cells.items() if ds in dss and all(k in m for k in methods)]
        return sum(v) / max(len(v), 1)

    out += ["", "Leave one dataset out: the pml weight with the best mean validation margin over the best of",
            "AN, ASL, WAN on the other three deciding datasets, then its test mAP on the held-out one.", "",
            "| held out | validation margins on the others | chosen | setting | chosen test | best of AN/ASL/WAN | margin |",
            "|---|---|---|---|---|---|---|"]
    for d in DECIDING:
        others = [x for x in DECIDING if x != d]
        scores = {c: margin(c, others) for c in CANDIDATES}
        chosen = max(scores, key=scores.get)
        for (ds, st), m in sorted(cells.items()):
            if ds != d or not all(k in m for k in methods):
                continue
            best = max(mean(m[b], 1) for b in BASELINES)
            out.append(f"| {d} | {', '.join(f'{k} {v:+.2f}' for k, v in scores.items())} | {chosen} | {st} | "
                       f"{mean(m[chosen], 1):.2f} | {best:.2f} | {mean(m[chosen], 1) - best:+.2f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--results", type=Path, default=REPO / "bench/results/positive_only.jsonl")
    ap.add_argument("--out", type=Path, default=REPO / "docs/results/positive_only.md")
    args = ap.parse_args(argv)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.results.exists():
        done = {(r["ds"], r["method"], r["setting"], r["seed"]) for r in map(json.loads, args.results.open())}
    jobs = [(ds, m, st, seed) for seed in args.seeds for ds in args.datasets for st in SETTINGS
            for m in CANDIDATES + BASELINES if (ds, m, st, seed) not in done]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(args.workers) as pool, args.results.open("a") as f:
        for r in pool.map(cell, jobs):
            f.write(json.dumps(r) + "\n")
            f.flush()
            print(r["ds"], r["method"], r["setting"], r["seed"], f"val {100 * r['val']:.2f} test {100 * r['test']:.2f}",
                  flush=True)
    rows = [json.loads(line) for line in args.results.open()]
    args.out.write_text(tables(rows))
    print(f"tables: {args.out}")


if __name__ == "__main__":
    main()
