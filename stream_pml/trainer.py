"""The training loop: a short ``train()`` over epochs and a ``train_step()`` per batch."""

from __future__ import annotations

import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from tqdm import tqdm

from shard_tools.manifest import ManifestError

from . import checkpoint as ckpt
from .data.batch import Batch, Normalizer, dense_labels
from .distributed import DistInfo, StopOnSignal, all_reduce_flags, all_reduce_min, barrier, gather_objects
from .labels import LabelTable, make_partial, read_split_labels
from .losses import LOSSES, get_loss
from .metrics import mean_average_precision_detail, threshold_metrics
from .pseudo_store import PseudoLabelStore
from .run_dir import StepLog, plot_map_curve, versions, write_csv, write_json

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

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"train.epochs must be >= 1, got {self.epochs}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"train.device: {self.device!r} is not one of auto, cpu, cuda")
        if self.resume not in ("auto", "never"):
            raise ValueError(f"train.resume: {self.resume!r} is not one of auto, never")
        if self.checkpoint_every < 0:
            raise ValueError(f"train.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.keep_checkpoints < 1 or self.eval_every < 1 or self.log_every < 1:
            raise ValueError("train.keep_checkpoints, train.eval_every and train.log_every must be >= 1")


class NonFiniteLoss(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: "Config", dist_info: DistInfo):
        from .data.loader import ShardLoader
        from .model import build_model
        from .optim import build_optimizer, build_scheduler

        self.cfg = cfg
        self.dist = dist_info
        self.device = dist_info.device
        self.run_dir = Path(cfg.train.run_dir)
        self.loader = ShardLoader(cfg.data, dist_info.rank, dist_info.world_size, cfg.train.seed)
        self.num_classes = self.loader.num_classes
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg.model, self.num_classes).to(self.device)
        self.channels_last = cfg.model.channels_last and self.device.type == "cuda"
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = self.raw_model = model
        self.normalize = Normalizer(self.channels_last)
        if cfg.train.compile:
            if self.device.type != "cuda" and dist_info.is_main:
                warnings.warn("train.compile on CPU compiles for a CPU step; it pays off on CUDA")
            self.model = torch.compile(model)
        if dist_info.world_size > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.use_amp = cfg.train.amp is not False and self.device.type == "cuda"
        if cfg.train.amp and not self.use_amp and dist_info.is_main:
            warnings.warn("train.amp has no effect on CPU (bf16 autocast is used on CUDA only)")
        self.labels = self._label_table()
        self.loss_fn = self._build_loss()
        self.store = self._open_store()
        params = [{"params": self.model.parameters()}]
        self.estimator = None
        if self.loss_fn.spec.uses_estimator:
            from .losses.role_estimator import LabelEstimator

            observed = self.labels.partial_NC.numpy() if self.labels is not None else read_split_labels(
                cfg.data.shards, cfg.data.train_split, self.num_classes)
            self.estimator = LabelEstimator(observed, seed=cfg.train.seed).to(self.device)
            params.append({"params": self.estimator.parameters()})
        self.optimizer = build_optimizer(params, cfg.optim)
        self.total_steps = sum(self.loader.num_batches(e) for e in range(1, cfg.train.epochs + 1))
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(np.random.SeedSequence([cfg.train.seed, dist_info.rank, 7])
                                       .generate_state(1)[0]))
        self.epoch = 0  # last completed epoch
        self.batch_in_epoch = 0  # batches of epoch + 1 already trained
        self.step = 0
        self.history: list[dict] = []
        self._resume_dali: str | None = None
        self._stream = None
        self._val_thresholds: list[float] | None = None

    def _label_table(self) -> LabelTable | None:
        """The label setting's table for the training split; None = the shards' labels as they are."""
        data = self.cfg.data
        if data.label_setting == "fal":
            return None
        if not self.loader.train_split.fully_labelled:
            raise ManifestError(f"{data.shards}: split {data.train_split} is not fully labelled; "
                                f"label_setting={data.label_setting} is made from full labels")
        full = read_split_labels(data.shards, data.train_split, self.num_classes)
        return LabelTable(make_partial(full, data.label_setting, data.label_ratio, data.label_seed))

    def _open_store(self) -> PseudoLabelStore:
        split = self.loader.train_split
        path = Path(self.cfg.pseudo.path) if self.cfg.pseudo.path else self.run_dir / "pseudo_labels.zarr"
        identity = {"manifest": self.loader.manifest.fingerprint(), "split": self.cfg.data.train_split,
                    "label_setting": self.labels.hash if self.labels is not None else "as built"}
        args = (path, split.num_samples, self.num_classes, self.loader.manifest.shard_size, identity,
                self.cfg.pseudo)
        if self.dist.is_main:  # one process creates it, the others open it
            path.parent.mkdir(parents=True, exist_ok=True)
            store = PseudoLabelStore(*args)
        barrier()
        return store if self.dist.is_main else PseudoLabelStore(*args, create=False)

    def _build_loss(self):
        params = dict(self.cfg.loss.params)
        spec = LOSSES[self.cfg.loss.name]
        if spec.uses_prior and params.get("expected_positives") is None:
            split = self.loader.train_split
            if not split.fully_labelled:
                raise ManifestError(f"loss {self.cfg.loss.name} needs loss.params.expected_positives: "
                                    f"split {self.cfg.data.train_split} is not fully labelled")
            # Full-label statistics of the training split, as EPR prescribes.
            params["expected_positives"] = split.num_positives / split.num_samples
        return get_loss(self.cfg.loss.name, **params)

    # -- state ---------------------------------------------------------------------------
    def _core(self) -> torch.nn.Module:
        """The plain model under any DDP / torch.compile wrapper (what checkpoints hold)."""
        return self.raw_model

    def state_dict(self) -> dict:
        """What every rank shares (saved once, by rank 0)."""
        return {
            "model": self._core().state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "estimator": self.estimator.state_dict() if self.estimator is not None else None,
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
            "history": self.history, "world_size": self.dist.world_size,
            "manifest": self.loader.manifest.fingerprint(), "arch": self.cfg.model.arch,
            "config": _config_dict(self.cfg), "classes": self.loader.manifest.classes,
        }

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("world_size", self.dist.world_size),
                          ("manifest", self.loader.manifest.fingerprint()), ("arch", self.cfg.model.arch)):
            if state[key] != mine:
                raise ValueError(f"cannot resume from {self.run_dir}: the checkpoint's {key} is "
                                 f"{state[key]!r}, this run's is {mine!r} (use a new train.run_dir)")
        if state["config"]["train"]["epochs"] != self.cfg.train.epochs:
            raise ValueError(f"cannot resume from {self.run_dir}: train.epochs was "
                             f"{state['config']['train']['epochs']}, now {self.cfg.train.epochs}; the "
                             "learning-rate schedule and d are built for the run's length (use a new "
                             "train.run_dir)")
        self._core().load_state_dict(state["model"])
        if self.estimator is not None:
            self.estimator.load_state_dict(state["estimator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.step, self.history = state["step"], state["history"]

    def rank_state_dict(self, stream=None) -> dict:
        """What differs per rank: data position (DALI's checkpoint) and random states."""
        return {
            "dali": stream.checkpoint() if stream is not None and self.batch_in_epoch else None,
            "generator": self.generator.get_state(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None},
        }

    def load_rank_state_dict(self, state: dict) -> None:
        self._resume_dali = state["dali"]
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"])

    def maybe_resume(self) -> Path | None:
        """Continue from the newest loadable checkpoint and bring the store to its state."""
        rank = self.dist.rank
        ckpts = ckpt.list_checkpoints(self.run_dir)
        mine, loaded = ckpt.load_newest(self.run_dir, rank) if self.cfg.train.resume == "auto" else (-1, None)
        index = int(all_reduce_min(mine))  # every rank resumes from the same checkpoint
        # Journals of checkpoints newer than the one resumed may have reached the store.
        for newer in reversed(ckpts[index + 1:]):
            self.store.rollback_journal(newer, rank)
        for older in ckpts[: index + 1]:
            self.store.apply_journal(older, rank)
        barrier()
        if index < 0:
            return None
        # The states loaded while looking are reused unless another rank chose an older one.
        main_state, rank_state = loaded if index == mine else ckpt.load(ckpts[index], rank)
        self.load_state_dict(main_state)
        self.load_rank_state_dict(rank_state)
        return ckpts[index]

    def save_checkpoint(self, stream=None) -> Path:
        """Atomic checkpoint of every rank, then the pseudo-label journal goes to Zarr."""
        rank, main = self.dist.rank, self.dist.is_main
        # The previous checkpoint's journal must be in the store before it may be pruned.
        self.store.flush()
        tmp = ckpt.tmp_dir(self.run_dir, self.epoch, self.step)
        if main:
            ckpt.prepare(self.run_dir, self.epoch, self.step)
        barrier()
        self.store.save_journal(tmp, rank)
        ckpt.save_file(tmp / ckpt.RANK_FILE.format(rank=rank), self.rank_state_dict(stream))
        if main:
            ckpt.save_file(tmp / ckpt.MAIN_FILE, self.state_dict())
        barrier()
        final = tmp.with_name(tmp.name[: -len(".tmp")])
        if main:
            ckpt.publish(tmp)
        barrier()
        self.store.apply_journal_async(final, rank)
        if main:
            ckpt.prune(self.run_dir, self.cfg.train.keep_checkpoints)
        return final

    # -- loop ------------------------------------------------------------------------------
    def train(self) -> dict:
        main = self.dist.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(_config_yaml(self.cfg))
            write_json(self.run_dir / "run_info.json", {
                "seed": self.cfg.train.seed, "world_size": self.dist.world_size,
                "device": str(self.device), "amp": self.use_amp, "versions": versions(),
                "manifest_fingerprint": self.loader.manifest.fingerprint(),
                "label_setting": self.cfg.data.label_setting,
                "label_setting_hash": self.labels.hash if self.labels is not None else "as built",
                "loss": repr(self.loss_fn), "pseudo_store": str(self.store.path)})
        step_log = StepLog(self.run_dir) if main else None
        val = self.cfg.data.val_split
        try:
            with StopOnSignal() as signals:
                for epoch in range(self.epoch + 1, self.cfg.train.epochs + 1):
                    if not self.train_epoch(epoch, step_log, signals):
                        return {"stopped": True, "step": self.step}
                    self.epoch, self.batch_in_epoch = epoch, 0
                    if val and (epoch % self.cfg.train.eval_every == 0 or epoch == self.cfg.train.epochs):
                        self._validate(epoch, step_log)
                    self.save_checkpoint()
            self.store.flush()
            return self._finish(step_log)
        finally:
            if step_log is not None:
                step_log.close()

    def _validate(self, epoch: int, step_log: "StepLog | None") -> None:
        result = {"epoch": epoch, "step": self.step, **self.evaluate(self.cfg.data.val_split)}
        self.history.append(result)
        best = max(self.history, key=lambda r: r["map"])
        if self.dist.is_main:
            write_csv(self.run_dir / "metrics.csv", self.history)
            step_log.epoch(result)
            if best is result:  # the selected model: by validation mAP only
                ckpt.save_file(self.run_dir / "best.pt.tmp", {
                    "model": self._core().state_dict(), "epoch": epoch, "val_map": result["map"],
                    "config": _config_dict(self.cfg), "classes": self.loader.manifest.classes,
                    "thresholds": self._val_thresholds})
                (self.run_dir / "best.pt.tmp").replace(self.run_dir / "best.pt")
            print(f"epoch {epoch}: val mAP {100 * result['map']:.2f}% (best {100 * best['map']:.2f}% "
                  f"at epoch {best['epoch']})", flush=True)

    def _finish(self, step_log: "StepLog | None") -> dict:
        """Test once with the model chosen on validation (or the last one without validation)."""
        selected = {"epoch": self.epoch, "by": "last epoch (no validation split)"}
        if self.cfg.data.val_split and (self.run_dir / "best.pt").exists():
            best = torch.load(self.run_dir / "best.pt", map_location=self.device, weights_only=False)
            self._core().load_state_dict(best["model"])
            selected = {"epoch": best["epoch"], "by": f"best {self.cfg.data.val_split} mAP",
                        "val_map": best["val_map"]}
        test = self.evaluate(self.cfg.data.test_split) if self.cfg.data.test_split else {}
        final = {"selected": selected, "test": test, "history": self.history}
        if self.dist.is_main:
            write_json(self.run_dir / "metrics.json", final)
            if self.history:
                plot_map_curve(self.run_dir / "metrics.csv", self.run_dir / "map_curve.png")
            if test and step_log is not None:
                step_log.test(test, self.step)
        return final

    def train_epoch(self, epoch: int, step_log: "StepLog | None", signals: "StopOnSignal") -> bool:
        """Train the rest of ``epoch``; False when a signal stopped it (after a checkpoint)."""
        self.model.train()
        num_batches = self.loader.num_batches(epoch)
        self.store.set_owned_chunks(self.loader.owned_train_shards(epoch))
        stream = self.loader.train_stream(epoch, checkpoint=self._resume_dali,
                                          max_batches=num_batches - self.batch_in_epoch)
        self._resume_dali = None
        self._stream = stream
        batches = iter(stream)
        bar = tqdm(total=num_batches, initial=self.batch_in_epoch, desc=f"epoch {epoch}/{self.cfg.train.epochs}",
                   unit="batch", disable=not self.dist.is_main, dynamic_ncols=True, mininterval=2.0)
        wait_s, t_last, images_seen = 0.0, time.perf_counter(), 0
        every = self.cfg.train.checkpoint_every
        limit = self.cfg.pseudo.max_pending_mb * 2**20
        for i in range(self.batch_in_epoch, num_batches):
            t0 = time.perf_counter()
            batch = next(batches).to(self.device)
            wait_s += time.perf_counter() - t0
            stats = self.train_step(batch, epoch)
            self.batch_in_epoch = i + 1
            bar.update(1)
            images_seen += batch.size
            if step_log is not None and (self.step % self.cfg.train.log_every == 0 or i == num_batches - 1):
                now = time.perf_counter()
                elapsed = max(now - t_last, 1e-9)
                step_log.step({"epoch": epoch, "step": self.step, **stats,
                               "lr": self.scheduler.get_last_lr()[0],
                               "images_per_s": images_seen * self.dist.world_size / elapsed,
                               "data_wait_share": wait_s / elapsed})
                bar.set_postfix(loss=f"{stats['loss']:.4f}")
                wait_s, t_last, images_seen = 0.0, now, 0
            stop, full = all_reduce_flags(signals.received, self.store.pending_bytes > limit)
            if stop or full or (every and self.step % every == 0 and i + 1 < num_batches):
                self.save_checkpoint(stream)
            if stop:
                bar.close()
                if self.dist.is_main:
                    print(f"stopped by a signal at step {self.step}; resume with the same command",
                          flush=True)
                return False
        bar.close()
        return True

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
                path = self.save_checkpoint(self._stream)
                raise NonFiniteLoss(f"{where}; the last good state is saved in {path}")
            found = ckpt.list_checkpoints(self.run_dir)
            raise NonFiniteLoss(f"{where}; the weights are already non-finite, so nothing was saved; "
                                f"newest checkpoint: {found[-1] if found else 'none'}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        if self.loss_fn.uses_pseudo:
            self.store.write(batch.rows_B, torch.sigmoid(logits_BC.detach().float()), pseudo_BC)
        return {"loss": float(loss.detach()), **stats}

    @torch.no_grad()
    def evaluate(self, split: str) -> dict:
        """Metrics of ``split``; on the validation split also the per-class thresholds of
        best F1, which ``predict --threshold calibrated`` uses."""
        self.model.eval()
        rows, scores, targets, known = [], [], [], []
        for batch in self.loader.eval_batches(split):
            batch = batch.to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
                logits = self._core()(self.normalize(batch.images_BCHW))
            t, k = dense_labels(batch.pos_BP, batch.neg_BN, self.num_classes)
            rows.append(batch.rows_B.cpu().numpy())
            scores.append(torch.sigmoid(logits.float()).cpu().numpy())
            targets.append(t.cpu().numpy().astype(np.int8))
            known.append(k.cpu().numpy())
        self.model.train()
        parts = gather_objects((rows, scores, targets, known))
        cat = [np.concatenate([a for p in parts for a in p[j]]) for j in range(4)]
        rows_N, scores_NC, targets_NC, known_NC = cat
        # pad_last_batch may repeat a sample at a shard list's end; keep each row once.
        _, first = np.unique(rows_N, return_index=True)
        scores_NC, targets_NC, known_NC = scores_NC[first], targets_NC[first], known_NC[first]
        detail = mean_average_precision_detail(scores_NC, targets_NC, known_NC)
        if split == self.cfg.data.val_split:
            from .inference import calibrate_thresholds

            self._val_thresholds = calibrate_thresholds(scores_NC, targets_NC, known_NC).tolist()
        return {"map": detail.map, "chance_map": detail.chance_map, "num_eval": int(len(first)),
                "skipped_classes": detail.num_skipped,
                **threshold_metrics(scores_NC, targets_NC, known_NC)}


def _config_dict(cfg: "Config") -> dict:
    from .config import to_dict  # config.py imports this module's TrainConfig

    return to_dict(cfg)


def _config_yaml(cfg: "Config") -> str:
    from .config import to_yaml

    return to_yaml(cfg)
