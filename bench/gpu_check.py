"""The GPU check's measurements (run by ``bash bench/gpu_check.sh``): one JSON object.

    python -m bench.gpu_check --json report.json            # on a GPU
    python -m bench.gpu_check --dry-run --json report.json  # on CPU: same code, tiny sizes

Each check has its own time bound; one that fails or runs out of time is recorded under
``failed`` and the others still run. ``SCHEMA`` lists every key a full report holds; the
dry run checks the report against it, so the one GPU call is not spent on a typo.

Checks: ResNet-50 at 448, bf16 autocast + channels_last, Adam steps (eager, compiled);
the torch-only GPU decode (``data.backend=device``: nvJPEG via torchvision) + resize + flip
over real COCO JPEGs; the whole trainer on them (images/s, data-wait share); a run killed
mid-epoch and resumed under ``train.deterministic`` compared bitwise with an uninterrupted
one; the pml loss on the GPU against the CPU, and its time at 600 and 20,000 classes.
"""

from __future__ import annotations

import argparse
import csv
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

SCHEMA = {
    "device": str, "torch": str, "torchvision": str, "dry_run": bool,
    "resnet50_448_bf16_images_per_s": float, "resnet50_448_bf16_compiled_images_per_s": float,
    "torch_cuda_decode_resize_images_per_s": float,
    "trainer_images_per_s": float, "trainer_data_wait_share": float, "trainer_loader": str,
    "resume_bitwise_equal": bool, "resume_steps": int,
    "pml_gpu_vs_cpu_max_abs_diff": float,
    "pml_sparse_q0.1_C600_B256_ms": float, "pml_sparse_q0.1_C20000_B256_ms": float,
}


class CheckTimeout(Exception):
    pass


def bounded(report: dict, name: str, seconds: int, fn) -> None:
    """Run ``fn(report)`` for at most ``seconds``; a failure is recorded, never raised."""
    def alarm(*_):
        raise CheckTimeout(f"over its {seconds} s bound")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    t0 = time.perf_counter()
    try:
        fn(report)
    except Exception as exc:  # recorded with the rest of the report
        report.setdefault("failed", {})[name] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        report.setdefault("check_seconds", {})[name] = round(time.perf_counter() - t0, 1)
        print(f"gpu_check: {name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, n: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / n


class Check:
    def __init__(self, dry: bool, tmp: Path):
        self.dry, self.tmp = dry, tmp
        self.device = torch.device("cpu" if dry else "cuda")
        self.size = 64 if dry else 448
        self.shards = tmp / "coco"

    def resnet(self, report: dict, compiled: bool) -> None:
        import torchvision

        batch = 2 if self.dry else 128
        model = torchvision.models.resnet50(num_classes=600).to(self.device).to(memory_format=torch.channels_last)
        if compiled:  # the dry run traces with AOT autograd only: inductor's C++ build is the GPU's to pay
            model = torch.compile(model, backend="aot_eager" if self.dry else "inductor")
        opt = torch.optim.Adam(model.parameters(), 1e-4)
        x = torch.randn(batch, 3, self.size, self.size, device=self.device).contiguous(memory_format=torch.channels_last)
        y = (torch.rand(batch, 600, device=self.device) < 0.01).float()

        def step():
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        n, warm = (1, 1) if self.dry else (20, 10 if compiled else 5)
        key = "resnet50_448_bf16_compiled_images_per_s" if compiled else "resnet50_448_bf16_images_per_s"
        report[key] = batch / timed(step, n, warm, self.device)

    def build_shards(self, report: dict) -> None:
        """Real COCO JPEGs (tests/data/coco128), copied 32 times (once in the dry run)."""
        from shard_tools.cli import main as shard_main

        coco = REPO / "tests" / "data" / "coco128" / "images" / "train2017"
        imgs = self.tmp / "imgs"
        imgs.mkdir()
        lines = ["path,labels"]
        for k in range(1 if self.dry else 32):
            for p in sorted(coco.glob("*.jpg")):
                (imgs / f"{k}_{p.name}").symlink_to(p)
                lines.append(f"{k}_{p.name},c{hash(p.name) % 5}")
        (self.tmp / "list.csv").write_text("\n".join(lines) + "\n")
        for split in ("train", "val"):
            assert shard_main(["build", "csv", "--list", str(self.tmp / "list.csv"), "--images", str(imgs),
                               "--out", str(self.shards), "--shard-size", "16" if self.dry else "64",
                               "--workers", "1" if self.dry else "8", "--split", split]) == 0

    def decode(self, report: dict) -> None:
        from shard_tools.manifest import load_manifest, shard_paths
        from stream_pml.data.device_decode import DeviceDecodeStream

        tars, idxs = shard_paths(self.shards, load_manifest(self.shards).splits["train"])
        stream = DeviceDecodeStream(tars, idxs, image_size=self.size, batch_size=8 if self.dry else 128,
                                    train=True, flip=True, seed=0, num_threads=2 if self.dry else 8,
                                    prefetch_depth=3, device=self.device)
        n, t0 = 0, None
        for i, b in enumerate(stream):
            if i == 1:  # the first batch pays nvJPEG's start-up
                _sync(self.device)
                t0, n = time.perf_counter(), 0
            n += b.size
        _sync(self.device)
        report["torch_cuda_decode_resize_images_per_s"] = n / (time.perf_counter() - t0)

    def _train_args(self, run: Path, **extra) -> list[str]:
        base = {"data.shards": self.shards, "data.batch_size": 8 if self.dry else 128,
                "data.eval_batch_size": 16 if self.dry else 128, "data.num_threads": 2 if self.dry else 8,
                "data.image_size": self.size, "data.backend": "device",
                "model.arch": "mobilenet_v3_small" if self.dry else "resnet50", "train.run_dir": run,
                "train.epochs": 2, "train.log_every": 1 if self.dry else 2, "data.val_split": "val",
                "data.test_split": "''", "train.device": self.device.type}
        base.update(extra)
        return [f"{k}={v}" for k, v in base.items()]

    def trainer(self, report: dict) -> None:
        from stream_pml.train import main as train_main

        run = self.tmp / "run"
        rc = train_main(self._train_args(run))
        assert rc == 0, f"the trainer exited with status {rc}"
        with open(run / "train_log.csv") as f:
            rows = list(csv.DictReader(f))[1:]
        report["trainer_images_per_s"] = statistics.median(float(r["images_per_s"]) for r in rows)
        report["trainer_data_wait_share"] = statistics.median(float(r["data_wait_share"]) for r in rows)
        report["trainer_loader"] = json.loads((run / "run_info.json").read_text()).get("loader", {}).get("backend", "?")

    def resume(self, report: dict) -> None:
        """Killed after its 3rd step's checkpoint (mid-epoch), resumed: the end must equal an
        uninterrupted run's bit for bit (train.deterministic)."""
        from stream_pml import checkpoint as ckpt
        from stream_pml.train import main as train_main
        from stream_pml.trainer import Trainer

        small = dict(**{"data.image_size": 64, "model.arch": "mobilenet_v3_small", "data.batch_size": 8,
                        "train.checkpoint_every": 3, "train.deterministic": "true", "loss.name": "pml",
                        "data.label_setting": "pal", "data.label_ratio": 0.5, "train.epochs": 1})
        ref, cut = self.tmp / "ref", self.tmp / "cut"
        assert train_main(self._train_args(ref, **small)) == 0

        class Killed(BaseException):
            pass

        real = Trainer.save_checkpoint

        def dying(self_):
            path = real(self_)
            if self_.step == 3:
                raise Killed()
            return path

        Trainer.save_checkpoint = dying
        try:
            train_main(self._train_args(cut, **small))
        except Killed:
            pass
        finally:
            Trainer.save_checkpoint = real
        assert train_main(self._train_args(cut, **small)) == 0
        states = [torch.load(ckpt.list_checkpoints(r)[-1] / ckpt.MAIN_FILE, map_location="cpu", weights_only=False)
                  for r in (ref, cut)]
        report["resume_steps"] = int(states[0]["progress"]["step"])
        report["resume_bitwise_equal"] = (states[0]["progress"]["step"] == states[1]["progress"]["step"] and all(
            torch.equal(v, states[1]["model"][k]) for k, v in states[0]["model"].items()))

    def pml(self, report: dict) -> None:
        from stream_pml.labels import _padded_ids
        from stream_pml.losses.pml import pml_loss_sparse

        gen = torch.Generator().manual_seed(0)
        x = torch.randn(16, 40, generator=gen)
        pos, neg = torch.randint(0, 40, (16, 3), generator=gen), torch.randint(-1, 40, (16, 8), generator=gen)
        on = pml_loss_sparse(x.to(self.device), pos.to(self.device), neg.to(self.device), epoch=3, num_epochs=10)
        report["pml_gpu_vs_cpu_max_abs_diff"] = float((on.cpu() - pml_loss_sparse(x, pos, neg, epoch=3,
                                                                                  num_epochs=10)).abs())
        for num_classes in (600, 20_000):
            batch = 8 if self.dry else 256
            logits = torch.randn(batch, num_classes, device=self.device, requires_grad=True)
            known = torch.rand(batch, num_classes) < 3.0 / num_classes
            p, n = _padded_ids(known).to(self.device), _padded_ids(torch.zeros_like(known)).to(self.device)
            pseudo = torch.rand(batch, num_classes, device=self.device)
            report[f"pml_sparse_q0.1_C{num_classes}_B256_ms"] = 1e3 * timed(
                lambda: pml_loss_sparse(logits, p, n, pseudo_BC=pseudo, q=0.1).backward(), 1 if self.dry else 20,
                1 if self.dry else 3, self.device)


def run(dry: bool) -> dict:
    import torchvision

    report: dict = {"dry_run": dry, "torch": torch.__version__, "torchvision": torchvision.__version__}
    if not dry and not torch.cuda.is_available():
        report["failed"] = {"device": "no CUDA device visible"}
        return report
    report["device"] = "cpu (dry run)" if dry else torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as tmp:
        c = Check(dry, Path(tmp))
        for name, seconds, fn in (("resnet_eager", 60, lambda r: c.resnet(r, False)),
                                  ("resnet_compiled", 150, lambda r: c.resnet(r, True)),
                                  ("shards", 60, c.build_shards), ("decode", 45, c.decode),
                                  ("trainer", 120, c.trainer), ("resume", 120, c.resume), ("pml", 40, c.pml)):
            bounded(report, name, seconds * (2 if dry else 1), fn)
    return report


def schema_problems(report: dict) -> list[str]:
    problems = [f"missing {k}" for k in SCHEMA if k not in report and not report.get("failed")]
    problems += [f"{k}: {type(report[k]).__name__}, not {t.__name__}" for k, t in SCHEMA.items()
                 if k in report and not isinstance(report[k], t)]
    return problems


def check_wheels(listing: Path, wheelhouse: Path) -> list[str]:
    """Every line of the list pinned (name==version); with a wheelhouse, a wheel for each,
    nothing else in it, and under 20 MB in all."""
    pins = {}
    for line in listing.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            if not sep or not version:
                return [f"{listing}: {line!r} is not pinned (name==version)"]
            pins[name.lower().replace("-", "_")] = version
    if not wheelhouse.is_dir():
        return []
    wheels = {p.name.split("-")[0].lower(): p.name.split("-")[1] for p in wheelhouse.glob("*.whl")}
    problems = [f"no wheel for {n}=={v} in {wheelhouse}" for n, v in pins.items() if wheels.get(n) != v]
    problems += [f"{wheelhouse}: {n} is not in {listing}" for n in wheels if n not in pins]
    size = sum(p.stat().st_size for p in wheelhouse.glob("*.whl"))
    if size > 20e6:
        problems.append(f"{wheelhouse}: {size / 1e6:.1f} MB of wheels, more than 20 MB")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check")
    ap.add_argument("--dry-run", action="store_true", help="on CPU with tiny sizes: the plumbing and the schema")
    ap.add_argument("--json", type=Path, help="also write the report here")
    ap.add_argument("--check-wheels", type=Path, help="check this wheel list (and --wheelhouse) and exit")
    ap.add_argument("--wheelhouse", type=Path, default=Path("wheelhouse"))
    args = ap.parse_args(argv)
    if args.check_wheels:
        problems = check_wheels(args.check_wheels, args.wheelhouse)
        print("\n".join(problems) or f"{args.check_wheels}: every wheel pinned"
              + (f" and present in {args.wheelhouse}" if args.wheelhouse.is_dir() else ""))
        return 1 if problems else 0
    report = run(args.dry_run)
    problems = schema_problems(report)
    if problems:
        report.setdefault("failed", {})["schema"] = "; ".join(problems)
    text = json.dumps(report, indent=1, sort_keys=True)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 1 if report.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
