"""The Lightning pieces of training: the classifier module and the data module over FFCV files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..core.models import Normalized, build_model, classifier_head, freeze_backbone, load_pretrained
from ..data.betons import BetonLoader, make_loader
from ..data.torchdata import TorchBetonLoader, make_torch_loader
from ..registry import Registry
from ..store import StageError
from .countermeasures import Countermeasure, active
from .schedules import eval_resolution, lr_factor

LOADERS: Registry[Callable[..., BetonLoader | TorchBetonLoader]] = Registry("train.loader")
LOADERS.register("ffcv")(make_loader)
LOADERS.register("torch")(make_torch_loader)


class BetonData(L.LightningDataModule):
    """Train/validation loaders built inside the hooks, so each DDP rank gets its own shard."""

    def __init__(
        self, train_path: Path, val_path: Path, cfg: TrainConfig, seed: int, indices: np.ndarray | None = None
    ) -> None:
        super().__init__()
        self.train_path, self.val_path, self.cfg, self.seed, self.indices = train_path, val_path, cfg, seed, indices
        self.train_loader: BetonLoader | TorchBetonLoader | None = None
        self.resume_position: dict[str, int] | None = None

    def _distributed(self) -> bool:
        return self.trainer is not None and self.trainer.world_size > 1

    def train_dataloader(self) -> BetonLoader | TorchBetonLoader:
        c = self.cfg
        self.train_loader = LOADERS.lookup(c.loader)(
            self.train_path,
            c.batch_size,
            c.num_workers,
            train=True,
            augment=c.augment,
            translate_pixels=c.translate_pixels,
            seed=self.seed,
            distributed=self._distributed(),
            torch_threads=c.threads,
            resolution=c.resolution,
            indices=self.indices,
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
        return LOADERS.lookup(self.cfg.loader)(
            self.val_path,
            self.cfg.eval_batch_size,
            self.cfg.num_workers,
            train=False,
            distributed=self._distributed(),
            torch_threads=self.cfg.threads,
            resolution=eval_resolution(self.cfg),
        )


# Optimizers by `train.optimizer`, given parameter groups (weight decay off norms and biases).
OPTIMIZERS: Registry[Callable[[list[dict[str, Any]], TrainConfig], torch.optim.Optimizer]] = Registry("train.optimizer")
OPTIMIZERS.register("sgd")(
    lambda groups, c: torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.momentum > 0)
)
OPTIMIZERS.register("adamw")(lambda groups, c: torch.optim.AdamW(groups, lr=c.lr, betas=(c.momentum, 0.999)))


class Classifier(L.LightningModule):
    """Image classifier taking uint8 NCHW batches; normalisation lives inside the model."""

    def __init__(
        self,
        arch: str,
        num_classes: int,
        width: int,
        mean: list[float],
        std: list[float],
        cfg: dict[str, Any],
        countermeasures: list[Countermeasure] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["countermeasures"])
        self.cfg = TrainConfig.model_validate(cfg)
        self.countermeasures = active(self.cfg, num_classes) if countermeasures is None else countermeasures
        net = build_model(arch, num_classes, width)
        if self.cfg.init_weights:
            load_pretrained(net, self.cfg.init_weights)
        for countermeasure in self.countermeasures:
            net = countermeasure.wrap_network(net)
        if self.cfg.finetune == "head":
            freeze_backbone(net)
        self.model = Normalized(net, tuple(mean), tuple(std))
        if self.cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.batch_transforms = [c for c in self.countermeasures if c.transforms_batches]
        self.train()  # Lightning trains a fresh module without calling train() first

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def train(self, mode: bool = True) -> Classifier:
        """Lightning switches modes around every validation; a frozen backbone stays in eval mode so
        that its BatchNorm statistics are the pretrained ones."""
        super().train(mode)
        if self.cfg.finetune == "head":
            self.model.eval()
            classifier_head(self.model).train(mode)
        return self

    def on_train_epoch_start(self) -> None:
        loader = self.trainer.datamodule.train_loader
        if loader is not None:
            loader.epoch = self.current_epoch
            if self.cfg.min_resolution is not None:
                loader.set_resolution(self.cfg.resolution_at(self.current_epoch))

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        targets = labels
        for countermeasure in self.batch_transforms:
            images, targets = countermeasure.transform(images, targets)
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
            on_epoch=True,
            sync_dist=True,
            batch_size=len(labels),
        )

    def configure_optimizers(self) -> Any:
        c = self.cfg
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        opt = OPTIMIZERS.lookup(c.optimizer)(
            [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], c
        )
        for countermeasure in self.countermeasures:
            opt = countermeasure.wrap_optimizer(self.model, opt)
        total = self.trainer.estimated_stepping_batches
        if total < 1:  # every rank drops its last, partial batch: fewer images than one batch per rank
            raise StageError(
                f"train.batch_size: {c.batch_size} images per device on {self.trainer.world_size} "
                "device(s) is more than the training set gives each; lower it or train.devices"
            )
        if c.schedule == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c.lr, total_steps=total, pct_start=0.25)
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(c, total / c.epochs, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def predict(model: torch.nn.Module, images: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """fp32 logits; with `flip`, the mean of the logits of the images and their mirror images
    (test-time flip, as FFCV's ImageNet recipe evaluates). Accuracy only: the audit never flips."""
    logits = model(images).float()
    return (logits + model(images.flip(3)).float()) / 2 if flip else logits


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, loader: Any, device: torch.device, num_classes: int, flip: bool = False
) -> tuple[float, float, list[float | None]]:
    """Mean cross-entropy, accuracy and per-class accuracy (None for a class without samples) of
    `model` in eval mode over every sample of `loader`: the audit's easy classes are the accurate ones."""
    model.eval().to(device)
    total_loss = 0.0
    correct, count = torch.zeros(num_classes, dtype=torch.int64), torch.zeros(num_classes, dtype=torch.int64)
    for images, labels, *_ in loader:
        logits = predict(model, images.to(device), flip)
        labels = labels.to(device)
        total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        count += torch.bincount(labels.cpu(), minlength=num_classes)
        correct += torch.bincount(labels[logits.argmax(1) == labels].cpu(), minlength=num_classes)
    n = max(int(count.sum()), 1)
    per_class = [int(c) / int(k) if k else None for c, k in zip(correct, count)]
    return total_loss / n, int(correct.sum()) / n, per_class
