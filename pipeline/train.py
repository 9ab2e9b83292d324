"""Stage `train`: a Lightning classifier on FFCV data, for one arm (`marked` or `control`).

The trainer knows nothing of its launcher: accelerator, precision and DDP come from the config
and the environment (Lightning detects SLURM and torchrun), and the stage always resumes from
its own last checkpoint, so a killed or requeued run continues where it stopped (the stage folder
is claimed for one config, so only the same config resumes them; --force starts afresh).
"""
from __future__ import annotations

import logging
import math
import signal
from pathlib import Path
from typing import Any, Callable, cast

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.loggers import CSVLogger

from .betons import BetonLoader, make_loader
from .config import TrainConfig, WandbConfig
from .defenses import MagnitudePruning, batch_transforms, dp_epsilon, make_private, select_inliers, sparsity
from .models import Normalized, build_model, dp_compatible, load_pretrained, read_checkpoint, save_weights
from .store import Stage, StageError, atomic_path, write_json
from .torchdata import TorchBetonLoader, make_torch_loader

log = logging.getLogger("pipeline")
ARM_TRAIN_SET = {"marked": "train_marked.beton", "control": "train_clean.beton"}
LOADERS: dict[str, Callable[..., BetonLoader | TorchBetonLoader]] = {"ffcv": make_loader, "torch": make_torch_loader}


def eval_resolution(cfg: TrainConfig) -> int | None:
    return cfg.eval_resolution or cfg.resolution


class BetonData(L.LightningDataModule):
    """Train/validation loaders built inside the hooks, so each DDP rank gets its own shard."""

    def __init__(self, train_path: Path, val_path: Path, cfg: TrainConfig, seed: int,
                 indices: np.ndarray | None = None) -> None:
        super().__init__()
        self.train_path, self.val_path, self.cfg, self.seed, self.indices = train_path, val_path, cfg, seed, indices
        self.train_loader: BetonLoader | TorchBetonLoader | None = None
        self.resume_position: dict[str, int] | None = None

    def _distributed(self) -> bool:
        return self.trainer is not None and self.trainer.world_size > 1

    def train_dataloader(self) -> BetonLoader | TorchBetonLoader:
        c = self.cfg
        self.train_loader = LOADERS[c.loader](
            self.train_path, c.batch_size, c.num_workers, train=True, augment=c.augment,
            translate_pixels=c.translate_pixels, seed=self.seed, distributed=self._distributed(), torch_threads=c.threads,
            resolution=c.resolution, indices=self.indices,
        )
        if self.resume_position is not None:
            self.train_loader.load_state_dict(self.resume_position)
        return self.train_loader

    def state_dict(self) -> dict[str, int]:
        """The training loader's place in its epoch, saved in every checkpoint. Restored through the
        data module because Lightning's own loader restore is skipped when the loader was built
        before the restore (as `estimated_stepping_batches` does for the LR schedule)."""
        return self.train_loader.state_dict() if self.train_loader is not None else {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_position = state or None

    def val_dataloader(self) -> BetonLoader | TorchBetonLoader:
        return LOADERS[self.cfg.loader](self.val_path, 512, self.cfg.num_workers, train=False,
                                        distributed=self._distributed(), torch_threads=self.cfg.threads,
                                        resolution=eval_resolution(self.cfg))


class SampleRecorder(Callback):
    """Saves the sample ids each rank trained on in each epoch (`seen/rank<r>-epoch<e>.npy`): a record
    of exactly which images went into the model, and of how DDP split them between ranks."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.seen = folder, []

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.seen = []

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.seen.append(batch[2].cpu())

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        ids = torch.cat(self.seen).numpy() if self.seen else np.zeros(0, np.int64)
        with atomic_path(self.folder / f"rank{trainer.global_rank}-epoch{trainer.current_epoch}.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, ids)


# Optimizers by `train.optimizer`, given parameter groups (weight decay off norms and biases).
OPTIMIZERS: dict[str, Callable[[list[dict[str, Any]], TrainConfig], torch.optim.Optimizer]] = {
    "sgd": lambda groups, c: torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.momentum > 0),
    "adamw": lambda groups, c: torch.optim.AdamW(groups, lr=c.lr, betas=(c.momentum, 0.999)),
}


class Classifier(L.LightningModule):
    """Image classifier taking uint8 NCHW batches; normalisation lives inside the model."""

    def __init__(self, arch: str, num_classes: int, width: int, mean: list[float], std: list[float],
                 cfg: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg = TrainConfig.model_validate(cfg)
        net = build_model(arch, num_classes, width)
        if self.cfg.init_weights:
            load_pretrained(net, self.cfg.init_weights)
        if self.cfg.defense.dp is not None:
            net = dp_compatible(net)
        self.model = Normalized(net, tuple(mean), tuple(std))
        if self.cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.batch_transforms = batch_transforms(self.cfg.defense, num_classes)
        self.grad_samples: list[Any] = []  # DP-SGD's per-sample-gradient wrapper, kept alive (not a submodule)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def on_train_epoch_start(self) -> None:
        loader = self.trainer.datamodule.train_loader
        if loader is not None:
            loader.epoch = self.current_epoch
            if self.cfg.min_resolution is not None:
                loader.set_resolution(resolution_at(self.cfg, self.current_epoch))

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        targets = labels
        for transform in self.batch_transforms:
            images, targets = transform(images, targets)
        if self.batch_transforms and self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = self(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.cfg.label_smoothing)
        acc = (logits.argmax(1) == labels).float().mean()
        self.log_dict({"train_loss": loss, "train_acc": acc}, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        images, labels = batch[0], batch[1]
        logits = predict(self.model, images, self.cfg.test_time_flip)
        self.log_dict(
            {"val_loss": F.cross_entropy(logits, labels), "val_acc": (logits.argmax(1) == labels).float().mean()},
            on_epoch=True, sync_dist=True, batch_size=len(labels),
        )

    def configure_optimizers(self) -> Any:
        c = self.cfg
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)
        opt = OPTIMIZERS[c.optimizer](
            [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], c)
        if c.defense.dp is not None:
            wrapper, opt = make_private(self.model, opt, c.defense.dp, c.batch_size)
            self.grad_samples = [wrapper]
        total = self.trainer.estimated_stepping_batches
        if c.schedule == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c.lr, total_steps=total, pct_start=0.25)
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(c, total / c.epochs, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


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
        trainer.save_checkpoint(Path(cast(str, self.dirpath)) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")


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


# Learning-rate decay after warm-up: (config, progress through the decay in [0, 1], epoch) -> factor.
DECAYS: dict[str, Callable[[TrainConfig, float, float], float]] = {
    "constant": lambda c, progress, epoch: 1.0,
    "cosine": lambda c, progress, epoch: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "linear": lambda c, progress, epoch: 1.0 - progress,
    "multistep": lambda c, progress, epoch: c.gamma ** sum(epoch >= m for m in c.milestones),
}


def lr_factor(cfg: TrainConfig, steps_per_epoch: float, total_steps: int) -> Callable[[int], float]:
    """Multiplier of train.lr at each optimizer step: a linear ramp over warmup_epochs, then the
    schedule's decay over the remaining steps (multistep milestones count whole epochs)."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    decay = DECAYS[cfg.schedule]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return decay(cfg, (step - warmup) / max(1, total_steps - warmup), step / steps_per_epoch)

    return factor


def resolve_precision(cfg: TrainConfig) -> str:
    """Mixed precision where the hardware has it: bf16 on recent GPUs and on CPUs with native bf16
    (AVX512-BF16/AMX, about 2.5x faster here), fp16 on older GPUs, else fp32."""
    if cfg.precision != "auto":
        return cfg.precision
    if cfg.defense.dp is not None:  # per-sample gradients in full precision
        return "32-true"
    if cfg.accelerator != "cpu" and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"


def resolution_at(cfg: TrainConfig, epoch: int) -> int:
    """Training crop size at `epoch` under progressive resizing: min_resolution until the first of
    resize_epochs, then linearly up to `resolution` at the second, rounded down to a multiple of 32
    (FFCV's ImageNet recipe) but never below min_resolution."""
    low, high = cast(int, cfg.min_resolution), cast(int, cfg.resolution)  # both set: TrainConfig checks
    start, end = cfg.resize_epochs
    progress = min(max((epoch - start) / max(end - start, 1), 0.0), 1.0)
    size = int(low + progress * (high - low)) // 32 * 32
    return high if epoch >= end else max(size, low)


def predict(model: torch.nn.Module, images: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """fp32 logits; with `flip`, the mean of the logits of the images and their mirror images
    (test-time flip, as FFCV's ImageNet recipe evaluates). Accuracy only: the audit never flips."""
    logits = model(images).float()
    return (logits + model(images.flip(3)).float()) / 2 if flip else logits


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, device: torch.device, flip: bool = False) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` in eval mode over every sample of `loader`."""
    model.eval().to(device)
    total_loss, correct, count = 0.0, 0, 0
    for images, labels, *_ in loader:
        logits = predict(model, images.to(device), flip)
        labels = labels.to(device)
        total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
        count += len(labels)
    return total_loss / max(count, 1), correct / max(count, 1)


def make_loggers(stage: Stage, arm: str, wandb: WandbConfig, experiment: str) -> list[Any]:
    """CSV always; W&B when enabled, one run per (experiment, stage) with a fixed id so a resumed or
    requeued job continues the same run. Lightning's loggers write from rank zero only."""
    loggers: list[Any] = [CSVLogger(stage.dir, name="logs")]
    if wandb.enabled:
        from lightning.pytorch.loggers import WandbLogger

        from .tracking import run_id

        loggers.append(WandbLogger(project=wandb.project, name=f"{experiment}/train-{arm}", group=experiment,
                                   job_type="train", id=run_id(stage), resume="allow", save_dir=str(stage.dir),
                                   offline=wandb.mode == "offline"))
    return loggers


def run_train(stage: Stage, arm: str, cfg: TrainConfig, write_dir: Path, num_classes: int,
              mean: list[float], std: list[float], seed: int, val_every: int,
              wandb: WandbConfig = WandbConfig(), experiment: str = "run") -> None:
    L.seed_everything(seed, workers=True, verbose=False)
    train_path, test_path = write_dir / ARM_TRAIN_SET[arm], write_dir / "test.beton"
    module = Classifier(cfg.arch, num_classes, cfg.width, mean, std, cfg.model_dump(mode="json"))
    defense, extra, indices = cfg.defense, {}, None
    if defense.outlier_fraction:
        scan = LOADERS[cfg.loader](train_path, 512, cfg.num_workers, train=False, resolution=eval_resolution(cfg))
        indices, extra["outliers"] = select_inliers(scan, defense.outlier_fraction, stage.path("outliers.json"))
    data = BetonData(train_path, test_path, cfg, seed, indices)
    ckpt_dir = stage.path("checkpoints")
    last = ckpt_dir / "last.ckpt"
    if last.exists():  # one clear line, rather than a traceback from inside fit, if it cannot be resumed
        try:
            read_checkpoint(last)
        except StageError as exc:
            raise StageError(f"{exc}; delete it to train from the start") from None
        log.info("train-%s: resuming from %s", arm, last)
    # A resumed run rewrites the files it had written before the kill instead of versioning them.
    checkpoint = ResumableCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=cfg.checkpoint_every_n_steps,
                                     enable_version_counter=False)
    best = ModelCheckpoint(dirpath=ckpt_dir, monitor="val_acc", mode="max", save_top_k=1, save_on_train_epoch_end=False,
                           filename="best-{epoch}-{val_acc:.4f}", auto_insert_metric_name=False,
                           enable_version_counter=False)
    callbacks: list[Callback] = [checkpoint, best, KeepLauncherSigterm()] + ([SampleRecorder(stage.path("seen"))] if cfg.record_samples else [])
    if defense.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(monitor="val_acc", mode="max", patience=defense.early_stopping_patience))
    pruning = MagnitudePruning(defense.prune_fraction, cfg.epochs - defense.finetune_epochs) if defense.prune_fraction else None
    callbacks += [pruning] if pruning is not None else []
    trainer = L.Trainer(
        accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=cfg.strategy,
        precision=resolve_precision(cfg), max_epochs=cfg.epochs, logger=make_loggers(stage, arm, wandb, experiment),
        callbacks=callbacks, plugins=cluster_plugins(), num_sanity_val_steps=0,
        check_val_every_n_epoch=1 if defense.early_stopping_patience else val_every,  # early stopping watches every epoch
        enable_progress_bar=False, enable_model_summary=False, deterministic=False,
    )
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if last.exists() else None, weights_only=True)
    if wandb.enabled and trainer.global_rank == 0:  # Lightning leaves the run open; close it with the stage
        import wandb as wandb_sdk

        wandb_sdk.finish()
    if trainer.global_rank != 0:
        return
    device = module.device
    if defense.early_stopping_patience is not None:  # the released model is the best one on held-out data
        module.load_state_dict(read_checkpoint(Path(best.best_model_path))["state_dict"])
        extra["stopped_epoch"] = trainer.current_epoch
    if pruning is not None:  # the released model is pruned, whichever checkpoint it comes from
        pruning.prune(module)
        extra["sparsity"] = sparsity(module.model)
    if defense.dp is not None:
        sample_rate = cfg.batch_size * trainer.world_size / cast(Any, data.train_loader).num_samples
        extra["dp_epsilon"] = dp_epsilon(defense.dp, min(sample_rate, 1.0), trainer.global_step)
    meta = {"arch": cfg.arch, "width": cfg.width, "num_classes": num_classes, "mean": mean, "std": std, "arm": arm,
            **({"group_norm": True} if defense.dp is not None else {})}
    save_weights(module.model, meta, stage.path("model.pt"))
    res = eval_resolution(cfg)
    train_loss, train_acc = evaluate(module.model, LOADERS[cfg.loader](train_path, 512, cfg.num_workers, train=False,
                                                               resolution=res), device)
    test_loss, test_acc = evaluate(module.model, LOADERS[cfg.loader](test_path, 512, cfg.num_workers, train=False,
                                                             resolution=res), device, cfg.test_time_flip)
    metrics = {
        "arm": arm, "epochs": cfg.epochs, "precision": resolve_precision(cfg),
        "train_loss": train_loss, "train_accuracy": train_acc, "test_loss": test_loss, "test_accuracy": test_acc,
        "global_step": trainer.global_step,
        "best_val_checkpoint": Path(best.best_model_path).name if best.best_model_path else None,
        "best_val_accuracy": float(best.best_model_score) if best.best_model_score is not None else None,
        **extra,
    }
    if not math.isfinite(train_loss):
        raise StageError(f"train-{arm}: training diverged (train loss {train_loss}); lower train.lr")
    write_json(stage.path("metrics.json"), metrics)
    stage.finish(["model.pt", "metrics.json"], **metrics)
