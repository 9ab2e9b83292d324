"""Early stopping on held-out accuracy (`train.defense.early_stopping_patience`): training stops
after this many validations without improvement and the best model is the one released."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from ...core.models import read_checkpoint
from .base import Countermeasure, register


@register
class EarlyStop(Countermeasure):
    fields = ("early_stopping_patience",)
    validates_every_epoch = True

    def callbacks(self) -> list[Callback]:
        return [
            EarlyStopping(monitor="val_acc", mode="max", patience=int(self.cfg.defense.early_stopping_patience or 1))
        ]

    def finish(self, module: L.LightningModule, trainer: L.Trainer, train_samples: int) -> dict[str, Any]:
        best = next(
            c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor == "val_acc"
        )
        module.load_state_dict(read_checkpoint(Path(best.best_model_path))["state_dict"])
        return {"stopped_epoch": trainer.current_epoch}
