"""GPU checks for the ``device`` tool (one H100/H200), about 5 minutes; prints one JSON report.

    bash bench/gpu_check.sh

1. ResNet-50 at 448, bf16 autocast + channels_last, Adam step on synthetic batches:
   images/s, eager and (``--compile``) torch.compile.
2. DALI ``mixed`` (nvJPEG) decode + resize 448 + flip over real COCO shards: images/s.
3. The whole trainer on those shards for a short run (real pipeline): images/s and the
   data-wait share from its log.
4. pml sparse loss at C = 600 and 20,000, B = 256: ms on the GPU.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def sync_time(fn, n: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def resnet_step(batch: int, compile_model: bool) -> float:
    import torchvision

    model = torchvision.models.resnet50(num_classes=600).cuda().to(memory_format=torch.channels_last)
    if compile_model:
        model = torch.compile(model)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    x = torch.randn(batch, 3, 448, 448, device="cuda").contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 600, device="cuda") < 0.01).float()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch / sync_time(step, 20, warmup=5 if not compile_model else 10)


def main() -> None:
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    report["resnet50_448_bf16_images_per_s"] = resnet_step(128, False)
    try:
        report["resnet50_448_bf16_compiled_images_per_s"] = resnet_step(128, True)
    except Exception as exc:  # report, do not lose the rest of the run
        report["compile_error"] = repr(exc)[:300]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from shard_tools.cli import main as shard_main

        coco = REPO / "tests" / "data" / "coco128"
        shards = tmp / "coco"
        # 32 real images, 32 copies through a list file -> 1,024 images in 16 shards.
        imgs = tmp / "imgs"
        imgs.mkdir()
        lines = ["path,labels"]
        for k in range(32):
            for p in sorted((coco / "images/train2017").glob("*.jpg")):
                (imgs / f"{k}_{p.name}").symlink_to(p)
                lines.append(f"{k}_{p.name},x")
        (tmp / "list.csv").write_text("\n".join(lines) + "\n")
        assert shard_main(["build", "csv", "--list", str(tmp / "list.csv"), "--images", str(imgs),
                           "--out", str(shards), "--shard-size", "64", "--workers", "16"]) == 0
        for split in ("val", "test"):
            assert shard_main(["build", "csv", "--list", str(tmp / "list.csv"), "--images", str(imgs),
                               "--out", str(shards), "--shard-size", "64", "--workers", "16",
                               "--split", split]) == 0
        from shard_tools.manifest import load_manifest, shard_paths
        import importlib.util

        has_dali = importlib.util.find_spec("nvidia.dali") is not None
        report["dali"] = "installed" if has_dali else "not installed: DALI decode not measured, trainer on torch backend"
        if has_dali:
            from stream_pml.data.dali import DaliShardStream

            tars, idxs = shard_paths(shards, load_manifest(shards).splits["train"])
            stream = DaliShardStream(tars, idxs, image_size=448, batch_size=128, train=True, flip=True,
                                     seed=0, num_threads=8, prefetch_depth=3)
            n, t0 = 0, None
            for i, b in enumerate(stream):
                if i == 1:
                    torch.cuda.synchronize()
                    t0, n = time.perf_counter(), 0
                n += b.size
            torch.cuda.synchronize()
            report["dali_mixed_decode_resize_images_per_s"] = n / (time.perf_counter() - t0)

        from stream_pml.train import main as train_main

        run = tmp / "run"
        rc = train_main([f"data.shards={shards}", "data.batch_size=128", "data.num_threads=8",
                         f"data.backend={'dali' if has_dali else 'torch'}",
                         "model.arch=resnet50", f"train.run_dir={run}", "train.epochs=2",
                         "train.log_every=2", "data.val_split=val", "data.test_split=''"])
        report["trainer_rc"] = rc
        if rc != 0:
            print(json.dumps(report, indent=1))
            sys.exit(f"the trainer exited with status {rc}")
        with open(run / "train_log.csv") as f:
            rows = list(csv.DictReader(f))[1:]
        report["trainer_images_per_s"] = statistics.median(float(r["images_per_s"]) for r in rows)
        report["trainer_data_wait_share"] = statistics.median(float(r["data_wait_share"]) for r in rows)

    from stream_pml.labels import _padded_ids
    from stream_pml.losses.pml import pml_loss_sparse

    for C in (600, 20_000):
        logits = torch.randn(256, C, device="cuda", requires_grad=True)
        known = torch.rand(256, C, device="cuda") < 3.0 / C
        pos, neg = _padded_ids(known.cpu()).cuda(), _padded_ids(torch.zeros_like(known).cpu()).cuda()
        pseudo = torch.rand(256, C, device="cuda")
        report[f"pml_sparse_q0.1_C{C}_B256_ms"] = 1e3 * sync_time(
            lambda: pml_loss_sparse(logits, pos, neg, pseudo_BC=pseudo, q=0.1).backward(), 20)
    print(json.dumps(report, indent=1))
    sys.stdout.flush()
    if "compile_error" in report:  # reported above with everything else, and not passed
        sys.exit("torch.compile failed (see compile_error)")


if __name__ == "__main__":
    main()
