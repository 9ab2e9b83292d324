"""The countermeasure protocol: what a model trainer could do against the audit, as a plug-in of
the train stage. Each countermeasure is one class in its own module of this package, registered
under its switch in `train.defense`; every hook defaults to doing nothing, so a plug-in overrides
only the ones it acts through."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from ...config import TrainConfig
from ...registry import Registry

Batch = tuple[torch.Tensor, ...]


class Countermeasure:
    """One countermeasure, built from the train config once per training run.

    `fields`: the `train.defense` keys it owns (the first switches it on); `order`: where its batch
    transform runs among the others (the stored data, then augmentation, then mixing)."""

    fields: ClassVar[tuple[str, ...]]
    order: ClassVar[int] = 0
    transforms_batches: ClassVar[bool] = False  # `transform` changes the training batches
    precision: ClassVar[str | None] = None  # a numeric precision it requires
    validates_every_epoch: ClassVar[bool] = False  # it watches held-out accuracy after every epoch

    def __init__(self, cfg: TrainConfig, num_classes: int) -> None:
        self.cfg, self.num_classes = cfg, num_classes

    def select(self, records: Callable[[], Iterable[Batch]], record: Path) -> tuple[np.ndarray, dict[str, Any]] | None:
        """Before training: positions of the training records to keep (and notes), or None for all.
        `records()` yields (images, labels, sample ids, user ids) in file order; `record` is a file
        for what it dropped."""
        return None

    def wrap_network(self, net: nn.Module) -> nn.Module:
        return net

    def transform(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images, targets

    def wrap_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer

    def callbacks(self) -> list[Callback]:
        return []

    def finish(self, module: L.LightningModule, trainer: L.Trainer, train_samples: int) -> dict[str, Any]:
        """After training, on rank zero: turn the trained module into the released model if the
        countermeasure changes it, and return notes on what it did (kept in the train metrics)."""
        return {}

    def checkpoint_meta(self) -> dict[str, Any]:
        """What loading the released weights needs to know (kept in model.pt's metadata)."""
        return {}


COUNTERMEASURES: Registry[type[Countermeasure]] = Registry("train.defense")


def register(cls: type[Countermeasure]) -> type[Countermeasure]:
    return COUNTERMEASURES.register(cls.fields[0])(cls)
