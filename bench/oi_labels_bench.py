"""The Open Images builder's label stage at full size: peak RSS and time.

    python -m bench.oi_labels_bench [--images 9000000] [--out /tmp/oi-bench] [--compare-rows 6000000]

Writes a label CSV in the official format (``ImageID,Source,LabelName,Confidence``) for
``--images`` images over the real 601 boxable classes (tests/data/openimages): per image a
long-tailed (Zipf) number of positives and verified negatives, about 6.7 rows per image, so
9M images give about 60M rows, like ``oidv6-train-annotations-human-imagelabels.csv``. The
file is generated, never stored in the repository (and reused when it is already there).

Then, each in a fresh process, the builder's label stage as ``shard-tools build openimages
--hierarchy`` runs it: read every row, expand along the real hierarchy, decide every
(image, class) with the conflict rule, build the per-image CSR. Reported: wall time, peak
RSS, the CSV's size, and the decided label table's own size (CSR bytes). With
``--compare-rows`` the dict-based table the other builders use (``sources.LabelTable``) reads
the first rows of the same file, beside the columnar one on the same rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OI = REPO / "tests" / "data" / "openimages"


def generate(path: Path, num_images: int, seed: int = 0, chunk: int = 250_000) -> int:
    """Write the CSV; returns its row count. Class frequencies follow a Zipf law over the
    601 classes (a few in millions of images, hundreds in thousands), as Open Images' do."""
    from shard_tools.sources import read_class_list

    mids, _ = read_class_list(OI / "class-descriptions-boxable.csv")
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(mids) + 1) ** 1.1
    weights /= weights.sum()
    mids_arr = np.array(mids)
    rows = 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("ImageID,Source,LabelName,Confidence\n")
        for start in range(0, num_images, chunk):
            n = min(chunk, num_images - start)
            num_pos = 1 + rng.poisson(2.3, n)
            num_neg = rng.poisson(4.4, n)
            per = num_pos + num_neg
            image = np.repeat(np.arange(start, start + n), per)
            cls = rng.choice(len(mids), size=int(per.sum()), p=weights)
            first = np.repeat(np.cumsum(per) - per, per)
            conf = (np.arange(len(cls)) - first) < np.repeat(num_pos, per)
            # One value per (image, class): a repeated draw keeps its first row's.
            key = image.astype(np.int64) * 1000 + cls
            _, keep = np.unique(key, return_index=True)
            keep.sort()
            ids = np.char.mod("%016x", image[keep])
            lines = [f"{i},verification,{m},{int(c)}\n"
                     for i, m, c in zip(ids.tolist(), mids_arr[cls[keep]].tolist(), conf[keep].tolist())]
            f.writelines(lines)
            rows += len(lines)
    tmp.replace(path)
    return rows


def make_files(root: Path, num_images: int) -> None:
    """One empty ``<ImageID>.jpg`` per image of the CSV, in 256 folders: what the builder's
    image scan and record stage see (no image is decoded here)."""
    done = root / ".complete"
    if done.exists():
        return
    for d in range(256):
        (root / f"{d:02x}").mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        open(root / f"{i % 256:02x}" / f"{i:016x}.jpg", "wb").close()
    done.write_text(str(num_images))


def _peak_rss_bytes() -> int:
    """This process's peak RSS since exec (VmHWM; ``ru_maxrss`` would include the parent's
    size at fork, which Linux carries across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _stage(csv_path: str, mode: str, max_rows: int) -> dict:
    """One label stage in this process (run by a fresh subprocess); mode ``builder`` also
    scans the image folder beside the CSV and builds the records and the split's label CSR
    as ``shard-tools build`` does before its first shard."""
    from shard_tools.label_columns import read_hierarchy
    from shard_tools.openimages import read_labels
    from shard_tools.sources import LabelTable, read_class_list
    from shard_tools.writer import Report

    mids, names = read_class_list(OI / "class-descriptions-boxable.csv")
    report = Report()
    imports_rss = _peak_rss_bytes()
    t0 = time.perf_counter()
    path = Path(csv_path)
    if max_rows:
        cut = path.with_name(f"{path.stem}-{max_rows}.csv")
        if not cut.exists():
            with open(path) as src, open(cut, "w") as dst:
                for n, line in enumerate(src):
                    if n > max_rows:
                        break
                    dst.write(line)
        path = cut
        t0 = time.perf_counter()
    if mode in ("columnar", "builder"):
        table = read_labels([path], mids, report, None, names)
        d = table.decide(read_hierarchy(OI / "bbox_labels_600_hierarchy.json", mids))
        if mode == "builder":
            from shard_tools.sources import scan_images
            from shard_tools.writer import _label_csr

            records = table.records(scan_images(path.parent / "images", report))
            pos_csr, neg_csr, _ = _label_csr(records, len(mids))
            assert int(pos_csr["pos_indptr"][-1]) == len(d.pos)
        num_images, num_rows = len(d.image_ids), table.num_rows
        table_bytes = sum(a.nbytes for a in (d.pos_indptr, d.pos, d.neg_indptr, d.neg, d.image_ids))
        labels = int(len(d.pos) + len(d.neg))
    else:
        import csv

        table = LabelTable(report, mids)
        class_of = {m: i for i, m in enumerate(mids)}
        num_rows = 0
        with open(path, newline="") as f:
            reader = csv.reader(f)
            next(reader)
            for n, (image, _, mid, conf) in enumerate(reader, 2):
                table.add(image, class_of[mid], conf == "1", f"{path}:{n}")
                num_rows += 1
        pos, neg = table.pos, table.neg
        num_images = len(pos)
        labels = sum(map(len, pos.values())) + sum(map(len, neg.values()))
        table_bytes = labels * 4 + (num_images + 1) * 16  # the same labels as CSR
    return {"mode": mode, "rows": num_rows, "images": num_images, "labels_after": labels,
            "seconds": time.perf_counter() - t0, "table_bytes": table_bytes,
            "csv_bytes": path.stat().st_size,
            "peak_rss_bytes": _peak_rss_bytes(), "imports_rss_bytes": imports_rss,
            "problems": report.counts()}


def run_stage(csv_path: Path, mode: str, max_rows: int = 0) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.oi_labels_bench", "--stage", mode, str(csv_path),
                          str(max_rows)], cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--stage":
        print(json.dumps(_stage(sys.argv[3], sys.argv[2], int(sys.argv[4]))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=9_000_000)
    ap.add_argument("--out", type=Path, default=Path("/tmp/oi-labels-bench"))
    ap.add_argument("--compare-rows", type=int, default=0)
    ap.add_argument("--builder", action="store_true",
                    help="also the builder's stages up to its first shard, over one empty file per image")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / f"labels-{args.images}.csv"
    if not csv_path.exists():
        t0 = time.perf_counter()
        rows = generate(csv_path, args.images)
        print(f"generated {csv_path}: {rows:,} rows, {csv_path.stat().st_size / 1e9:.2f} GB "
              f"in {time.perf_counter() - t0:.0f} s")
    results = [run_stage(csv_path, "columnar")]
    if args.builder:
        t0 = time.perf_counter()
        make_files(args.out / "images", args.images)
        print(f"image files in {time.perf_counter() - t0:.0f} s")
        results.append(run_stage(csv_path, "builder"))
    if args.compare_rows:
        results += [run_stage(csv_path, "columnar", args.compare_rows),
                    run_stage(csv_path, "dict", args.compare_rows)]
    print("| table | rows | images | labels decided | s | peak RSS (imports) | label CSV | decided table |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        name = {"columnar": "columnar, hierarchy", "builder": "columnar, hierarchy, + image scan, records, CSR",
                "dict": "dict (LabelTable), no hierarchy"}[r["mode"]]
        print(f"| {name} | {r['rows']:,} | {r['images']:,} | {r['labels_after']:,} | {r['seconds']:.0f} | "
              f"{r['peak_rss_bytes'] / 1e9:.2f} GB ({r['imports_rss_bytes'] / 1e9:.2f}) | "
              f"{r['csv_bytes'] / 1e9:.2f} GB | {r['table_bytes'] / 1e9:.2f} GB |")
    (args.out / "result.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
