"""The training loop: a short ``train()`` over epochs and a ``train_step()`` per batch.

Checkpoints, resume and the epoch hand-over between ranks belong to
:class:`~stream_pml.coordinator.Coordinator`; the trainer registers its states there once.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from tqdm import tqdm

from shard_tools.remote import RemoteError

from . import checkpoint as ckpt
from . import components
from .class_table import ClassCounts, table_tag, write_class_table
from .coordinator import Coordinator
from .data.batch import Batch, Normalizer, dense_labels
from .data.loader import default_threads
from .distributed import DistInfo, StopOnSignal, all_reduce_flags
from .elastic import EpochPlan, TrainedRows, after_resume
from .evaluation import evaluate
from .ema import WeightAverage
from .model import settle_ddp_buckets
from .run_dir import StepLog, plot_map_curve, write_csv, write_json
from .run_dir import start as start_run_dir
from .states import RandomStates, RunIdentity, StreamPosition

if TYPE_CHECKING:
    from .config import Config  # noqa: F401


@dataclass
class TrainConfig:
    epochs: int = 20
    seed: int = 0
    run_dir: str = "runs/default"
    device: str = "auto"  # auto | cpu | cuda
    amp: Optional[bool] = None  # bf16 autocast; None = on with CUDA, off on CPU
    log_every: int = 20
    keep_checkpoints: int = 3
    resume: str = "auto"  # auto: continue from the newest checkpoint in run_dir; never
    eval_every: int = 1
    # torch.compile the model (CUDA; a start-up cost for a faster step).
    compile: bool = False
    # Checkpoint every N steps as well as at each epoch end; 0 = epoch ends only.
    checkpoint_every: int = 0
    # Checkpoint when this many minutes of wall time passed since the last one (rank 0's
    # clock decides for all); 0 = off.
    checkpoint_minutes: float = 0.0
    # Deterministic CUDA kernels (slower), so a resumed GPU run ends bitwise equal to an
    # uninterrupted one; CPU kernels already are.
    deterministic: bool = False
    # Evaluate, select and save an exponential moving average of the weights (ema.py) with
    # this decay per step (e.g. 0.998: an average over the last ~500 steps); 0 = off.
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"train.epochs must be >= 1, got {self.epochs}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"train.device: {self.device!r} is not one of auto, cpu, cuda")
        if self.resume not in ("auto", "never"):
            raise ValueError(f"train.resume: {self.resume!r} is not one of auto, never")
        if self.checkpoint_every < 0 or self.checkpoint_minutes < 0:
            raise ValueError(f"train.checkpoint_every and train.checkpoint_minutes must be >= 0, got "
                             f"{self.checkpoint_every} and {self.checkpoint_minutes}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        if self.keep_checkpoints < 1 or self.eval_every < 1 or self.log_every < 1:
            raise ValueError("train.keep_checkpoints, train.eval_every and train.log_every must be >= 1")


class NonFiniteLoss(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: "Config", dist_info: DistInfo):
        from .config import to_dict, to_yaml  # config.py imports this module's TrainConfig
        from .data.loader import ShardLoader
        from .model import build_model, place_model
        from .optim import build_optimizer, build_scheduler

        self.cfg, self.dist, self.device = cfg, dist_info, dist_info.device
        self.run_dir = Path(cfg.train.run_dir)
        self.config_dict, self.config_yaml = to_dict(cfg), to_yaml(cfg)
        self.loader = ShardLoader(cfg.data, dist_info.rank, dist_info.world_size, cfg.train.seed)
        self.num_classes = self.loader.num_classes
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        channels_last = cfg.model.channels_last and self.device.type == "cuda"  # cuDNN gains, CPU not
        self.raw_model, self.model = place_model(  # raw_model: what checkpoints hold
            build_model(cfg.model, self.num_classes), self.device, channels_last=channels_last,
            compile_model=cfg.train.compile, ddp=dist_info.grouped, warn=dist_info.is_main)
        self.ema = WeightAverage(self.raw_model, cfg.train.ema_decay) if cfg.train.ema_decay else None
        # What is evaluated, selected on validation and saved as best.pt.
        self.eval_model = self.ema.module if self.ema is not None else self.raw_model
        self.normalize = Normalizer(channels_last)
        self.use_amp = cfg.train.amp is not False and self.device.type == "cuda"
        if cfg.train.amp and not self.use_amp and dist_info.is_main:
            warnings.warn("train.amp has no effect on CPU (bf16 autocast is used on CUDA only)")
        self.labels = components.label_table(cfg, self.loader)
        self.loss_fn = components.build_loss(cfg, self.loader)
        self.store = components.open_store(cfg, self.loader, self.labels, dist_info)
        params = [{"params": self.model.parameters()}]
        self.estimator = None
        if self.loss_fn.spec.uses_estimator:
            self.estimator = components.build_estimator(cfg, self.loader, self.labels, self.device)
            params.append({"params": self.estimator.parameters()})
        self.optimizer = build_optimizer(params, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim)  # by progress, not steps
        self.plan, self.trained = EpochPlan(self.loader), TrainedRows()
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(np.random.SeedSequence([cfg.train.seed, dist_info.rank, 7])
                                       .generate_state(1)[0]))
        self.epoch = 0  # last completed epoch
        self.batch_in_epoch = 0  # batches of epoch + 1 already trained
        self.step = 0
        self.history: list[dict] = []
        self._resume_stream: str | None = None
        self._resume_record: dict | None = None
        self._stream = None
        self._val_thresholds: list[float] | None = None
        self._last_checkpoint_s = time.monotonic()
        self.coordinator = Coordinator(self.run_dir, dist_info, self.store, cfg.train.keep_checkpoints)
        self.identity = RunIdentity(self.config_dict, dist_info.world_size, self.loader.manifest.fingerprint(),
                                    self.loader.manifest.classes)
        shared = {"run": self.identity, "model": self.raw_model, "optimizer": self.optimizer,
                  "scheduler": self.scheduler, "estimator": self.estimator, "progress": self, "plan": self.plan,
                  "ema": self.ema}
        for key, obj in shared.items():
            if obj is not None:
                self.coordinator.register(key, obj)
        self.coordinator.register("stream", StreamPosition(self._stream_checkpoint, self._set_resume_stream),
                                  per_rank=True)
        reseed = lambda: int(np.random.SeedSequence([cfg.train.seed, dist_info.rank, 7, self.step])  # noqa: E731
                             .generate_state(1)[0])
        self.coordinator.register("rng", RandomStates(self.generator, self.device, reseed), per_rank=True)
        self.coordinator.register("trained", self.trained, per_rank=True)

    # -- state: the run's progress (the rest is registered with the coordinator) -----------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
                "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        if state["epoch"] > self.cfg.train.epochs:
            raise ckpt.ResumeError(f"cannot resume {self.run_dir}: it trained {state['epoch']} epochs, more "
                                   f"than train.epochs={self.cfg.train.epochs}")
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.step, self.history = state["step"], state["history"]

    def _stream_checkpoint(self) -> str | None:
        """The loader's own checkpoint mid-epoch; None at an epoch boundary."""
        return self._stream.checkpoint() if self._stream is not None and self.batch_in_epoch else None

    def _set_resume_stream(self, checkpoint: str | None) -> None:
        self._resume_stream = checkpoint

    def maybe_resume(self) -> Path | None:
        resumed = self.coordinator.resume(enabled=self.cfg.train.resume == "auto")
        if resumed is not None:
            self._resume_record = after_resume(self, resumed)
        return resumed

    def _progress(self) -> float:
        return self.plan.progress(self.epoch + 1, self.batch_in_epoch, self.cfg.train.epochs)

    def save_checkpoint(self) -> Path:
        path = self.coordinator.save(self.epoch, self.step)
        self._last_checkpoint_s = time.monotonic()  # the interval runs between saves, not starts
        return path

    def _checkpoint_due(self) -> bool:
        """Rank 0's clock, so that every rank agrees after the step's flag all-reduce."""
        minutes = self.cfg.train.checkpoint_minutes
        return bool(minutes) and self.dist.is_main and time.monotonic() - self._last_checkpoint_s >= 60 * minutes

    # -- loop ------------------------------------------------------------------------------
    def train(self) -> dict:
        main = self.dist.is_main
        self.scheduler.set_progress(self._progress())  # also after a resume that extended the run
        if main:
            start_run_dir(self.run_dir, self.config_yaml, {
                "seed": self.cfg.train.seed, "world_size": self.dist.world_size,
                "device": str(self.device), "amp": self.use_amp, "compute_threads": torch.get_num_threads(),
                "loader": {"backend": self.loader.backend, "why": self.loader.backend_reason,
                           "dali_source": self.cfg.data.dali_source},
                "omp_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
                "decode_threads": default_threads(self.cfg.data),
                "deterministic": self.cfg.train.deterministic,
                "manifest_fingerprint": self.loader.manifest.fingerprint(),
                "label_setting": self.cfg.data.label_setting,
                "label_setting_hash": self.labels.hash if self.labels is not None else "as built",
                "loss": repr(self.loss_fn), "pseudo_store": str(self.store.path)}, self._resume_record)
        step_log = StepLog(self.run_dir, self.step if self._resume_record else None) if main else None
        val, size = self.cfg.data.val_split, self.cfg.data.image_size
        settle_ddp_buckets(self.model, self.raw_model, self.normalize(torch.zeros(
            self.cfg.data.batch_size, 3, size, size, dtype=torch.uint8, device=self.device)), self.use_amp)
        try:
            with StopOnSignal() as signals:
                for epoch in range(self.epoch + 1, self.cfg.train.epochs + 1):
                    if not self.train_epoch(epoch, step_log, signals):
                        return {"stopped": True, "step": self.step}
                    self.epoch, self.batch_in_epoch = epoch, 0
                    self.plan.epoch_done(epoch)
                    if val and (epoch % self.cfg.train.eval_every == 0 or epoch == self.cfg.train.epochs):
                        self._validate(epoch, step_log)
                    self.save_checkpoint()
            self.store.flush()
            return self._finish(step_log)
        finally:
            if step_log is not None:
                step_log.close()

    def evaluate(self, split: str, per_class: bool = False) -> dict:
        result, thresholds = evaluate(
            self.eval_model, self.loader.eval_batches(split), num_classes=self.num_classes,
            device=self.device, normalize=self.normalize, use_amp=self.use_amp,
            calibrate=split == self.cfg.data.val_split, per_class=per_class)
        if thresholds is not None:
            self._val_thresholds = thresholds
        return result

    def _validate(self, epoch: int, step_log: "StepLog | None") -> None:
        result = {"epoch": epoch, "step": self.step, **self.evaluate(self.cfg.data.val_split)}
        self.history.append(result)
        best = max(self.history, key=lambda r: r["map"])
        if self.dist.is_main:
            write_csv(self.run_dir / "metrics.csv", self.history)
            step_log.epoch(result)
            if best is result:  # the selected model: by validation mAP only
                ckpt.save_best(self.run_dir, {
                    "model": self.eval_model.state_dict(), "epoch": epoch, "val_map": result["map"],
                    "config": self.config_dict, "classes": self.loader.manifest.classes,
                    "class_ids": self.loader.manifest.class_ids, "thresholds": self._val_thresholds})
            print(f"epoch {epoch}: val mAP {100 * result['map']:.2f}% (best {100 * best['map']:.2f}% "
                  f"at epoch {best['epoch']})", flush=True)

    def _finish(self, step_log: "StepLog | None") -> dict:
        """Test once with the model chosen on validation (or the last one without validation)."""
        selected = {"epoch": self.epoch, "by": "last epoch (no validation split)"}
        if self.cfg.data.val_split and (self.run_dir / "best.pt").exists():
            best = torch.load(self.run_dir / "best.pt", map_location=self.device, weights_only=False)
            self.eval_model.load_state_dict(best["model"])
            selected = {"epoch": best["epoch"], "by": f"best {self.cfg.data.val_split} mAP",
                        "val_map": best["val_map"]}
        split = self.cfg.data.test_split
        test = self.evaluate(split, per_class=True) if split else {}
        per_class = test.pop("per_class", None)
        final = {"selected": selected, "test": test, "history": self.history}
        if self.dist.is_main:
            write_json(self.run_dir / "metrics.json", final)
            if per_class is not None:  # the table stream-pml evaluate writes, beside the run
                m = self.loader.manifest
                write_class_table(self.run_dir / "evaluation", table_tag(m.dataset, m.fingerprint(), split),
                                  f"{split}: model of epoch {selected['epoch']} ({selected['by']})",
                                  ClassCounts.from_dict(per_class), m.class_ids, m.classes, test)
            if self.history:
                plot_map_curve(self.run_dir / "metrics.csv", self.run_dir / "map_curve.png")
            if test and step_log is not None:
                step_log.test(test, self.step)
        return final

    def train_epoch(self, epoch: int, step_log: "StepLog | None", signals: "StopOnSignal") -> bool:
        """Train the rest of ``epoch``; False when a signal stopped it (after a checkpoint)."""
        self.model.train()
        deal = self.plan.deal(epoch)
        self.coordinator.hand_over(deal.pieces[self.dist.rank].tolist())
        num_batches = deal.num_batches
        if self.batch_in_epoch == 0:
            self.trained.clear()
        self._stream = self.loader.train_stream(epoch, checkpoint=self._resume_stream, deal=deal,
                                                max_batches=num_batches - self.batch_in_epoch,
                                                generation=self.plan.generation(epoch))
        self._resume_stream = None
        batches = iter(self._stream)
        bar = tqdm(total=num_batches, initial=self.batch_in_epoch, desc=f"epoch {epoch}/{self.cfg.train.epochs}",
                   unit="batch", disable=not self.dist.is_main, dynamic_ncols=True, mininterval=2.0)
        wait_s, t_last, images_seen = 0.0, time.perf_counter(), 0
        every = self.cfg.train.checkpoint_every
        limit = self.cfg.pseudo.max_pending_mb * 2**20
        try:
            for i in range(self.batch_in_epoch, num_batches):
                t0 = time.perf_counter()
                batch = self._next_batch(batches)
                wait_s += time.perf_counter() - t0
                stats = self.train_step(batch, epoch)
                self.batch_in_epoch = i + 1
                self.trained.add(batch.rows_B)
                self.scheduler.set_progress(self._progress())
                bar.update(1)
                images_seen += batch.size
                if step_log is not None and (self.step % self.cfg.train.log_every == 0 or i == num_batches - 1):
                    now = time.perf_counter()
                    elapsed = max(now - t_last, 1e-9)
                    step_log.step({"epoch": epoch, "step": self.step, "world_size": self.dist.world_size, **stats,
                                   "lr": self.scheduler.get_last_lr()[0],
                                   "images_per_s": images_seen * self.dist.world_size / elapsed,
                                   "data_wait_share": wait_s / elapsed})
                    bar.set_postfix(loss=f"{stats['loss']:.4f}")
                    wait_s, t_last, images_seen = 0.0, now, 0
                stop, full, due = all_reduce_flags(signals.received, self.store.pending_bytes > limit,
                                                   self._checkpoint_due())
                if stop or full or (due and i + 1 < num_batches) or (
                        every and self.step % every == 0 and i + 1 < num_batches):
                    self.save_checkpoint()
                if stop:
                    if self.dist.is_main:
                        print(f"stopped by a signal at step {self.step}; resume with the same command",
                              flush=True)
                    return False
        finally:  # an error's line must come after the bar, not before it
            bar.close()
        return True

    def _give_back_batch(self) -> None:
        """The batch taken last is not trained: the stream position saved next must not count
        it (the torch backend's position is the number of batches handed out; DALI's pipeline
        position cannot be moved back, so there a resume skips that batch)."""
        if hasattr(self._stream, "handed_out"):
            self._stream.handed_out -= 1

    def _next_batch(self, batches) -> Batch:
        """The next batch; with remote shards every rank first learns whether any rank could
        not fetch a shard, and then all stop together after a checkpoint (exact: a batch
        taken but not trained is given back to the stream)."""
        cache = self.loader.cache
        if cache is None:
            return next(batches).to(self.device)
        try:
            batch, error = next(batches), cache.failed
        except RemoteError as exc:
            batch, error = None, exc
        (failed,) = all_reduce_flags(error is not None)
        if not failed:
            return batch.to(self.device)
        if batch is not None:
            self._give_back_batch()
        self.save_checkpoint()
        raise RemoteError(str(error) if error is not None else "another rank could not fetch a shard (see its "
                          "line); the newest checkpoint is intact, resume when the storage is back")

    def train_step(self, batch: Batch, epoch: int) -> dict:
        if self.labels is None:
            pos_BP, neg_BN = batch.pos_BP, batch.neg_BN
        else:
            pos_BP, neg_BN = self.labels.ids(batch.rows_B, self.device)
        images = self.normalize(batch.images_BCHW)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            logits_BC = self.model(images)
        pseudo_BC = self.store.read(batch.rows_B).to(self.device) if self.loss_fn.uses_pseudo else None
        stats: dict = {}
        extra = dict(pseudo=pseudo_BC, epoch=epoch, num_epochs=self.cfg.train.epochs,
                     generator=self.generator, stats=stats)
        if self.estimator is not None:
            extra["estimates_BC"] = self.estimator(batch.rows_B)
        if self.loss_fn.has_sparse:
            loss = self.loss_fn.sparse(logits_BC, pos_BP, neg_BN, **extra)
        else:
            targets_BC, known_BC = dense_labels(pos_BP, neg_BN, self.num_classes)
            loss = self.loss_fn(logits_BC, targets_BC, known_BC, **extra)
        (bad,) = all_reduce_flags(not torch.isfinite(loss).item())
        if bad:  # every rank stops together, before this step changes anything
            where = f"non-finite loss at epoch {epoch}, step {self.step + 1} (loss {loss.item()} on this rank)"
            if all(torch.isfinite(p).all() for p in self.model.parameters()):
                self._give_back_batch()
                raise NonFiniteLoss(f"{where}; the last good state is saved in {self.save_checkpoint()}")
            found = ckpt.list_checkpoints(self.run_dir)
            raise NonFiniteLoss(f"{where}; the weights are already non-finite, so nothing was saved; "
                                f"newest checkpoint: {found[-1] if found else 'none'}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.estimator is not None:
            self.estimator.average_grad_over_ranks(batch.rows_B)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.raw_model)
        self.step += 1
        if self.loss_fn.uses_pseudo:
            self.store.write(batch.rows_B, torch.sigmoid(logits_BC.detach().float()), pseudo_BC)
        return {"loss": float(loss.detach()), **stats}

