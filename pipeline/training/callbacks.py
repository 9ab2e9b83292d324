"""Lightning callbacks and plugins the train stage needs: resumable checkpoints, a record of the
samples trained on, loggers, and the signal handling that lets a cluster launcher requeue a job."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, cast

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment

from ..config import WandbConfig
from ..console import Progress, log
from ..store import Stage, atomic_path, read_json, write_json


class SampleRecorder(Callback):
    """Saves which records each rank trained on in each epoch (`seen/rank<r>-epoch<e>.npz`: their
    sample ids and user ids, -1 for a clean record): a record of exactly which images went into
    the model, marked or not, and of how DDP split them between ranks."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.seen = folder, []

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.seen = []

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.seen.append((batch[2].cpu(), batch[3].cpu()))

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        samples, users = (
            torch.cat([batch[k] for batch in self.seen]).numpy() if self.seen else np.zeros(0, np.int64) for k in (0, 1)
        )
        with atomic_path(self.folder / f"rank{trainer.global_rank}-epoch{trainer.current_epoch}.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, sample=samples, user=users)


class EpochProgress(Callback):
    """Training progress on the console, from rank zero: a live bar on a terminal (moving every
    batch), and in a batch log one line per epoch at most every few seconds, e.g.
    `train-marked: epoch 12/60 (20%), loss 0.0213, acc 0.994, 0:41 elapsed, ETA 2:44`."""

    def __init__(self, label: str, resumes: Path | None = None) -> None:
        self.label, self.resumes = label, resumes
        self.progress: Progress | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log.info(  # every rank says who it is: a DDP job's log states its world size
            "%s: rank %d of world size %d (%d node(s) x %d device(s); local rank %d)",
            self.label,
            trainer.global_rank,
            trainer.world_size,
            trainer.num_nodes,
            trainer.num_devices,
            trainer.local_rank,
        )
        if trainer.is_global_zero:
            self.progress = Progress(self.label, trainer.max_epochs or 1, start=trainer.current_epoch, prefix="epoch ")

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if not trainer.is_global_zero:  # said when Lightning has restored it, not when we merely found the file
            return
        requeues = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        log.info(
            "%s: resumed from its last checkpoint at step %d, epoch %d%s",
            self.label,
            checkpoint["global_step"],
            checkpoint["epoch"],
            f" (SLURM requeue {requeues})" if requeues else "",
        )
        if self.resumes is not None:  # for `mtrack status` and the follower, which read no job logs
            earlier = read_json(self.resumes) if self.resumes.exists() else []
            entry = {"step": checkpoint["global_step"], "epoch": checkpoint["epoch"], "requeues": requeues}
            write_json(self.resumes, [*earlier, {**entry, "at": time.time()}])

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.progress is not None and self.progress.live and trainer.num_training_batches:
            self.progress.advance(1 / float(trainer.num_training_batches))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics  # on every rank: under DDP, computing them syncs the ranks
        if self.progress is not None:
            detail = ", ".join(
                f"{name} {float(metrics[key]):.4g}"
                for name, key in (("loss", "train_loss"), ("acc", "train_acc"))
                if key in metrics
            )
            self.progress.update(trainer.current_epoch + 1, detail)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.progress is not None:
            self.progress.close()


class ResumableCheckpoint(ModelCheckpoint):
    """`last.ckpt` every n training steps and again at every epoch's end. The step save is skipped at
    an epoch's last batch: it would precede the epoch's validation and epoch-end hooks, which a run
    resumed from it does not re-run, so a run killed there would forget that epoch's best-validation
    record and sample record."""

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if not trainer.is_last_batch:
            super().on_train_batch_end(trainer, *args, **kwargs)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After validation (the best checkpoint is taken when it ends) and after the other callbacks'
        # epoch-end hooks (Lightning runs checkpoint callbacks last); the write is atomic.
        trainer.save_checkpoint(
            Path(cast(str, self.dirpath)) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}", weights_only=False
        )


class KeepLauncherSigterm(Callback):
    """Put back a SIGTERM handler that the process's launcher installed before training.

    Lightning turns SIGTERM into an exception that ends `fit`. Under submitit, SLURM sends SIGTERM
    first when it preempts a job, then USR2, on which submitit requeues it: ending the run at the
    SIGTERM would leave the job finished with no result instead of requeued. A process started
    without such a handler (a local run) keeps Lightning's behaviour."""

    def __init__(self) -> None:
        self.handler = signal.getsignal(signal.SIGTERM)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if callable(self.handler):  # Lightning registers its own handlers just before this hook
            signal.signal(signal.SIGTERM, self.handler)


def cluster_plugins() -> list[Any]:
    """Inside a SLURM job, Lightning reads ranks and addresses from SLURM but must not requeue on
    its own: requeueing belongs to the launcher (submitit), which also owns the signal."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def make_loggers(stage: Stage, wandb: WandbConfig, name: str, group: str, config: dict[str, Any]) -> list[Any]:
    """CSV always; W&B when enabled, one run per stage folder with a fixed id so a resumed or
    requeued job continues the same run, carrying `config` (the stage's, see `stages.tracking`).
    Lightning's loggers write from rank zero only."""
    loggers: list[Any] = [CSVLogger(stage.dir, name="logs")]
    if wandb.enabled:
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(
            WandbLogger(
                project=wandb.project,
                name=name,
                group=group,
                config=config,
                job_type="train",
                id=stage.tracking_id,
                resume="allow",
                save_dir=str(stage.dir),
                offline=wandb.mode == "offline",
            )
        )
    return loggers
