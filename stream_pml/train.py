"""Entry point: ``torchrun -m stream_pml.train --config configs/X.yaml [key=value ...]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, load_config, to_yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stream_pml.train", description=__doc__,
        epilog="config sections: data, model, loss, optim, pseudo, train; every key with its default and "
               "meaning is in docs/training.md#configuration (and each run's config.yaml holds them all, resolved)")
    parser.add_argument("--config", help="YAML run file (only what differs from the defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (defaults < run file < overrides), checked, and exit "
                             "without training")
    args = parser.parse_args(argv)
    if args.config is None and not args.overrides:
        # The defaults alone are ResNet-50 at 448 px for 20 epochs: never by accident.
        parser.print_usage(sys.stderr)
        print("python -m stream_pml.train: error: give a run file (--config configs/demo.yaml) or "
              "overrides; the defaults alone are not a run", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0

    from shard_tools.manifest import ManifestError

    from .checkpoint import ResumeError
    from shard_tools.remote import RemoteError

    from .data.torch_stream import BadSamples
    from .losses.role_estimator import EstimatorTooLarge
    from .model import WeightsError
    from .pseudo_store import StoreError
    from .distributed import all_reduce_flags, setup, teardown
    from .run_dir import lock as lock_run_dir
    from .run_dir import unlock as unlock_run_dir
    from .threads import apply_plan as apply_thread_plan
    from .trainer import NonFiniteLoss, Trainer

    if cfg.train.deterministic:  # before any CUDA work
        from .states import use_deterministic_kernels

        use_deterministic_kernels()
    dist_info = setup(cfg.train.device)
    apply_thread_plan()
    try:
        # One run per directory: rank 0 holds the lock, every rank stops together.
        busy = lock_run_dir(Path(cfg.train.run_dir)) if dist_info.is_main else None
        if all_reduce_flags(busy is not None)[0]:
            if busy:
                print(f"run error: {busy}", file=sys.stderr)
            return 2
        try:
            trainer = Trainer(cfg, dist_info)
        except (ManifestError, StoreError, WeightsError, EstimatorTooLarge) as exc:
            kind = ("data" if isinstance(exc, ManifestError) else "store" if isinstance(exc, StoreError)
                    else "loss" if isinstance(exc, EstimatorTooLarge) else "model")
            print(f"{kind} error: {exc}", file=sys.stderr)
            return 2
        try:
            resumed = trainer.maybe_resume()
        except (ResumeError, StoreError) as exc:
            print(f"{'resume' if isinstance(exc, ResumeError) else 'store'} error: {exc}", file=sys.stderr)
            return 2
        if dist_info.is_main:
            loader = trainer.loader
            print(f"device {dist_info.device}, world size {dist_info.world_size}, loader {loader.backend} "
                  f"({loader.backend_reason}), run dir "
                  f"{cfg.train.run_dir}" + (f", resumed from {resumed}" if resumed else ""), flush=True)
        try:
            final = trainer.train()
        except NonFiniteLoss as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 3
        except (BadSamples, StoreError, RemoteError) as exc:  # the newest checkpoint stays; resume after a fix
            print(f"data error: {exc}", file=sys.stderr)
            return 2
        if final.get("stopped"):
            return 128 + 15  # like a process ended by SIGTERM: not finished, resumable
        if dist_info.is_main:
            test, sel = final.get("test"), final["selected"]
            if test:
                print(f"test mAP {100 * test['map']:.2f}% on {test['num_eval']} images (chance level "
                      f"{100 * test['chance_map']:.2f}%), model of epoch {sel['epoch']} ({sel['by']})",
                      flush=True)
            print(f"run directory: {cfg.train.run_dir}", flush=True)
        return 0
    finally:
        if dist_info.is_main:
            unlock_run_dir(Path(cfg.train.run_dir))
        teardown()


if __name__ == "__main__":
    sys.exit(main())
