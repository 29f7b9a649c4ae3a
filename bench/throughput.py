"""Throughput of each stage and of the whole step, against the baselines, in one run.

    python -m bench.throughput [--stages decode loaders loss step] [--repeats 3]

Stages (medians of ``--repeats``; ratios taken within this run):
  decode   raw JPEG decode rate of the shards (PIL and simplejpeg, libjpeg-turbo), per core
  loaders  (128 real COCO images x 4 passes) our DALI pipeline and our torch-native backend vs the baseline a user would
           write (webdataset + PIL + torchvision transforms v2, DataLoader with one worker per
           core), all producing float normalised 448x448 batches
  loss     loss + unknown-entry sampling, sparse vs dense masked form, forward + backward, at
           C = 80, 600, 20,000 and B = 64, 256, next to the classifier layer's own cost
  step     the demo model's training step on the digits shards: share of time waiting for data
The pseudo-label store's cost per step is measured by ``bench.store_bench``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# The repository's 32 sample images by default; BENCHMARKS.md's figures used the full
# coco128 (128 images, `--coco PATH`, same layout).
COCO = REPO / "tests" / "data" / "coco128"
SIZE = 448
# The sample images are read this many times per measurement, so start-up (worker
# processes, DALI's pipeline) weighs on every loader as it would on a real epoch's start.
PASSES = 4


def median_rate(fn, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def build_coco_shards(tmp: Path, coco: Path = COCO) -> Path:
    from shard_tools.cli import main as shard_main

    out = tmp / "coco_shards"
    rc = shard_main(["build", "coco", "--images", str(coco / "images/train2017"), "--annotations",
                     str(coco / "annotations/instances_train2017.json"), "--out", str(out),
                     "--shard-size", "64", "--workers", "2"])
    assert rc == 0
    return out


def jpeg_bytes(shards: Path) -> list[bytes]:
    import tarfile

    out = []
    for tar_path in sorted(shards.glob("train-*.tar")):
        with tarfile.open(tar_path) as tar:
            out += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
    return out


def stage_decode(shards: Path, repeats: int) -> dict:
    import simplejpeg
    from PIL import Image

    data = jpeg_bytes(shards)

    def pil():
        for b in data:
            Image.open(io.BytesIO(b)).convert("RGB").load()
        return len(data)

    def sj():
        for b in data:
            try:
                simplejpeg.decode_jpeg(b, colorspace="RGB")
            except ValueError:
                Image.open(io.BytesIO(b)).convert("RGB").load()
        return len(data)

    torch.set_num_threads(1)
    return {"images": len(data), "mean_kb": sum(map(len, data)) / len(data) / 1024,
            "pil_decode_per_core": median_rate(pil, repeats),
            "simplejpeg_decode_per_core": median_rate(sj, repeats)}


def _baseline_loader(shards: Path, workers: int):
    import webdataset as wds
    from torchvision.transforms import v2

    tf = v2.Compose([v2.ToImage(), v2.Resize((SIZE, SIZE), antialias=True), v2.RandomHorizontalFlip(),
                     v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    urls = [str(p) for p in sorted(shards.glob("train-*.tar"))] * PASSES
    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=wds.split_by_node,
                         workersplitter=wds.split_by_worker)
          .decode("pil").to_tuple("jpg").map_tuple(tf))
    return torch.utils.data.DataLoader(ds, batch_size=32, num_workers=workers)


def stage_loaders(shards: Path, repeats: int) -> dict:
    from stream_pml.data.batch import Normalizer
    from stream_pml.data.dali import DaliShardStream
    from stream_pml.data.torch_stream import TorchShardStream
    from shard_tools.manifest import load_manifest, shard_paths

    cores = os.cpu_count() or 1
    tars, idxs = shard_paths(shards, load_manifest(shards).splits["train"])
    tars, idxs = tars * PASSES, idxs * PASSES
    torch.set_num_threads(1)

    def baseline():
        n = 0
        for (images,) in _baseline_loader(shards, cores):
            n += images.shape[0]
        return n

    def ours(cls):
        def run():
            n = 0
            normalize = Normalizer()
            stream = cls(tars, idxs, image_size=SIZE, batch_size=32, train=True, flip=True, seed=0,
                         num_threads=cores, num_workers=cores, shuffle_buffer=64)
            for batch in stream:
                normalize(batch.images_BCHW)  # same float normalised output as the baseline
                n += batch.size
            return n
        return run

    out = {"cores": cores}
    out["baseline_webdataset_pil_dataloader"] = median_rate(baseline, repeats)
    out["ours_dali_cpu"] = median_rate(ours(DaliShardStream), repeats)
    out["ours_torch_native"] = median_rate(ours(TorchShardStream), repeats)
    return out


def stage_loss(repeats: int) -> list[dict]:
    from stream_pml.labels import _padded_ids
    from stream_pml.losses.pml import pml_loss, pml_loss_sparse

    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for C in (80, 600, 20_000):
        for B in (64, 256):
            g = torch.Generator().manual_seed(0)
            logits = torch.randn(B, C, generator=g, requires_grad=True)
            known = torch.rand(B, C, generator=g) < (3.0 / C)  # a few known labels per image
            targets = (torch.rand(B, C, generator=g) < 0.5).float() * known
            pos, neg = _padded_ids(known & (targets == 1)), _padded_ids(known & (targets == 0))
            pseudo = torch.rand(B, C, generator=g)

            def timed(fn):
                times = []
                for _ in range(max(repeats, 3)):
                    t0 = time.perf_counter()
                    fn().backward()
                    times.append(time.perf_counter() - t0)
                return 1e3 * statistics.median(times)

            row = {"C": C, "B": B}
            for q in (0.1, 0.5):
                row[f"sparse_q{q}_ms"] = timed(lambda: pml_loss_sparse(logits, pos, neg, pseudo_BC=pseudo, q=q,
                                                                        generator=g))
                row[f"dense_q{q}_ms"] = timed(lambda: pml_loss(logits, targets, known, pseudo_BC=pseudo, q=q,
                                                                generator=g))
            if C == 20_000:
                head = torch.nn.Linear(2048, C)
                feats = torch.randn(B, 2048)
                row["classifier_fwd_bwd_ms"] = timed(lambda: head(feats).sum())
            rows.append(row)
    return rows


def stage_step(tmp: Path) -> dict:
    """The demo model on the digits shards, a short run; data wait from the trainer's log."""
    import csv

    from shard_tools.cli import main as shard_main
    from stream_pml.train import main as train_main

    shards = tmp / "digits"
    assert shard_main(["build", "digits", "--out", str(shards), "--num-train", "1024", "--num-val", "64",
                       "--num-test", "64", "--workers", "2"]) == 0
    out = {}
    for backend in ("torch", "dali"):
        run = tmp / f"run_{backend}"
        assert train_main(["--config", str(REPO / "configs/demo.yaml"), f"data.shards={shards}",
                           f"train.run_dir={run}", "train.epochs=1", "train.log_every=8",
                           f"data.backend={backend}"]) == 0
        with open(run / "train_log.csv") as f:
            log = list(csv.DictReader(f))[1:]  # the first interval holds the pipeline's start
        out[backend] = {"images_per_s": statistics.median(float(r["images_per_s"]) for r in log),
                        "data_wait_share": statistics.median(float(r["data_wait_share"]) for r in log)}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", nargs="+", default=["decode", "loaders", "loss", "step"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--coco", type=Path, default=COCO, help="a coco128-layout folder (images/train2017, annotations/)")
    args = ap.parse_args(argv)
    report: dict = {"machine": f"{os.cpu_count()} cores", "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = build_coco_shards(tmp, args.coco) if {"decode", "loaders"} & set(args.stages) else None
        if "decode" in args.stages:
            report["decode"] = stage_decode(shards, args.repeats)
        if "loaders" in args.stages:
            report["loaders"] = stage_loaders(shards, args.repeats)
        if "loss" in args.stages:
            report["loss"] = stage_loss(args.repeats)
        if "step" in args.stages:
            report["step"] = stage_step(tmp)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(report, indent=1))
    md = render(report)
    (out / "throughput.md").write_text(md)
    print(md)
    return report


def render(r: dict) -> str:
    lines = [f"machine: {r['machine']}, torch {r['torch']}", ""]
    if "decode" in r:
        d = r["decode"]
        lines += [f"decode only ({d['images']} COCO JPEGs, mean {d['mean_kb']:.0f} KB): PIL "
                  f"{d['pil_decode_per_core']:.0f}/s per core, simplejpeg {d['simplejpeg_decode_per_core']:.0f}/s per core", ""]
    if "loaders" in r:
        ld = r["loaders"]
        base = ld["baseline_webdataset_pil_dataloader"]
        lines += ["| loader (float normalised 448x448) | images/s | vs baseline |", "|---|---|---|"]
        for k in ("baseline_webdataset_pil_dataloader", "ours_dali_cpu", "ours_torch_native"):
            lines.append(f"| {k} | {ld[k]:.0f} | {ld[k] / base:.2f}x |")
        if "decode" in r:
            limit = r["decode"]["simplejpeg_decode_per_core"] * ld["cores"]
            lines.append(f"| decode limit (simplejpeg x {ld['cores']} cores) | {limit:.0f} | "
                         f"ours_torch_native = {ld['ours_torch_native'] / limit:.0%} of it |")
        lines.append("")
    if "loss" in r:
        keys = [k for k in r["loss"][-1] if k not in ("C", "B")]
        lines += ["| C | B | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
        for row in r["loss"]:
            lines.append(f"| {row['C']} | {row['B']} | " + " | ".join(
                f"{row[k]:.2f}" if k in row else "" for k in keys) + " |")
        lines.append("")
    if "step" in r:
        lines += ["| demo step backend | images/s | data-wait share |", "|---|---|---|"]
        for k, v in r["step"].items():
            lines.append(f"| {k} | {v['images_per_s']:.0f} | {v['data_wait_share']:.1%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
